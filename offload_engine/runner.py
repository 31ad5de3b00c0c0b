"""The `run` command: build the engine for a policy, generate on synthetic prompts, report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from policies.memory import GiB, Workload
from policies.placement import Policy

from .config import ModelConfig
from .engine import Engine, EngineOptions
from .metrics import RunMetrics, git_commit, hardware, peak_memory, report, write_json_atomic
from .sampling import GenerationConfig
from .tiers import Tier

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def synthetic_prompts(model: ModelConfig, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """Random token ids: throughput does not depend on the text, but constant tokens would skew attention."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.vocab_size, (batch, prompt_len), generator=gen)
    ids[:, 0] = model.bos_token_id
    return ids


def run_throughput(args: argparse.Namespace, model: ModelConfig, folder: Path | None, policy: Policy,
                   work: Workload, gen: GenerationConfig) -> dict:
    options = EngineOptions(
        checkpoint=folder, seed=args.seed, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device,
        offload_dir=args.offload_dir, gpu_mem_bytes=int(args.gpu_mem * GiB) if args.gpu_mem else None,
        cpu_mem_bytes=int(args.cpu_mem * GiB) if args.cpu_mem else None, profile=args.profile,
        progress=not args.quiet)
    weights = f"checkpoint {folder}" if folder else "dummy weights"
    print(f"{model.name} ({weights}), batch {policy.gpu_batch_size}x{policy.num_gpu_batches}, "
          f"{work.prompt_len}+{work.gen_len} tokens, --percent {' '.join(f'{p:g}' for p in policy.percent)}",
          file=sys.stderr)
    engine = Engine(model, policy, work, options)
    try:
        plan = engine.plan
        for tier in Tier:
            b = plan.tiers[tier]
            if b.total:
                print(f"  {tier.value:>4}: {b.total / GiB:7.2f} GiB  ({b.describe()})", file=sys.stderr)
        prompts = synthetic_prompts(model, policy.batch_size, work.prompt_len, args.seed)
        # One short untimed pass first, as FlexGen does: library and kernel start-up is not throughput.
        engine.generate(prompts[:, -min(32, work.prompt_len):], None, GenerationConfig(max_new_tokens=1))
        result = engine.generate(prompts, None, gen)
    finally:
        engine.close()
    metrics = RunMetrics(policy.batch_size, work.prompt_len, result.tokens.shape[1], result.prefill_s, result.decode_s)
    sizes = {"model_gib": plan.model_bytes / GiB, "cache_gib": plan.cache_bytes / GiB,
             "hidden_gib": policy.batch_size * work.prompt_len * model.hidden_size * engine.dtype.itemsize / GiB}
    peaks = peak_memory()
    print(report(metrics, sizes, peaks))
    if result.decode_split_s:
        print("decode step busy time: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(result.decode_split_s.items())))
    data = {
        "model": model.name, "weights": weights, "dtype": str(engine.dtype).replace("torch.", ""),
        "device": str(engine.device), "policy": policy.__dict__, "workload": work.__dict__,
        "metrics": metrics.as_dict(), "sizes_gib": sizes, "peak_memory": peaks,
        "planned_gib": {t.value: plan.tiers[t].total / GiB for t in Tier},
        "decode_step_busy_s": result.decode_split_s, "hardware": hardware(), "commit": git_commit(),
        "command": sys.argv,
    }
    if args.json:
        write_json_atomic(args.json, data)
        print(f"results written to {args.json}", file=sys.stderr)
    return data
