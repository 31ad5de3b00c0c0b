"""The plots of a sweep: throughput against latency, and predicted against measured throughput.

Why it is built this way: matplotlib is optional (no plot and one notice without it), drawn on Agg
canvases with no pyplot state, and each PNG is renamed into place so a viewer never reads half of one.
"""
from __future__ import annotations

from pathlib import Path

from .grid import label
from .results import predicted, write_atomic


def varying(records: list[dict]) -> list[str]:
    """The settings whose values differ between the records: what a point's label must show."""
    names = list(dict.fromkeys(n for r in records for n in r.get("settings", {})))
    return [n for n in names if len({str(r.get("settings", {}).get(n)) for r in records}) > 1]


def draw_plots(records: list[dict], out: Path) -> list[Path] | None:
    """throughput_vs_latency.png and, where runs carry a prediction, predicted_vs_measured.png;
    None without matplotlib. Agg canvases, no pyplot state; each file renamed into place."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ok = [r for r in records if r.get("status") == "ok" and (r.get("result") or {}).get("metrics")]
    names, paths = varying(ok), []
    title = (f"{len(ok)} points" + (f", {len(records) - len(ok)} failed (not shown)" if len(records) > len(ok) else "")
             + (f"\nlabels: {' / '.join(names)}" if names else ""))

    def scatter(xy: list[tuple[float, float, dict]], xlabel: str, ylabel: str, size: tuple[int, int]):
        fig = Figure(figsize=size)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for x, y, r in xy:
            ax.plot(x, y, "o")
            text = " / ".join(str(label(r["settings"], [n]).split("=", 1)[1]) for n in names) or r["id"]
            ax.annotate(text, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points").set_in_layout(False)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        return fig, ax

    def save(fig, name: str) -> None:
        fig.tight_layout()
        write_atomic(out / name, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        paths.append(out / name)

    xy = [(r["result"]["metrics"]["total_s"], r["result"]["metrics"]["total_throughput"], r) for r in ok]
    fig, ax = scatter(xy, "total latency (prefill + decode), s", "total throughput, token/s", (8, 6))
    ax.margins(x=0.3, y=0.1)  # room for the labels, written to the right of each point
    save(fig, "throughput_vs_latency.png")

    xy = [(predicted(r), r["result"]["metrics"]["total_throughput"], r) for r in ok if predicted(r) is not None]
    if xy:
        fig, ax = scatter(xy, "predicted total throughput, token/s", "measured total throughput, token/s", (7, 7))
        top = max(max(x, y) for x, y, _ in xy) * 1.15
        ax.plot([0, top], [0, top], "--", color="gray", label="y = x")
        ax.set(xlim=(0, top), ylim=(0, top))
        ax.legend(loc="lower right")
        save(fig, "predicted_vs_measured.png")
    return paths
