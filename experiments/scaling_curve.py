"""Throughput against the number of GPUs, from bench_pipeline.py calls: the curve and its scaling
efficiency.

  python experiments/scaling_curve.py --runs DIR [DIR ...] --out DIR

Each DIR is one bench_pipeline.py call (its runs.jsonl and summary.json). A point is (call, model,
GPUs): the fastest successful run of that model on that many GPUs in that call (variants such as
more micro-batches or 4-bit weights compete; the point names the run it took). Speed-up and
efficiency (speed-up / GPUs) are taken against the same call's one-GPU point of the same model
only, since ratios across machines mean little; a call without one leaves them empty. Writes
DIR/scaling.json, scaling.csv, scaling.md and, with matplotlib, scaling.png (token/s against GPUs
on log-log axes, one line per call and model, the linear ideal dashed).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.sweep.results import read_records  # noqa: E402

FIELDS = ["call", "card", "model", "gpus", "token_s", "speedup", "efficiency", "run", "sequences", "micro_batches",
          "percent"]


@dataclass
class Point:
    call: str  # the folder (see label)
    card: str
    model: str
    gpus: int
    token_s: float
    run: str
    sequences: int
    micro_batches: int
    percent: str
    speedup: float | None = None
    efficiency: float | None = None


def _flag(command: list[str], name: str, count: int = 1) -> str:
    if name not in command:
        return ""
    i = command.index(name)
    return " ".join(command[i + 1:i + 1 + count])


def label(folder: Path) -> str:
    """A call as the tables name it: its path under experiments/results when it is there."""
    results = (ROOT / "experiments" / "results").resolve()
    resolved = folder.resolve()
    return str(resolved.relative_to(results)) if resolved.is_relative_to(results) else str(folder)


def read_call(folder: Path) -> list[Point]:
    """The call's points: its fastest successful run per (model, GPUs)."""
    ledger = folder / "runs.jsonl"
    if not ledger.is_file():
        raise SystemExit(f"error: {folder} has no runs.jsonl; pass folders written by experiments/bench_pipeline.py.")
    summary = folder / "summary.json"
    card = json.loads(summary.read_text()).get("hardware", {}).get("gpu", "?") if summary.is_file() else "?"
    best: dict[tuple[str, int], Point] = {}
    for r in read_records(ledger):
        tput = r.get("metrics", {}).get("total_throughput")
        command = r.get("command") or []
        if r.get("status") != "ok" or not tput or r["name"].startswith("flexgen-") or "--model" not in command:
            continue  # this engine's curve: FlexGen's pipeline runs stay in their call's summary
        pipeline = r.get("pipeline") or {}
        p = Point(call=label(folder), card=card, model=_flag(command, "--model"), gpus=int(pipeline.get("stages", 1)),
                  token_s=float(tput), run=r["name"], sequences=int(r["metrics"].get("batch_size", 0)),
                  micro_batches=int(pipeline.get("micro_batches", 1)), percent=_flag(command, "--percent", 6))
        key = (p.model, p.gpus)
        if key not in best or p.token_s > best[key].token_s:
            best[key] = p
    points = sorted(best.values(), key=lambda p: (p.model, p.gpus))
    for p in points:
        base = best.get((p.model, 1))
        if base is not None:
            p.speedup = p.token_s / base.token_s
            p.efficiency = p.speedup / p.gpus
    return points


def markdown(points: list[Point]) -> str:
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"
    lines = ["| call | card | model | GPUs | token/s | speed-up | efficiency | run | sequences | placement per stage |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---|"]
    for p in points:
        lines.append(f"| {p.call} | {p.card} | {p.model} | {p.gpus} | {p.token_s:.1f} | {f(p.speedup, '.2f')} | "
                     f"{f(p.efficiency, '.0%')} | {p.run} | {p.sequences} | `{p.percent}` |")
    return "\n".join(lines) + "\n"


def plot(points: list[Point], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (call, model) in sorted({(p.call, p.model) for p in points}):
        line = [p for p in points if (p.call, p.model) == (call, model)]
        xs, ys = [p.gpus for p in line], [p.token_s for p in line]
        drawn = ax.plot(xs, ys, marker="o", label=f"{model} ({call}, {line[0].card})")
        base = next((p for p in line if p.gpus == 1), None)
        if base is not None and len(line) > 1:
            ax.plot(xs, [base.token_s * x for x in xs], linestyle="--", color=drawn[0].get_color(), alpha=0.4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (pipeline stages)")
    ax.set_ylabel("token/s (512+32)")
    ax.set_title("Throughput against GPUs (dashed: linear from one GPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(points: list[Point], out: Path) -> list[Path]:
    """The four files, each written whole to a temporary name and renamed: no half-written result."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{k: row[k] for k in FIELDS} for row in map(asdict, points)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    texts = {"scaling.json": json.dumps({"points": rows}, indent=1) + "\n", "scaling.csv": buf.getvalue(),
             "scaling.md": markdown(points)}
    written = []
    for name, text in texts.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
        written.append(out / name)
    tmp = out / ".scaling.tmp.png"
    if plot(points, tmp):
        tmp.replace(out / "scaling.png")
        written.append(out / "scaling.png")
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, required=True, help="bench_pipeline.py --out folders, one per call")
    ap.add_argument("--out", type=Path, required=True, help="folder for scaling.json/.csv/.md/.png")
    args = ap.parse_args()
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file; pass a folder.")
    points = [p for folder in args.runs for p in read_call(folder)]
    if not points:
        ap.error("no successful run of this engine in those folders; pass bench_pipeline.py folders with runs.")
    print(markdown(points), end="")
    print("wrote " + ", ".join(str(p) for p in write(points, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
