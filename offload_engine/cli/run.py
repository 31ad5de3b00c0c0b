"""`offload-engine run`: build the engine for a policy, generate on synthetic prompts, report
throughput (FlexGen's report, and JSON with the policy, plan, hardware and commit)."""
from __future__ import annotations

import argparse
from dataclasses import asdict
import sys
import time
from pathlib import Path

import torch

from offload_engine.policies.memory import GiB, Workload
from offload_engine.policies.placement import Policy

from ..config import ModelConfig
from ..errors import EngineError, format_size
from ..metrics import (PeakHostMemory, RunMetrics, check_output_file, git_commit, hardware, peak_memory, report,
                       write_json_atomic)
from ..sampling import GenerationConfig
from ..io.tiers import Tier
from .run_pipeline import add_pipeline_args, execute_pipeline, pipeline_requested
from .options import (add_model_args, add_policy_args, add_positions_arg, add_resource_args, add_sampling_args,
                      engine_options, model_from_args, policy_from_args, positive_int)

DESCRIPTION = """\
Generate for a batch of synthetic prompts and report throughput as FlexGen defines it:
generated tokens / (prefill time + decode time). One short untimed pass runs first.
"""

EXAMPLES = """\
examples:
  offload-engine run                                  # small model, dummy weights, any machine
  offload-engine run --model opt-6.7b --prompt-len 512 --gen-len 32 --gpu-batch-size 32
  offload-engine run --model opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 24 \\
      --num-gpu-batches 2 --cpu-cache-compute --gpu-mem 16GiB --json results.json
  offload-engine run --model ./my-opt-checkpoint --gen-len 16     # real weights from a folder
  offload-engine run --model opt-30b --pipeline 2 --percent 20 80 0 100 0 100 --gpu-batch-size 24 \\
      --gpu-mem 16GiB                                 # two stages, one GPU each, each offloading
  torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 1 \\
      -m offload_engine run --model opt-66b --pipeline 2 ...       # the same across hosts
"""


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate for a batch of synthetic prompts and report throughput",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_positions_arg(p)
    w = p.add_argument_group("workload")
    w.add_argument("--prompt-len", type=positive_int, default=32, help="prompt tokens per sequence (default: 32)")
    w.add_argument("--gen-len", type=positive_int, default=8, help="tokens to generate per sequence (default: 8)")
    w.add_argument("--dry-run", action="store_true",
                   help="print the plan (per tier: weights, KV cache, HiP hot cache, working memory; the batch and "
                        "prefill chunk) for the caps given, which may describe another machine (--gpu-mem, "
                        "--cpu-mem), allocate nothing, and exit 0 when it fits, 2 when it does not")
    w.add_argument("--cut-gen-len", type=positive_int, default=None, metavar="N",
                   help="plan for --gen-len but decode only N tokens and extrapolate the decode time to --gen-len, "
                        "as FlexGen's option of the same name does (sound where a step's cost does not grow with "
                        "the length, e.g. an H2O cache at its budget; the JSON records it)")
    add_policy_args(p)
    a = p.add_argument_group("automatic policy")
    a.add_argument("--policy", choices=["manual", "auto"], default="manual",
                   help="auto: search the placement, batch and CPU attention with the cost model (see "
                        "`offload-engine search`) and run the best; the compression and KV policy flags are kept")
    a.add_argument("--hardware", type=Path, default=None, metavar="FILE",
                   help="a profile from `offload-engine profile`: with --policy auto it drives the search "
                        "(default: a quick measurement now); with a manual policy the JSON gets the prediction")
    add_resource_args(p)
    add_pipeline_args(p)
    add_sampling_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write the results (throughput, memory, policy, hardware, commit) as JSON")
    o.add_argument("--profile", action="store_true",
                   help="measure busy time per category (weight I/O, KV I/O, compute) per decode step")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(execute=execute)


def synthetic_prompts(model: ModelConfig, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """Random token ids: throughput does not depend on the text, but constant tokens would skew attention."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.vocab_size, (batch, prompt_len), generator=gen)
    ids[:, 0] = model.bos_token_id
    return ids


def execute(args: argparse.Namespace) -> dict:
    from ..engine import Engine, describe_gpu_tier

    resolved = model_from_args(args, dummy=args.dummy)
    model, policy, work = resolved.config, policy_from_args(args), Workload(args.prompt_len, args.gen_len)
    if args.cut_gen_len is not None and not 2 <= args.cut_gen_len <= args.gen_len:
        raise EngineError(f"--cut-gen-len {args.cut_gen_len} must be between 2 and --gen-len {args.gen_len}.")
    decoded = args.cut_gen_len or args.gen_len
    gen = GenerationConfig(max_new_tokens=decoded, do_sample=args.do_sample, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, stop_token_id=args.stop_token)
    gen.check_vocab(model.vocab_size)
    if pipeline_requested(args):
        return execute_pipeline(args, resolved, policy, work, gen)
    predicted = None
    if args.policy == "auto":
        policy, predicted = _searched(args, model, work, policy)
    elif args.hardware is not None:
        from offload_engine.policies.cost_model import estimate
        from .search import hardware_for
        predicted = estimate(model, policy, work, hardware_for(_search_args(args)), _run_dtype(args))
    if args.json is not None:
        check_output_file(args.json)
    print(f"{model.name} ({resolved.weights_label}), batch {policy.gpu_batch_size}x{policy.num_gpu_batches}, "
          f"{work.prompt_len}+{work.gen_len} tokens, --percent {' '.join(f'{p:g}' for p in policy.percent)}",
          file=sys.stderr)
    print(describe_gpu_tier(args.device), file=sys.stderr)
    print_kv_budget(policy, work)
    if args.dry_run:
        return dry_run(args, model, policy, work, engine_options(args, resolved.source))
    started = time.perf_counter()
    with PeakHostMemory() as loading:
        engine = Engine(model, policy, work, engine_options(args, resolved.source))
    startup = {"total": time.perf_counter() - started, "pinning": engine.pin_seconds}
    print(f"start-up {startup['total']:.1f} s (pinning host memory {startup['pinning']:.1f} s)", file=sys.stderr)
    with engine:
        plan = engine.plan
        print_plan(plan, file=sys.stderr)
        if plan.weight_formats:
            print(f"compressed weights kept as the checkpoint stores them: {kept_blocks(plan)} tensors; the others "
                  f"quantized to {policy.compress_weight.bits}-bit groups of {policy.compress_weight.group_size}",
                  file=sys.stderr)
        prompts = synthetic_prompts(model, policy.batch_size, work.prompt_len, args.seed)
        # One short untimed pass first, as FlexGen does: library and kernel start-up is not throughput.
        # Two tokens when the decode step is captured, so the capture happens here too.
        warm = 2 if engine.decode_graph is not None and work.gen_len > 1 else 1
        engine.generate(prompts[:, -min(32, work.prompt_len):], None, GenerationConfig(max_new_tokens=warm))
        kv_policy = engine.kv.policy
        fetched = kv_policy.fetched_bytes() if hasattr(kv_policy, "fetched_bytes") else None
        result = engine.generate(prompts, None, gen)
        hit_rate = kv_policy.hit_rate() if hasattr(kv_policy, "hit_rate") else None
        if fetched is not None:  # HiP's hot-block misses: bytes over PCIe per decode step
            fetched = (kv_policy.fetched_bytes() - fetched) / max(1, result.tokens.shape[1] - 1)
    steps = result.tokens.shape[1]
    decode_s = result.decode_s
    if args.cut_gen_len is not None and steps > 1:  # FlexGen's extrapolation: mean step time x all steps
        decode_s, steps = result.decode_s / (steps - 1) * (work.gen_len - 1), work.gen_len
    metrics = RunMetrics(policy.batch_size, work.prompt_len, steps, result.prefill_s, decode_s)
    sizes = {"model_gib": plan.model_bytes / GiB, "cache_gib": plan.cache_bytes / GiB,
             "hidden_gib": policy.batch_size * work.prompt_len * model.hidden_size * engine.dtype.itemsize / GiB}
    peaks = peak_memory()
    print(report(metrics, sizes, peaks))
    print(f"decode step: {'CUDA graph' if engine.decode_graph is not None else 'eager'}"
          + (f" ({engine.graph_refusal})" if engine.graph_refusal else ""), file=sys.stderr)
    if hit_rate is not None:
        print(f"HiP hot-block cache hit rate: {hit_rate:.1%}"
              + (f", {fetched / 2**20:.2f} MiB fetched from the KV home per decode step" if fetched else ""))
    if result.decode_split_s:
        print("decode step busy time: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(result.decode_split_s.items())))
    data = {
        "model": model.name, "weights": resolved.weights_label, "dtype": str(engine.dtype).replace("torch.", ""),
        "device": str(engine.device), "policy": asdict(policy), "workload": asdict(work),
        "metrics": metrics.as_dict(), "sizes_gib": sizes, "peak_memory": peaks,
        "loading_host_gib": {"added_peak": loading.added_bytes / GiB,
                             "planned_cpu": plan.persistent_bytes(Tier.CPU) / GiB},
        "planned_gib": {t.value: plan.tiers[t].total / GiB for t in Tier},
        "startup_s": startup,
        "disk_relay": asdict(engine.relay_settings) if engine.relay_settings else None,
        "cold_disk": {"resident_after_eviction": engine.cold_disk_resident} if engine.options.cold_disk else None,
        "decode_step_busy_s": result.decode_split_s, "hip_hot_cache_hit_rate": hit_rate,
        "hip_fetched_bytes_per_step": fetched,
        "prefill_chunk": engine.scheduler.prefill_chunk,
        "cuda_graph": engine.decode_graph is not None, "cuda_graph_refusal": engine.graph_refusal,
        "cut_gen_len": args.cut_gen_len, "kv_budget": policy.kv.kept_tokens(work.prompt_len),
        "weights_kept_as_stored": kept_blocks(plan),
        "predicted": None if predicted is None else {
            "total_throughput": predicted.throughput, "prefill_s": predicted.prefill_s, "step_s": predicted.step_s,
            "parts_s": predicted.parts},
        "hardware": hardware(), "commit": git_commit(),
        "command": args.argv,
    }
    if args.json:
        write_json_atomic(args.json, data)
        print(f"results written to {args.json}", file=sys.stderr)
    return data


def print_plan(plan, file=None) -> None:
    """Bytes per tier, and what they hold."""
    file = file or sys.stdout
    for tier in Tier:
        b = plan.tiers[tier]
        if b.total:
            print(f"  {tier.value:>4}: {format_size(b.total):>10}  ({b.describe()})", file=file)


def dry_run(args: argparse.Namespace, model: ModelConfig, policy: Policy, work: Workload, opts) -> dict:
    """The plan for the caps given, which may describe another machine; nothing is allocated.
    Raises the refusal (exit 2) after printing the plan that did not fit."""
    from dataclasses import replace

    from ..engine import Engine

    try:
        plan, error = Engine(model, policy, work, replace(opts, dry_run=True)).plan, None
    except EngineError as e:
        plan, error = getattr(e, "plan", None), e
    if plan is not None:
        chunk = f"{plan.prefill_chunk} tokens" if plan.prefill_chunk < work.prompt_len else "the whole prompt"
        dtype = str(opts.dtype or _run_dtype(args)).replace("torch.", "")
        print(f"plan for batch {policy.gpu_batch_size}x{policy.num_gpu_batches} = {policy.batch_size} sequences in "
              f"{dtype}, prefill chunk {chunk}:")
        print_plan(plan)
    if error is not None:
        raise error
    print("fits: nothing was allocated (--dry-run)")
    data = {"model": model.name, "policy": asdict(policy), "workload": asdict(work), "dry_run": True,
            "planned_gib": {t.value: plan.tiers[t].total / GiB for t in Tier},
            "planned_parts_gib": {t.value: {k: v / GiB for k, v in asdict(plan.tiers[t]).items()} for t in Tier},
            "prefill_chunk": plan.prefill_chunk, "caps": {"gpu_mem": args.gpu_mem, "cpu_mem": args.cpu_mem},
            "hardware": hardware(), "commit": git_commit(), "command": args.argv}
    if args.json:
        write_json_atomic(args.json, data)
    return data


def kept_blocks(plan) -> dict[str, int]:
    """How many compressed weights kept the checkpoint's own blocks, by "<bits>-bit/<group>"."""
    counts: dict[str, int] = {}
    for bits, group in plan.weight_formats.values():
        name = f"{bits}-bit/{group}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def print_kv_budget(policy: Policy, work: Workload) -> None:
    """H2O's budget in tokens, at start-up: a ratio of a short prompt is raised to its floor."""
    budget = policy.kv.describe_budget(work.prompt_len)
    if budget:
        print(budget, file=sys.stderr)


def _search_args(args: argparse.Namespace) -> argparse.Namespace:
    """The search's view of the run flags: the caps and the profile, the KV and compression as set."""
    return argparse.Namespace(**vars(args), objective="throughput", max_batch=512,
                              compress=[{(False, False): "none", (True, False): "weight", (False, True): "cache",
                                         (True, True): "both"}[(args.compress_weight, args.compress_cache)]])


def _run_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype the engine will compute in here, which the search and the prediction size at."""
    from ..engine import resolve_device
    from .search import sizing_dtype
    return sizing_dtype(args, cuda=resolve_device(args.device).type == "cuda")


def _searched(args: argparse.Namespace, model: ModelConfig, work: Workload, manual: Policy):
    from dataclasses import replace

    from .search import best_policy
    best, predicted = best_policy(_search_args(args), model, work, _run_dtype(args))
    keep = dict(overlap=manual.overlap, pin_weight=manual.pin_weight, sep_layer=manual.sep_layer,
                cuda_graphs=manual.cuda_graphs, weight_buffers=manual.weight_buffers)
    return replace(best, **keep), predicted
