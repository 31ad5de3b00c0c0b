"""Pipeline parallelism over GPUs: OPT-30B 512+32 with each GPU capped at 16 GiB on one GPU and
on two (each stage streams half the weights over its own PCIe link), OPT-66B (122 GiB of fp16
weights: more than one host share) on two; and, where 4 or 8 GPUs are lent, the throughput-vs-GPUs
curve of OPT-30B and OPT-66B and OPT-175B over 4 and 8 GPUs.

  PYTHONPATH=. python experiments/bench_pipeline.py --out DIR [--runs NAME ...] [--dry-run] [--copy-to $OUT]

FlexGen's own pipeline (`flexgen.dist_flex_opt`, through experiments/flexgen_peer.py --pipeline N;
runs named flexgen-*) runs on the same settings where it runs offline: carry `.whl` and install it
as experiments/bench_suite.py says.

Run on a machine with the GPUs a run names (the default runs need two: nvidia-h100-x2 /
nvidia-h200-x2; `--budget-s` keeps a call within its limit and a rerun resumes). The stages talk
through host memory (gloo), not NCCL; NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are
set all the same. Each run is `offload-engine run` in its own process group with
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
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.io.tiers import Tier  # noqa: E402
from offload_engine.metrics import git_commit, hardware  # noqa: E402
from offload_engine.sweep.results import append_line, read_records  # noqa: E402
from offload_engine.sweep.runner import run_process  # noqa: E402

COMMON = ["--prompt-len", "512", "--gen-len", "32", "--gpu-mem", "16GiB"]
FLEXGEN_CACHE = ["--compress-cache", "--cache-codec", "token", "--quant-group-size", "64"]  # FlexGen's 4-bit cache
Batch = tuple[int, int]  # (gpu_batch_size, num_gpu_batches) of one block; a pipeline has one block per stage


def point(model: str, gpus: int, percent: str, batches: list[Batch], *extra: str,
          cpu_attention: bool = True) -> tuple[list[str], list[Batch]]:
    flags = ["--model", model, *COMMON, *(["--cpu-cache-compute"] if cpu_attention else []), "--percent",
             *percent.split(), *extra]
    return (flags + (["--pipeline", str(gpus)] if gpus > 1 else []), batches)


# name -> (flags, batches tried in turn while the engine refuses them). The weights' GPU share grows
# with the GPU count: each stage holds 1/N of the layers under the same 16 GiB cap. `--dry-run`
# prints every stage's plan: each fits 16 GiB of GPU, and the host's total its RAM (2 GPUs: 256 GiB,
# 4: 512, 8: 560; the OPT-66B one-GPU point needs a multi-GPU host's RAM).
RUNS: dict[str, tuple[list[str], list[Batch]]] = {
    # Two GPUs (the pipeline issue's benchmark).
    "opt30b-1gpu": point("opt-30b", 1, "20 80 0 100 0 100", [(24, 2)]),
    "opt30b-2gpu": point("opt-30b", 2, "40 60 0 100 0 100", [(24, 2), (24, 1)]),
    # Four blocks in flight: the prefill's fill bubble ((M + N - 1) / M block-times) shrinks from 1.5x to 1.25x.
    "opt30b-2gpu-4mb": point("opt-30b", 2, "40 60 0 100 0 100", [(24, 2), (16, 2)], "--micro-batches", "4"),
    "opt66b-2gpu": point("opt-66b", 2, "10 90 0 100 0 100", [(16, 2), (12, 2), (8, 2)], "--cut-gen-len", "8"),
    # Four and eight GPUs (the scaling curve; OPT-175B with 4-bit KV cache where host memory is short).
    "opt30b-4gpu": point("opt-30b", 4, "78 22 0 100 0 100", [(24, 2), (16, 2)]),  # `80 20`: 24x2 over 16 GiB
    # The same with every stage on all cores (threads split by count): what binding to the GPU's node gives.
    "opt30b-4gpu-any-core": point("opt-30b", 4, "78 22 0 100 0 100", [(24, 2), (16, 2)], "--stage-affinity", "none"),
    "opt30b-8gpu": point("opt-30b", 8, "100 0 0 100 0 100", [(24, 2), (16, 2)]),
    "opt66b-1gpu": point("opt-66b", 1, "5 95 0 100 0 100", [(24, 2), (16, 2), (8, 2)], "--cut-gen-len", "8"),
    "opt66b-4gpu": point("opt-66b", 4, "28 72 0 100 0 100", [(24, 2), (16, 2), (8, 2)], "--cut-gen-len", "8"),
    "opt66b-8gpu": point("opt-66b", 8, "65 35 0 100 0 100", [(16, 2), (8, 2)], "--cut-gen-len", "8"),
    # OPT-175B: each stage streams ~80 GiB of fp16 weights per micro-batch, so the batch is what
    # pays: 16x2 per micro-batch plans 398 of the host's 504 GiB (4-bit cache; 24x2's 442 leaves
    # too little for four processes' own memory); with 4-bit weights too, 64x2 plans 446.
    "opt175b-4gpu": point("opt-175b", 4, "5 95 0 100 0 100", [(16, 2), (8, 2)], *FLEXGEN_CACHE,
                          "--cut-gen-len", "5"),
    # The same with the 4-bit cache attended on the GPU: ~10 GB of packed cache a block pass crosses
    # PCIe beside ~84 GB of weights, instead of the CPU dequantizing it.
    "opt175b-4gpu-gpu-attention": point("opt-175b", 4, "5 95 0 100 0 100", [(16, 2), (8, 2)], *FLEXGEN_CACHE,
                                        "--cut-gen-len", "5", cpu_attention=False),
    "opt175b-4gpu-4bit": point("opt-175b", 4, "0 100 0 100 0 100", [(64, 2), (48, 2), (32, 2)], "--compress-weight",
                               *FLEXGEN_CACHE, "--cut-gen-len", "5"),
    "opt175b-8gpu": point("opt-175b", 8, "22 78 0 100 0 100", [(8, 2), (4, 2), (2, 2)], *FLEXGEN_CACHE,
                          "--cut-gen-len", "5"),
}

# FlexGen's runs: (model, GPUs, percent, (gpu batch size, GPU batches)); it decodes 5 steps and
# extrapolates (its --cut-gen-len), as in the suite.
FLEXGEN: dict[str, tuple[str, int, str, Batch]] = {
    "flexgen-opt30b-1gpu": ("opt-30b", 1, "20 80 0 100 0 100", (24, 2)),
    "flexgen-opt30b-2gpu": ("opt-30b", 2, "20 80 0 100 0 100", (24, 2)),  # 40% of its stage's: out of memory
    "flexgen-opt66b-2gpu": ("opt-66b", 2, "10 90 0 100 0 100", (16, 2)),
    "flexgen-opt30b-4gpu": ("opt-30b", 4, "40 60 0 100 0 100", (24, 2)),
}


TWO_GPUS = ["opt30b-1gpu", "opt30b-2gpu", "opt30b-2gpu-4mb", "opt66b-2gpu", "flexgen-opt30b-2gpu",
            "flexgen-opt66b-2gpu"]  # the default: what a two-GPU machine can run


def flexgen_command(name: str, offload: Path) -> list[str]:
    model, gpus, percent, batch = FLEXGEN[name]
    cmd = [sys.executable, str(ROOT / "experiments" / "flexgen_peer.py"), "--model", f"facebook/{model}",
           "--path", "_DUMMY_", "--prompt-len", "512", "--gen-len", "32", "--cut-gen-len", "5",
           "--percent", *percent.split(), "--gpu-batch-size", str(batch[0]), "--num-gpu-batches", str(batch[1]),
           "--cpu-cache-compute", "--gpu-cap-gib", "16", "--offload-dir", str(offload), "--log-file", os.devnull]
    return cmd + (["--pipeline", str(gpus)] if gpus > 1 else [])


def command(flags: list[str], batch: tuple[int, int], json_path: Path, offload: Path, quiet: bool = True) -> list[str]:
    return [sys.executable, "-m", "offload_engine", "run", *(["--quiet"] if quiet else []), *flags, "--gpu-batch-size", str(batch[0]),
            "--num-gpu-batches", str(batch[1]), "--offload-dir", str(offload), "--json", str(json_path)]


def planned(flags: list[str], batch: Batch) -> str:
    """Each stage's planned GPU and host GiB (fp16, as on the device) and the host's total: what a
    dry run prints, so batches that cannot fit are dropped before device time is spent."""
    from offload_engine.policies.memory import GiB

    stages = stage_plans(flags, batch)
    parts = " ".join(f"{gpu / GiB:.1f}/{cpu / GiB:.1f}" for gpu, cpu in stages)
    return f"stages GPU/CPU GiB {parts}; host {sum(cpu for _, cpu in stages) / GiB:.0f} GiB"


def stage_plans(flags: list[str], batch: Batch) -> list[tuple[int, int]]:
    """(GPU bytes, host bytes) each stage plans, in fp16 as on the device."""
    import torch

    from offload_engine.cli import build_parser
    from offload_engine.cli.options import policy_from_args
    from offload_engine.cli.run_pipeline import stage_policies
    from offload_engine.model_zoo import MODEL_CONFIGS
    from offload_engine.models import build_layers
    from offload_engine.pipeline.split import stage_split
    from offload_engine.policies.memory import Workload, plan_memory

    args = build_parser().parse_args(["run", *flags, "--gpu-batch-size", str(batch[0]), "--num-gpu-batches",
                                      str(batch[1])])
    model, policy, work = MODEL_CONFIGS[args.model], policy_from_args(args), Workload(args.prompt_len, args.gen_len)
    layers = build_layers(model, policy.sep_layer)
    splits, _, _ = stage_split(model, policy, work, args.pipeline)
    out = []
    for r, p in zip(splits, stage_policies(args, policy, args.pipeline)):
        hidden = 2 * p.num_gpu_batches * ((r.start > 0) + (r.stop < len(layers))) if args.pipeline > 1 else 0
        plan = plan_memory(layers[r.start:r.stop], p, work, torch.float16, model.hidden_size, 2,
                           kv_blocks=(args.micro_batches or args.pipeline) if args.pipeline > 1 else 1,
                           pipeline_hidden=hidden)
        out.append((plan.tiers[Tier.GPU].total, plan.tiers[Tier.CPU].total))
    return out


def run_flexgen(name: str, out: Path, timeout_s: float) -> dict:
    from experiments.suite_report import parse_report

    cmd = flexgen_command(name, out / "offload")
    outcome = run_process(cmd, timeout_s, out / f"{name}.log")
    shutil.rmtree(out / "offload", ignore_errors=True)
    record = {"name": name, "system": "flexgen", "version": "0.1.8", "command": cmd, "rc": outcome.rc,
              "wall_s": outcome.wall_s, "timed_out": outcome.timed_out, "tail": outcome.text[-2000:]}
    metrics = parse_report(outcome.text)
    ok = outcome.rc == 0 and "total_throughput" in metrics
    record.update(status="ok" if ok else ("timeout" if outcome.timed_out else "failed"), metrics=metrics)
    return record


def run_one(name: str, out: Path, commit: str, timeout_s: float, quiet: bool = True) -> dict:
    if name in FLEXGEN:
        return run_flexgen(name, out, timeout_s) | {"commit": commit}
    flags, batches = RUNS[name]
    record = {"name": name, "commit": commit, "attempts": []}
    for batch in batches:
        json_path = out / f"{name}.json"
        cmd = command(flags, batch, json_path, out / "offload", quiet)
        outcome = run_process(cmd, timeout_s, out / f"{name}.log")
        shutil.rmtree(out / "offload", ignore_errors=True)
        record.update(command=cmd, rc=outcome.rc, wall_s=outcome.wall_s, timed_out=outcome.timed_out,
                      tail=outcome.text[-2000:])
        if outcome.rc == 0 and json_path.exists():
            data = json.loads(json_path.read_text())
            record.update(status="ok", metrics=data["metrics"], pipeline=data.get("pipeline"))
            return record
        refused = outcome.rc == 2 and "does not fit" in outcome.text
        out_of_memory = "OutOfMemoryError" in outcome.text  # beyond the plan: recorded, the next batch tried
        record["attempts"].append({"batch": list(batch), "rc": outcome.rc,
                                   "reason": "refused" if refused else "out of memory" if out_of_memory else "failed"})
        if not (refused or out_of_memory):
            break
    record["status"] = "timeout" if record.get("timed_out") else "failed"
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", choices=[*RUNS, *FLEXGEN], default=TWO_GPUS)
    parser.add_argument("--timeout-s", type=float, default=540, help="the most one run may take")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole call's seconds: a run gets what is left (none under a minute)")
    parser.add_argument("--commit", default=None, help="this repository's commit (the device copy has no .git)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--copy-to", type=Path, default=None,
                        help="after each run, copy the ledger, the summary and a tarball of the logs here")
    parser.add_argument("--progress", action="store_true",
                        help="let the engine print its start-up progress into each run's log")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    commit = args.commit or git_commit()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.copy_to is not None:
        args.copy_to.mkdir(parents=True, exist_ok=True)
    ledger = args.out / "runs.jsonl"
    done = {r["name"] for r in read_records(ledger) if r.get("status") == "ok" and r.get("commit") == commit}
    deadline = time.monotonic() + (args.budget_s or float("inf"))
    for name in args.runs:
        if args.dry_run and name in FLEXGEN:
            print(" ".join(flexgen_command(name, args.out / "offload")))
            continue
        if args.dry_run:
            flags, batches = RUNS[name]
            print(" ".join(command(flags, batches[0], args.out / f"{name}.json", args.out / "offload",
                                   quiet=not args.progress)))
            for batch in batches:
                print(f"  {batch[0]}x{batch[1]}: {planned(flags, batch)}")
            continue
        if name in done:
            print(f"{name}: done at {commit}, skipped")
            continue
        left = deadline - time.monotonic()
        if left < 60:
            print(f"{name}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        record = run_one(name, args.out, commit, min(args.timeout_s, left), quiet=not args.progress)
        append_line(ledger, json.dumps(record))
        tput = record.get("metrics", {}).get("total_throughput")
        print(f"{name}: {record['status']}" + (f", {tput:.1f} token/s" if tput else ""), flush=True)
        summary = {"hardware": hardware(), "commit": commit, "runs": read_records(ledger)}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if args.copy_to is not None:  # three files, however many runs: the ledger, the summary, the logs
            for f in ("runs.jsonl", "summary.json"):
                shutil.copy(args.out / f, args.copy_to / f)
            with tarfile.open(args.copy_to / "logs.tar.gz", "w:gz") as tar:
                for log in sorted(args.out.glob("*.log")):
                    tar.add(log, arcname=log.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
