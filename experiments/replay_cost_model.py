"""Predicted against measured, again: today's cost model over runs measured earlier.

A cost-model change is checked against every measurement on record without device time: each
run's command line gives its model, workload and policy, the profile of the machine it ran on
gives the rates, and the run's JSON gives what it measured.

  PYTHONPATH=. python experiments/replay_cost_model.py --hardware hw.json RUNS...

RUNS: sweep ledgers (`sweep.jsonl`, from `offload-engine sweep`) or result files (`offload-engine
run --json`). Prints a markdown table; `--json FILE` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.cli import build_parser  # noqa: E402
from offload_engine.cli.options import policy_from_args  # noqa: E402
from offload_engine.metrics import write_json_atomic  # noqa: E402
from offload_engine.model_zoo import resolve_model  # noqa: E402
from offload_engine.policies.cost_model import estimate  # noqa: E402
from offload_engine.policies.hardware import HardwareProfile  # noqa: E402
from offload_engine.policies.memory import Workload  # noqa: E402


def measured_runs(path: Path) -> list[tuple[list[str], float]]:
    """(the run's `offload-engine run` arguments, its measured token/s) of every finished run in a file."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        results = [r["result"] for r in records if r.get("status") == "ok" and r.get("result")]
    else:
        results = [json.loads(path.read_text())]
    out = []
    for result in results:
        argv = result["command"]
        argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        out.append((argv[argv.index("run") + 1:], result["metrics"]["total_throughput"]))
    return out


def replay(argv: list[str], hw: HardwareProfile) -> dict | None:
    """The run's prediction now, or None for a run this model does not predict (a pipeline, or a
    policy searched at run time, which the command line does not spell out)."""
    args = build_parser().parse_args(["run", *argv])
    if args.pipeline > 1 or args.policy == "auto":
        return None
    policy, work = policy_from_args(args), Workload(args.prompt_len, args.gen_len)
    if args.gpu_mem:
        hw = replace(hw, gpu_mem_bytes=args.gpu_mem)
    model = resolve_model(args.model, dummy=True).config
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float16
    est = estimate(model, policy, work, hw, dtype)
    return {"model": model.name, "percent": " ".join(f"{p:g}" for p in policy.percent),
            "batch": f"{policy.gpu_batch_size}x{policy.num_gpu_batches}", "cpu_attention": policy.cpu_cache_compute,
            "predicted_token_s": est.throughput, "parts_s": est.parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", type=Path, required=True, help="the profile of the machine the runs ran on")
    parser.add_argument("runs", type=Path, nargs="+", help="sweep.jsonl ledgers or `run --json` result files")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    hw = HardwareProfile.load(args.hardware)
    rows = []
    for path in args.runs:
        for argv, measured in measured_runs(path):
            row = replay(argv, hw)
            if row is None:
                print(f"skipped (a pipeline or --policy auto): {' '.join(argv)}", file=sys.stderr)
                continue
            row |= {"measured_token_s": measured, "source": str(path)}
            row["error"] = row["predicted_token_s"] / measured - 1
            rows.append(row)
    print("| model | placement | batch | CPU attention | measured | predicted | error |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | `{r['percent']}` | {r['batch']} | {'yes' if r['cpu_attention'] else ''} | "
              f"{r['measured_token_s']:.1f} | {r['predicted_token_s']:.1f} | {r['error'] * 100:+.1f}% |")
    within = sum(abs(r["error"]) <= 0.25 for r in rows)
    print(f"\n{within} of {len(rows)} within 25%")
    if args.json:
        write_json_atomic(args.json, {"hardware": str(args.hardware), "rows": rows, "within_25pct": within})
    return 0


if __name__ == "__main__":
    sys.exit(main())
