"""Pipeline parallelism on two GPUs: OPT-30B 512+32 with each GPU capped at 16 GiB on one GPU and
on two (each stage streams half the weights over its own PCIe link), and OPT-66B (122 GiB of
fp16 weights: more than one host share) on two GPUs with offloading.

  PYTHONPATH=. python experiments/bench_pipeline.py --out DIR [--runs NAME ...] [--dry-run] [--copy-to $OUT]

Run on a two-GPU machine (device kind nvidia-h100-x2 or nvidia-h200-x2; NCCL_NVLS_ENABLE=0 is set
here: NVLink multicast stays off). Each run is `offload-engine run` in its own process group with
a timeout; a run whose batch does not fit (the engine refuses before allocating) is retried with
the next smaller batch. Every finished run is appended to DIR/runs.jsonl at once and skipped by a
rerun at the same commit, so the runs can spread over several 10-minute calls.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.metrics import git_commit, hardware  # noqa: E402
from offload_engine.sweep.results import append_line, read_records  # noqa: E402
from offload_engine.sweep.runner import run_process  # noqa: E402

OPT30B = ["--model", "opt-30b", "--prompt-len", "512", "--gen-len", "32", "--gpu-mem", "16GiB", "--cpu-cache-compute"]
OPT66B = ["--model", "opt-66b", "--prompt-len", "512", "--gen-len", "32", "--gpu-mem", "16GiB", "--cpu-cache-compute",
          "--cut-gen-len", "8"]

# name -> (flags, batches tried in turn: (gpu_batch_size, num_gpu_batches)); the pipeline runs put
# one block per stage in flight, so their batch is twice the block.
RUNS: dict[str, tuple[list[str], list[tuple[int, int]]]] = {
    "opt30b-1gpu": (OPT30B + ["--percent", "20", "80", "0", "100", "0", "100"], [(24, 2)]),
    "opt30b-2gpu": (OPT30B + ["--pipeline", "2", "--percent", "40", "60", "0", "100", "0", "100"],
                    [(24, 2), (24, 1)]),
    "opt66b-2gpu": (OPT66B + ["--pipeline", "2", "--percent", "10", "90", "0", "100", "0", "100"],
                    [(24, 2), (16, 2), (12, 2), (8, 2)]),
}


def command(flags: list[str], batch: tuple[int, int], json_path: Path, offload: Path) -> list[str]:
    return [sys.executable, "-m", "offload_engine", "run", "--quiet", *flags, "--gpu-batch-size", str(batch[0]),
            "--num-gpu-batches", str(batch[1]), "--offload-dir", str(offload), "--json", str(json_path)]


def run_one(name: str, out: Path, commit: str, timeout_s: float) -> dict:
    flags, batches = RUNS[name]
    record = {"name": name, "commit": commit}
    for batch in batches:
        json_path = out / f"{name}.json"
        cmd = command(flags, batch, json_path, out / "offload")
        outcome = run_process(cmd, timeout_s, out / f"{name}.log")
        shutil.rmtree(out / "offload", ignore_errors=True)
        record.update(command=cmd, rc=outcome.rc, wall_s=outcome.wall_s, timed_out=outcome.timed_out,
                      tail=outcome.text[-2000:])
        if outcome.rc == 0 and json_path.exists():
            data = json.loads(json_path.read_text())
            record.update(status="ok", metrics=data["metrics"], pipeline=data.get("pipeline"))
            return record
        if outcome.rc != 2 or "does not fit" not in outcome.text:
            break
    record["status"] = "timeout" if record.get("timed_out") else "failed"
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--timeout-s", type=float, default=540)
    parser.add_argument("--commit", default=None, help="this repository's commit (the device copy has no .git)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--copy-to", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    commit = args.commit or git_commit()
    args.out.mkdir(parents=True, exist_ok=True)
    ledger = args.out / "runs.jsonl"
    done = {r["name"] for r in read_records(ledger) if r.get("status") == "ok" and r.get("commit") == commit}
    for name in args.runs:
        if args.dry_run:
            print(" ".join(command(RUNS[name][0], RUNS[name][1][0], args.out / f"{name}.json", args.out / "offload")))
            continue
        if name in done:
            print(f"{name}: done at {commit}, skipped")
            continue
        record = run_one(name, args.out, commit, args.timeout_s)
        append_line(ledger, json.dumps(record))
        tput = record.get("metrics", {}).get("total_throughput")
        print(f"{name}: {record['status']}" + (f", {tput:.1f} token/s" if tput else ""), flush=True)
        summary = {"hardware": hardware(), "commit": commit, "runs": read_records(ledger)}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if args.copy_to is not None:
            for f in ("runs.jsonl", "summary.json", f"{name}.log"):
                if (args.out / f).exists():
                    shutil.copy(args.out / f, args.copy_to / f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
