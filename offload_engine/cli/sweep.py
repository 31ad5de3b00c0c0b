"""`offload-engine sweep`: run a grid of `offload-engine run` settings, one process per point,
resumable; results in OUT/sweep.jsonl and OUT/sweep.csv, plots beside them.

Every flag of `run` is accepted here with one or more values, built from the run parser itself,
so the two commands cannot drift apart; the grid and the runner live in `offload_engine/sweep/`.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..sweep import Sweep, SweepError, expand, latest, read_grid, run_flags

DESCRIPTION = """\
Run `offload-engine run` for every combination of the values given (the cartesian product), one
engine process per point with a timeout, so a point that runs out of memory, crashes or hangs
ends only itself. Each point is recorded as soon as it ends, in OUT/sweep.jsonl (the run's whole
JSON: metrics, planned memory, policy, hardware; or its failure) and OUT/sweep.csv (settings,
token/s, latencies, peak GPU memory, status, error); its output is in OUT/logs/ID.log.

A status is ok, no_fit (the plan was refused before allocating), oom, timeout or error. Running
the same command again resumes: points already in sweep.jsonl are skipped (--retry-failed reruns
the failed ones, --force all). Every point (its flags, its --model) is checked before the first
one runs; the sweep exits non-zero when every point it ran failed. Ctrl-C or SIGTERM kills the
point in flight and keeps every point that finished. At the end (and after each point)
OUT/throughput_vs_latency.png is drawn, and OUT/predicted_vs_measured.png where the runs carry a
predicted throughput (needs matplotlib).
"""

EXAMPLES = """\
examples:
  offload-engine sweep --model opt-125m --gpu-batch-size 1 2 4 --num-gpu-batches 1 2 \\
      --percent "100 0 100 0 100 0" "50 50 100 0 100 0" --kv-policy full h2o --out results/
                                         # 3 x 2 x 2 x 2 = 24 points; quote each --percent value
  offload-engine sweep --grid grid.toml --out results/
  offload-engine sweep --grid grid.toml --model opt-1.3b --out results-1.3b/   # a flag replaces the file's key
  offload-engine sweep --grid grid.toml --out results/ --dry-run   # the points and commands; runs nothing
  offload-engine sweep --grid grid.toml --out results/             # again after Ctrl-C: resumes
  offload-engine sweep --grid grid.toml --out results/ --retry-failed --timeout-s 3600

grid.toml (keys are run flags without dashes; a value or a list of values; [fixed] for all points):
  gpu-batch-size = [8, 16, 32]
  kv-policy = ["full", "h2o"]
  percent = ["100 0 100 0 100 0", "50 50 100 0 100 0"]   # or [[100, 0, 100, 0, 100, 0], [...]]
  cpu-cache-compute = [true, false]                      # switches take true/false (on/off)

  [fixed]
  model = "opt-1.3b"
  prompt-len = 512
  gen-len = 32
  gpu-mem = "16GiB"
"""


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive number of seconds")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of `run` settings, one process each, resumable, with plots",
                       usage="offload-engine sweep --out DIR [--grid TOML] [--RUN-FLAG VALUE [VALUE ...] ...] "
                             "[--timeout-s S] [--retry-failed | --force] [--dry-run]",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("sweep")
    s.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="results folder: sweep.jsonl, sweep.csv, logs/, plots (created; reused to resume)")
    s.add_argument("--grid", type=Path, default=None, metavar="TOML",
                   help="the grid from a TOML file (see below); flags given too replace its keys")
    s.add_argument("--timeout-s", type=_positive_seconds, default=1800.0,
                   help="seconds one point may run before it is killed and recorded as timeout (default: 1800)")
    s.add_argument("--retry-failed", action="store_true",
                   help="rerun points recorded as no_fit, oom, timeout or error")
    s.add_argument("--force", action="store_true", help="rerun every point, even those already recorded")
    s.add_argument("--dry-run", action="store_true", help="print the points and their commands; run nothing")
    r = p.add_argument_group("run flags", "any flag of `offload-engine run` (see its --help), each with one or more "
                                          "values to sweep;\nswitches take on/off values, alone they mean on")
    for flag in run_flags().values():
        help_text = flag.help  # already %-escaped for argparse, as in `run --help`
        if flag.kind in ("switch", "toggle"):
            r.add_argument(f"--{flag.name}", dest=f"grid_{flag.dest}", nargs="*", metavar="on|off", help=help_text)
            if flag.kind == "toggle":
                r.add_argument(f"--no-{flag.name}", dest=f"grid_{flag.dest}", action="store_const", const=["off"],
                               help=f"the same as --{flag.name} off")
        else:
            r.add_argument(f"--{flag.name}", dest=f"grid_{flag.dest}", nargs="+", metavar="V", help=help_text)
    p.set_defaults(execute=execute)


def grid_from_args(args: argparse.Namespace):
    """(swept, fixed): the TOML file's, with the flags given here replacing its keys."""
    swept, fixed = read_grid(args.grid) if args.grid else ({}, {})
    for flag in run_flags().values():
        values = getattr(args, f"grid_{flag.dest}")
        if values is None:
            continue
        fixed.pop(flag.name, None)
        swept[flag.name] = values if values or flag.kind not in ("switch", "toggle") else ["on"]
    return swept, fixed


def execute(args: argparse.Namespace) -> list[dict]:
    points = expand(*grid_from_args(args))
    sweep = Sweep(points, args.out, timeout_s=args.timeout_s, retry_failed=args.retry_failed, force=args.force)
    if args.dry_run:
        todo = {p.id for p in sweep.pending()}
        recorded = {r.get("id"): r.get("status") for r in latest(sweep.records())}
        print(f"{len(points)} points, {len(todo)} to run, results in {args.out}")
        for p in points:
            was = f" ({recorded[p.id]})" if p.id in recorded else ""
            print(f"{p.id} {'to run' if p.id in todo else 'done'}{was}: {p.label()}\n"
                  f"  $ {shlex.join(p.command(args.out.resolve() / f'.point-{p.id}.json'))}")
        return []
    try:
        written = sweep.run()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the point in flight was stopped; the {len(sweep.records())} finished points are "
                                f"in {sweep.jsonl}; run the same command again to resume") from None
    records = sweep.records()
    counts: dict[str, int] = {}
    for r in written:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"
    print(f"{len(written)} points run now ({summary}); {len(records)} records in {sweep.jsonl} and {sweep.csv}")
    failed = [r for r in written if r["status"] != "ok"]
    if failed and len(failed) == len(written):  # nothing measured: a script must not read it as success
        raise SweepError(f"all {len(failed)} points run now failed ({summary}); their logs are in "
                         f"{args.out / 'logs'}.", "Read a log, fix the grid, and rerun with --retry-failed.")
    if failed:
        print(f"{len(failed)} of {len(written)} points failed; their logs are in {args.out / 'logs'}")
    return written
