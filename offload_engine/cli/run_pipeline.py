"""`offload-engine run --pipeline N`: the layers split into N stages, one process per stage (one
GPU each), every stage offloading with its own placement. Also what each process of
`torchrun --nproc-per-node N ... -m offload_engine run --pipeline N` runs (several hosts:
torchrun's --nnodes/--node-rank/--master-addr)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace

from offload_engine.policies.memory import GiB, Workload
from offload_engine.policies.placement import Policy

from ..errors import EngineError
from ..metrics import RunMetrics, check_output_file, git_commit, hardware, report, write_json_atomic
from ..sampling import GenerationConfig
from .options import finite_float, positive_int


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("pipeline parallelism (one process per stage, one GPU each)")
    g.add_argument("--pipeline", type=positive_int, default=1, metavar="N",
                   help="split the layers into N contiguous stages balanced by cost (the cost model's with "
                        "--hardware, else parameter count) and run each in its own process: torch.distributed, "
                        "hidden states and tokens through pinned host memory (gloo); embeddings on the first stage, the LM head on the last "
                        "(default: 1, no pipeline)")
    g.add_argument("--micro-batches", type=positive_int, default=None, metavar="M",
                   help="blocks of gpu-batch-size x num-gpu-batches sequences in flight through the pipeline; "
                        "the batch is M blocks (default: one per stage, which keeps every stage busy)")
    g.add_argument("--stage-affinity", choices=["gpu-node", "none"], default="gpu-node",
                   help="gpu-node: each GPU stage's threads on the cores local to its GPU (its NUMA node), shared "
                        "evenly among the stages there, so its pinned memory and cache sit on that node; none: every "
                        "stage on all cores, threads split by count (default: gpu-node)")
    g.add_argument("--stage-percent", nargs=7, type=finite_float, action="append", default=[],
                   metavar=("STAGE", "P", "P", "P", "P", "P", "P"),
                   help="one stage's placement instead of --percent, e.g. --stage-percent 1 0 100 100 0 100 0 "
                        "(repeat for other stages); memory is checked per stage (the split itself is balanced "
                        "for --percent)")


def pipeline_requested(args: argparse.Namespace) -> bool:
    return args.pipeline > 1 or bool(args.stage_percent) or args.micro_batches is not None


def stage_policies(args: argparse.Namespace, base: Policy, stages: int) -> list[Policy]:
    policies = [base] * stages
    for entry in args.stage_percent:
        stage = entry[0]
        if stage != int(stage) or not 0 <= stage < stages:
            raise EngineError(f"--stage-percent names stage {entry[0]:g}, but the stages are 0 to {stages - 1}.",
                              "Give the stage index first, then six percentages.")
        percent = Policy.from_percent(entry[1:])
        policies[int(stage)] = replace(base, **{f: getattr(percent, f) for f in (
            "weight_gpu_percent", "weight_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
            "act_gpu_percent", "act_cpu_percent")})
    return policies


def execute_pipeline(args: argparse.Namespace, resolved, policy: Policy, work: Workload,
                     gen: GenerationConfig) -> dict | None:
    from ..pipeline import PipelineJob, launched_by_torchrun, run_pipeline
    from ..pipeline.launch import stage_entry
    from ..pipeline.split import stage_split
    from .options import engine_options
    from .run import print_kv_budget, synthetic_prompts

    model, stages = resolved.config, args.pipeline
    if stages < 2:
        raise EngineError("--stage-percent and --micro-batches need a pipeline.", "Add --pipeline N with N >= 2.")
    if args.policy == "auto":
        raise EngineError("--policy auto plans one process, not a pipeline.",
                          "Give the placement with --percent (and --stage-percent per stage).")
    blocks = args.micro_batches or stages
    hw = None
    if args.hardware is not None:
        from .search import hardware_for
        hw = hardware_for(args)
    splits, costs, unit = stage_split(model, policy, work, stages, hw)
    policies = stage_policies(args, policy, stages)
    prompts = synthetic_prompts(model, policy.batch_size * blocks, work.prompt_len, args.seed)
    job = PipelineJob(model, policies, splits, blocks, work, engine_options(args, resolved.source), prompts,
                      generation=gen, stage_affinity=args.stage_affinity == "gpu-node")
    torchrun = launched_by_torchrun()
    if not torchrun:
        if args.json is not None:
            check_output_file(args.json)
        print(f"{model.name} ({resolved.weights_label}), {stages} stages, batch {policy.gpu_batch_size}x"
              f"{policy.num_gpu_batches}x{blocks} micro-batches, {work.prompt_len}+{work.gen_len} tokens", file=sys.stderr)
        print_kv_budget(policy, work)
        for k, r in enumerate(splits):
            print(f"  stage {k}: layers {r.start}-{r.stop - 1} ({costs[k]:.3g} {unit.split(' ')[0]}), "
                  f"--percent {' '.join(f'{p:g}' for p in policies[k].percent)}", file=sys.stderr)
        result = run_pipeline(job)
    else:
        import os
        if int(os.environ["WORLD_SIZE"]) != stages:
            raise EngineError(f"torchrun started {os.environ['WORLD_SIZE']} processes for --pipeline {stages}.",
                              "Give torchrun as many processes in all as --pipeline stages.")
        if int(os.environ["RANK"]) == 0 and args.json is not None:
            check_output_file(args.json)
        result = stage_entry(job)
        if result is None:  # not rank 0: rank 0 reports
            return None
    return _report(args, resolved, job, result, costs, unit)


def _report(args, resolved, job, result: dict, costs: list[float], unit: str) -> dict:
    work, policy = job.workload, job.policies[0]
    steps = result["tokens"].shape[1]
    decode_s = result["decode_s"]
    if args.cut_gen_len is not None and steps > 1:  # FlexGen's extrapolation, as in a one-process run
        decode_s, steps = decode_s / (steps - 1) * (work.gen_len - 1), work.gen_len
    metrics = RunMetrics(job.batch_size, work.prompt_len, steps, result["prefill_s"], decode_s)
    model, stages = job.model, result["stages"]
    sizes = {"model_gib": sum(s["model_gib"] for s in stages), "cache_gib": sum(s["cache_gib"] for s in stages),
             "hidden_gib": job.batch_size * work.prompt_len * model.hidden_size * stages[0]["itemsize"] / GiB}
    peaks = {k: max(s["peak_memory"].get(k, 0.0) for s in stages) for k in stages[0]["peak_memory"]}  # per process
    print(report(metrics, sizes, peaks))
    for s, cost in zip(result["stages"], costs):
        s["cost"] = cost
        split = f" (bubble {s['bubble_s']:.3f}, transfer {s['transfer_s']:.3f})" if s["bubble_s"] is not None else ""
        print(f"stage {s['stage']} (layers {s['layers'][0]}-{s['layers'][1] - 1}, {s['device']}, cores {s['cores']}): busy "
              f"{s['busy_s']:.3f} s, waiting for input {s['wait_input_s']:.3f} s{split}, for sends "
              f"{s['wait_send_s']:.3f} s, sent {s['sent_bytes'] / 2**20:.1f} MiB, start-up {s['startup_s']['total']:.1f} s "
              f"(pinning {s['startup_s']['pinning']:.1f} s)"
              + ("; decode step busy: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(s["decode_step_busy_s"].items()))
                 if s["decode_step_busy_s"] else ""))
    data = {
        "model": model.name, "weights": resolved.weights_label, "dtype": stages[0]["dtype"],
        "policy": asdict(policy), "workload": asdict(work),
        "metrics": metrics.as_dict(), "sizes_gib": sizes, "peak_memory_per_stage_max": peaks,
        "cut_gen_len": args.cut_gen_len, "kv_budget": policy.kv.kept_tokens(work.prompt_len),
        "pipeline": {"stages": job.stages, "micro_batches": job.blocks, "split_by": unit, "stage_link": "host (gloo)",
                     "stage_policies": [asdict(p) for p in job.policies], "per_stage": result["stages"]},
        "hardware": hardware(), "commit": git_commit(), "command": args.argv,
    }
    if args.json:
        write_json_atomic(args.json, data)
        print(f"results written to {args.json}", file=sys.stderr)
    return data
