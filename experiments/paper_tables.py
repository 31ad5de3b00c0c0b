"""The throughput tables of the FlexGen and H2O papers, rebuilt from benchmark-suite results: this
engine (full cache, 4-bit, H2O 20%, HiP) beside FlexGen and Hugging Face Accelerate on one machine.

  python experiments/paper_tables.py --runs DIR [DIR ...] --out DIR
      writes DIR/flexgen_table.md, DIR/h2o_table.md and DIR/tables.png (grouped bars, log scale)
  python experiments/paper_tables.py --print-commands [--runs DIR ...] [--budget-s 540]
      prints the bench_suite.py calls (each within the budget) that fill the cells without a run

FlexGen's table: OPT-6.7B all on the GPU and OPT-30B with the GPU capped at 16 GiB, 512+32. H2O's:
both models at 16 GiB, 512+32, 512+512 and 1024+1024. A cell is token/s with "(effective batch,
lowest tier)", the tier being the lowest one the policy puts anything on (gpu, cpu, disk), as the
papers print it. Why a list of cases per cell: the papers report each system at its best policy,
so a cell shows the fastest of the runs listed for it (each case's latest successful run, from
any of the folders); "-" where none ran, the status where all failed. Runs that decoded fewer
steps and extrapolated (--cut-gen-len) say so in the cell and below the table; a run whose GPU
cap differs from its column's is marked; cells name their GPU when the runs come from several.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.cases import CASES  # noqa: E402
from offload_engine.sweep.results import read_records  # noqa: E402


@dataclass(frozen=True)
class Column:
    label: str
    model: str
    prompt_len: int
    gen_len: int
    gpu_cap_gib: float | None


@dataclass(frozen=True)
class Row:
    label: str
    system: str
    cells: tuple[tuple[str, ...], ...]  # per column, the cases whose runs of `system` may fill it


@dataclass(frozen=True)
class Table:
    name: str  # the file is <name>_table.md
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]


_6, _30 = ("opt-6.7b", "OPT-6.7B"), ("opt-30b", "OPT-30B")
_H2O_SETTINGS = ((512, 32), (512, 512), (1024, 1024))
TABLES = (
    Table("flexgen", "FlexGen's table: 512+32, OPT-6.7B all on the GPU, OPT-30B with the GPU capped at 16 GiB",
          (Column("OPT-6.7B", "opt-6.7b", 512, 32, None), Column("OPT-30B (16 GiB)", "opt-30b", 512, 32, 16)),
          (Row("this engine", "ours", (("opt6.7b-gpu-bmax", "opt6.7b-gpu-b32"), ("opt30b-cap16-cpuattn",))),
           Row("this engine, 4-bit", "ours", (("opt6.7b-compress-bmax", "opt6.7b-compress-b72"),
                                                ("opt30b-compress-cap16", "opt30b-compress-both-cap16"))),
           Row("this engine, H2O 20%", "ours", (("opt6.7b-h2o-512+32",), ("opt30b-h2o-512+32",))),
           Row("this engine, HiP", "ours", (("table-opt6.7b-gpu-hip",), ("table-opt30b-cap16-hip",))),
           Row("FlexGen", "flexgen", (("table-opt6.7b-gpu-flexgen-bmax", "opt6.7b-gpu-b32"),
                                      ("opt30b-cap16-cpuattn",))),
           Row("FlexGen, 4-bit", "flexgen", (("table-opt6.7b-compress-flexgen-bmax", "opt6.7b-compress-b72"),
                                             ("opt30b-compress-cap16", "opt30b-compress-both-cap16"))),
           Row("Accelerate", "accelerate", (("table-opt6.7b-gpu",), ("table-opt30b-cap16-512+32",))))),
    Table("h2o", "H2O's table: the GPU capped at 16 GiB; H2O keeps 20% of the prompt (10% heavy hitters + 10% recent)",
          tuple(Column(f"{label} {p}+{g}", model, p, g, 16) for model, label in (_6, _30) for p, g in _H2O_SETTINGS),
          (Row("this engine, H2O 20%", "ours", tuple((f"{m}-h2o-{p}+{g}",) for m in ("opt6.7b", "opt30b")
                                                      for p, g in _H2O_SETTINGS)),
           Row("this engine, full cache", "ours", tuple(
               ("opt30b-cap16-cpuattn",) if (m, p, g) == ("opt30b", 512, 32) else (f"table-{m}-cap16-{p}+{g}",)
               for m in ("opt6.7b", "opt30b") for p, g in _H2O_SETTINGS)),
           Row("FlexGen", "flexgen", tuple(
               ("opt30b-cap16-cpuattn",) if (m, p, g) == ("opt30b", 512, 32) else (f"{m}-h2o-{p}+{g}",)
               for m in ("opt6.7b", "opt30b") for p, g in _H2O_SETTINGS)),
           Row("Accelerate", "accelerate", tuple((f"table-{m}-cap16-{p}+{g}",) for m in ("opt6.7b", "opt30b")
                                                 for p, g in _H2O_SETTINGS)))),
)
# FlexGen's paper, Table 2 (T4 16 GB, 208 GB DRAM, 1.5 TB SSD; 512+32; /work/shared/ANCHORS.md), for the shape.
PUBLISHED = (("FlexGen", "25.26 (2, gpu)", "7.32 (144, cpu)"), ("FlexGen, 4-bit", "29.12 (72, gpu)", "8.38 (512, cpu)"),
             ("Accelerate", "25.12", "0.62"), ("DeepSpeed ZeRO-Inference", "9.28", "0.60"))


def check_tables() -> None:
    """Every cell names cases that exist, carry its row's system and run its column's model and lengths."""
    for t in TABLES:
        for row in t.rows:
            if len(row.cells) != len(t.columns):
                raise ValueError(f"{t.name} table, row {row.label}: {len(row.cells)} cells for "
                                 f"{len(t.columns)} columns: give one tuple of cases a column.")
            for column, cases in zip(t.columns, row.cells):
                for name in cases:
                    case = CASES.get(name)
                    if case is None or case.policy(row.system) is None:
                        raise ValueError(f"{t.name} table, {row.label}: '{name}' is no case with {row.system} flags.")
                    if (case.model, case.prompt_len, case.gen_len) != (column.model, column.prompt_len, column.gen_len):
                        raise ValueError(f"{t.name} table: '{name}' does not run the workload of column "
                                         f"{column.label}: move it to its column.")


check_tables()


def load_runs(dirs: list[Path]) -> list[dict]:
    """Every record of the folders (runs.jsonl, else summary.json's runs), each with its folder's hardware."""
    out = []
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        records = read_records(d / "runs.jsonl") or summary.get("runs", [])
        if not records:
            raise ValueError(f"{d} holds no runs.jsonl or summary.json with runs: name a bench_suite.py --out folder.")
        for r in records:
            out.append(dict(r, folder=d.name, hardware=summary.get("hardware") or {"gpu": r.get("gpu")}))
    return out


def pick(records: list[dict], system: str, cases: tuple[str, ...]) -> dict | None:
    """The fastest of the cases' latest successful runs; without one, the latest failed run; else None."""
    mine = sorted((r for r in records if r.get("system") == system and r.get("case") in cases),
                  key=lambda r: r.get("started", ""))
    ok = {r["case"]: r for r in mine if r.get("status") == "ok" and r.get("total_throughput")}
    if ok:
        return max(ok.values(), key=lambda r: r["total_throughput"])
    return mine[-1] if mine else None


def lowest_tier(r: dict) -> str:
    if r.get("system") == "accelerate":  # where Accelerate's device_map put the weights
        placed = r.get("placement_gib") or {}
        return next((t for t in ("disk", "cpu", "gpu") if placed.get(t)), "?")
    p = (r.get("settings_full") or {}).get("percent")
    if not p:
        return "?"
    if any(p[i] + p[i + 1] < 100 for i in (0, 2, 4)):
        return "disk"
    return "cpu" if any(p[i + 1] > 0 for i in (0, 2, 4)) else "gpu"


def cut_of(r: dict) -> int | None:
    """Decode length a run extrapolated from (FlexGen's --cut-gen-len), or None where it decoded all."""
    cut = r.get("cut_gen_len") if r.get("system") != "ours" else (r.get("settings_full") or {}).get("cut_gen_len")
    return cut if cut and cut < r.get("gen_len", cut + 1) else None


def gpu_of(r: dict) -> str:
    return (r.get("hardware") or {}).get("gpu") or r.get("gpu") or "unknown GPU"


def cell_text(r: dict | None, column: Column, name_gpu: bool) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "?")
    extra = [f"cut {cut_of(r)}"] if cut_of(r) else []
    text = f"{r['total_throughput']:,.1f} ({', '.join([str(r.get('batch_size', '?')), lowest_tier(r)] + extra)})"
    if r.get("gpu_cap_gib") != column.gpu_cap_gib:
        text += "†"
    return text + (f" [{gpu_of(r).replace('NVIDIA ', '')}]" if name_gpu else "")


def fill(records: list[dict]) -> dict[str, list[list[dict | None]]]:
    """Per table, per row, per column: the record shown."""
    return {t.name: [[pick(records, row.system, cases) for cases in row.cells] for row in t.rows] for t in TABLES}


def header(shown: list[dict]) -> str:
    machines = sorted({f"{gpu_of(r)} ({(r.get('hardware') or {}).get('gpu_mem_gib', 0):.0f} GiB), "
                       f"{(r.get('hardware') or {}).get('ram_gib', 0):.0f} GiB RAM, "
                       f"{(r.get('hardware') or {}).get('cpu_count', '?')} cores" for r in shown})
    commits = sorted({r.get("version", "?")[:10] + ("-dirty" if r.get("version", "").endswith("-dirty") else "")
                      for r in shown if r.get("system") == "ours"})
    peers = sorted({r.get("version", "?") for r in shown if r.get("system") != "ours"})
    text = (f"Hardware: {'; '.join(machines) or 'no runs'}. This engine at commit {', '.join(commits) or '-'}; "
            f"peers: {', '.join(peers) or '-'}.")
    if len(machines) > 1:
        text += " **The cells come from different machines: each names its GPU; compare within one GPU only.**"
    return text


def _label(folder: Path) -> str:
    """A runs folder as named in the tables: its path under experiments/results when it is there."""
    resolved = folder.resolve()
    results = (ROOT / "experiments" / "results").resolve()
    return str(resolved.relative_to(results)) if resolved.is_relative_to(results) else folder.name


def markdown(table: Table, cells: list[list[dict | None]], head: str, folders: list[str], name_gpu: bool) -> str:
    lines = [f"# {table.title}", "", head, "",
             "| system | " + " | ".join(c.label for c in table.columns) + " |",
             "|---|" + "---:|" * len(table.columns)]
    cuts, capped = [], []
    for row, records in zip(table.rows, cells):
        lines.append(f"| {row.label} | " + " | ".join(cell_text(r, c, name_gpu) for r, c in zip(records, table.columns))
                     + " |")
        for r, column in zip(records, table.columns):
            if r is None or r.get("status") != "ok":
                continue
            if cut_of(r):
                cuts.append(f"{row.label} `{r['case']}` ({cut_of(r)} of {r['gen_len']} tokens)")
            if r.get("gpu_cap_gib") != column.gpu_cap_gib:
                capped.append(f"{row.label} `{r['case']}` ({r.get('gpu_cap_gib') or 'no'} GiB cap)")
    lines += ["", "token/s (effective batch, lowest tier used). Each cell: the fastest of the cases listed for it in "
              "`experiments/paper_tables.py` (each case's latest successful run); \"-\": no run."]
    lines.append("Extrapolated (`--cut-gen-len`: decoded that many tokens, FlexGen's projection for the rest): "
                 + ("; ".join(cuts) if cuts else "none") + ".")
    if capped:
        lines.append("† the GPU cap differs from the column's: " + "; ".join(capped) + ".")
    lines.append(f"Runs from: {', '.join(folders)}.")
    if table.name == "flexgen":
        lines += ["", "Published in FlexGen's paper (T4 16 GB, 208 GB DRAM; not comparable, for the shape):", "",
                  "| system | OPT-6.7B | OPT-30B |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in PUBLISHED]
    return "\n".join(lines) + "\n"


def plot(filled: dict[str, list[list[dict | None]]], path: Path, head: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": [2, 6]})
    for ax, table in zip(axes, TABLES):
        n, width, low = len(table.rows), 0.8 / len(table.rows), float("inf")
        for i, (row, records) in enumerate(zip(table.rows, filled[table.name])):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(table.columns))]
            ys = [r["total_throughput"] if r and r.get("status") == "ok" else float("nan") for r in records]
            bars = ax.bar(xs, ys, width, label=row.label, color=plt.cm.tab10(i))
            ax.bar_label(bars, [f"{y:,.0f}" if y == y else "" for y in ys], fontsize=6, rotation=90, padding=2)
            low = min([low] + [y for y in ys if y == y])
        ax.set_yscale("log")
        ax.set_ylim(bottom=10 ** math.floor(math.log10(low)) if low < float("inf") else 1)
        ax.set_xticks(range(len(table.columns)), [c.label for c in table.columns], fontsize=8)
        ax.set_title(table.title, fontsize=9, wrap=True)
        ax.set_ylabel("token/s (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(head, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(dirs: list[Path], out: Path) -> list[Path]:
    records = load_runs(dirs)
    filled = fill(records)
    shown = [r for rows in filled.values() for rs in rows for r in rs if r and r.get("status") == "ok"]
    head, name_gpu = header(shown), len({gpu_of(r) for r in shown}) > 1
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in TABLES:
        paths.append(out / f"{table.name}_table.md")
        paths[-1].write_text(markdown(table, filled[table.name], head, [_label(d) for d in dirs], name_gpu))
    paths.append(out / "tables.png")
    plot(filled, paths[-1], head)
    return paths


def plan_calls(records: list[dict], budget_s: float, reserve_s: float = 15.0) -> tuple[list[dict], list[dict]]:
    """Device calls that fill the cells without a successful run in `records`:
    ([{cases, systems, seconds, jobs}], [the same for jobs longer than one call]).

    A call is one `bench_suite.py --cases ... --systems ...`, which runs every job (case, system)
    of those cases and systems, FlexGen peers included. Cases are packed in table order while the
    jobs' estimates (bench_suite's: the last measured wall time, else the case's guess) fit the
    budget less the suite's reserve, and only while the call runs no job that already succeeded
    (--systems leaves those out). Jobs of earlier calls count once: the suite skips what its --out
    folder holds. A case too long for one call is split by system; a job longer than a call is
    returned apart, to run detached as bench_suite.py's docstring says."""
    from experiments.bench_suite import SYSTEMS, Suite

    suite = Suite(Path("/nonexistent"), flexgen_version="-", accelerate_version="-", commit="-")
    capacity = budget_s - reserve_s

    def jobs(cases: list[str], systems) -> list[tuple[str, str]]:
        suite.names, suite.systems = cases, tuple(s for s in SYSTEMS if s in systems)
        return suite.jobs()

    def seconds(js) -> float:
        return sum(suite.estimate(case, system, records) for case, system in js)

    wanted = {case for t in TABLES for row in t.rows for cases in row.cells for case in cases}
    done = {(r.get("case"), r.get("system")) for r in records if r.get("status") == "ok"}
    calls: list[dict] = []
    long: list[dict] = []
    claimed: set = set()  # jobs of the calls before the last one
    for name in (n for n in CASES if n in wanted):
        last = calls[-1] if calls else None
        planned = claimed | set(last["jobs"] if last else [])
        need = [s for s in SYSTEMS if any(j not in done and j not in planned for j in jobs([name], [s]))]
        if not need:
            continue
        if last and not last.get("closed"):
            systems = set(last["systems"]) | set(need)
            js = [j for j in jobs(last["cases"] + [name], systems) if j not in claimed]
            if not any(j in done for j in js) and seconds(js) <= capacity:
                last.update(cases=last["cases"] + [name], systems=tuple(s for s in SYSTEMS if s in systems),
                            jobs=js, seconds=seconds(js))
                continue
        claimed.update(last["jobs"] if last else [])
        js = [j for j in jobs([name], need) if j not in claimed]
        if seconds(js) <= capacity:
            calls.append(dict(cases=[name], systems=tuple(need), jobs=js, seconds=seconds(js)))
            continue
        for j in js:  # one call per system: `--cases name --systems s` runs exactly this job
            unit = dict(cases=[name], systems=(j[1],), jobs=[j], seconds=seconds([j]), closed=True)
            (long if unit["seconds"] > capacity else calls).append(unit)
            claimed.add(j)
    return calls, long


def print_commands(records: list[dict], budget_s: float, suite_out: str, reserve_s: float = 15.0) -> str:
    from offload_engine.metrics import git_commit

    calls, long = plan_calls(records, budget_s, reserve_s)
    if not calls and not long:
        return "# every cell of both tables has a successful run: nothing to run"
    suite = f"python experiments/bench_suite.py --commit {git_commit().removesuffix('-dirty')}"
    lines = [f"# {len(calls)} device calls of at most {budget_s:g} s fill the cells without a successful run "
             f"(about {sum(c['seconds'] for c in calls):.0f} s in all: measured wall times where a case ran, else "
             "the cases' guesses).", "# In each call first install the carried wheels (bench_suite.py's docstring); "
             f"after it, copy the returned runs.jsonl, runs.log and summary.json into {suite_out}."]
    for i, call in enumerate(calls, 1):
        systems = f" --systems {' '.join(call['systems'])}"
        lines += [f"# call {i}: about {call['seconds']:.0f} s: " + ", ".join(f"{s} {c}" for c, s in call["jobs"]),
                  f"PYTHONPATH=.:$PYTHONPATH {suite} --out {suite_out} --copy-to $OUT --budget-s {budget_s:g}{systems} "
                  f"--cases {' '.join(call['cases'])}"]
    for unit in long:
        systems = f" --systems {' '.join(unit['systems'])}"
        lines += [f"# longer than one call (about {unit['seconds']:.0f} s): start it detached, then follow it in "
                  "each next call within the 30 s the machine stays warm:",
                  f"PYTHONPATH=.:$PYTHONPATH setsid nohup {suite} --out /tmp/suite --budget-s 1700{systems} "
                  f"--cases {' '.join(unit['cases'])} > /tmp/suite.out 2>&1 &",
                  f"PYTHONPATH=. python experiments/bench_suite.py --out /tmp/suite --wait-s {budget_s - 20:g} "
                  "--copy-to $OUT"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", default=[], help="bench_suite.py --out folders")
    ap.add_argument("--out", type=Path, help="where the tables and the plot go")
    ap.add_argument("--print-commands", action="store_true", help="print the suite calls that fill the missing cells")
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds of one device call (default: 540)")
    ap.add_argument("--suite-out", default="experiments/results/tables", help="--out of the printed suite commands")
    args = ap.parse_args(argv)
    missing = [d for d in args.runs if not d.is_dir()]
    if missing:
        ap.error(f"--runs {missing[0]} is not a folder: name bench_suite.py --out folders.")
    if args.print_commands:
        print(print_commands(load_runs(args.runs) if args.runs else [], args.budget_s, args.suite_out))
        return 0
    if not args.runs or args.out is None:
        ap.error("--runs and --out are required (or --print-commands).")
    try:
        paths = write_tables(args.runs, args.out)
    except ValueError as e:
        ap.error(str(e))
    for p in paths[:-1]:
        print(p.read_text())
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
