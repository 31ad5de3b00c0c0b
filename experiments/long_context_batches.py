"""The largest batch the memory plan allows at long context, per KV placement (no GPU needed).

  PYTHONPATH=. python experiments/long_context_batches.py --out experiments/results/long_context_batches \
      [--gpu-mem 78GiB --cpu-mem 120GiB] [--model llama-3.1-8b]

For each context (32k, 128k, 1M tokens + 32 generated) and placement, the engine's own plan
(`Engine(..., EngineOptions(dry_run=True))`: the caps as given, the prefill chunk it would choose,
nothing allocated) is asked for the largest batch that fits, by bisection. The default caps are
the lent H100's: 78 GiB of GPU memory, 120 GiB of the host's 125 for pinned memory. Placements:
full attention with its cache on the GPU; HiP with its cache in pinned host memory, 16-bit and
4-bit; the hidden states in host memory where the cache is (they are a batch x prompt x hidden
tensor: 1 GiB a sequence at 128k). Writes <out>/long_context_batches.json (hardware, commit,
settings, each plan's parts at the largest batch) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from offload_engine.cli.options import memory_size  # noqa: E402
from offload_engine.engine import Engine, EngineOptions  # noqa: E402
from offload_engine.errors import EngineError  # noqa: E402
from offload_engine.io.tiers import Tier  # noqa: E402
from offload_engine.metrics import git_commit, hardware, write_json_atomic  # noqa: E402
from offload_engine.model_zoo import MODEL_CONFIGS  # noqa: E402
from offload_engine.policies import Compression, KVSettings  # noqa: E402
from offload_engine.policies.memory import Workload  # noqa: E402
from offload_engine.policies.placement import Policy  # noqa: E402

GiB = 1 << 30
CONTEXTS = (32_000, 128_000, 1_000_000)
GEN = 32
PLACEMENTS = {
    "full, cache on the GPU": dict(percent=(100, 0, 100, 0, 100, 0), kv=KVSettings()),
    "HiP, cache in host memory": dict(percent=(100, 0, 0, 100, 0, 100), kv=KVSettings("hip")),
    "HiP, 4-bit cache in host memory": dict(percent=(100, 0, 0, 100, 0, 100), kv=KVSettings("hip"),
                                            compress_cache=Compression()),
}


def plan_for(model, placement: dict, batch: int, context: int, opts: EngineOptions):
    """The plan at this batch, or None where it does not fit."""
    kw = dict(placement)
    policy = Policy.from_percent(kw.pop("percent"), gpu_batch_size=batch, **kw)
    try:
        return Engine(model, policy, Workload(context, GEN), opts).plan
    except EngineError:
        return None


def largest_batch(model, placement: dict, context: int, opts: EngineOptions, limit: int = 4096):
    """(batch, plan) of the largest batch that fits, (0, None) if not even one sequence does."""
    if plan_for(model, placement, 1, context, opts) is None:
        return 0, None
    low, high = 1, 2
    while high <= limit and plan_for(model, placement, high, context, opts) is not None:
        low, high = high, 2 * high
    while high - low > 1:  # low fits, high does not
        mid = (low + high) // 2
        low, high = (mid, high) if plan_for(model, placement, mid, context, opts) is not None else (low, mid)
    return low, plan_for(model, placement, low, context, opts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--gpu-mem", type=memory_size, default=memory_size("78GiB"))
    ap.add_argument("--cpu-mem", type=memory_size, default=memory_size("120GiB"))
    args = ap.parse_args(argv)
    opts = EngineOptions(dry_run=True, gpu_mem_bytes=args.gpu_mem, cpu_mem_bytes=args.cpu_mem, dtype=torch.float16,
                         device="cpu", offload_dir=args.out / "offload", progress=False)
    rows = []
    for context in CONTEXTS:
        base = MODEL_CONFIGS[args.model]
        model = base if context + GEN <= base.max_positions else base.with_max_positions(1 << 20)
        for name, placement in PLACEMENTS.items():
            batch, plan = largest_batch(model, placement, context, opts)
            row = {"context": context, "placement": name, "largest_batch": batch}
            if plan is not None:
                row["prefill_chunk"] = plan.prefill_chunk
                row["gib"] = {t.value: {k: v / GiB for k, v in asdict(plan.tiers[t]).items() if v}
                              for t in Tier if plan.tiers[t].total}
            rows.append(row)
            print(f"{context:>9} {name:<34} batch {batch}", flush=True)
    lines = [f"{args.model}, fp16, caps {args.gpu_mem / GiB:.0f} GiB GPU / {args.cpu_mem / GiB:.0f} GiB host, "
             f"+{GEN} generated tokens: the largest batch the plan allows", "",
             "| context | " + " | ".join(PLACEMENTS) + " |", "|---:|" + "---:|" * len(PLACEMENTS)]
    for context in CONTEXTS:
        cells = [str(r["largest_batch"]) for r in rows if r["context"] == context]
        lines.append(f"| {context:,} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_context_batches.md").write_text(table)
    write_json_atomic(args.out / "long_context_batches.json", {
        "model": args.model, "gen_len": GEN, "caps": {"gpu_mem": args.gpu_mem, "cpu_mem": args.cpu_mem},
        "placements": {k: {**v, "kv": asdict(v["kv"]),
                           "compress_cache": asdict(v["compress_cache"]) if "compress_cache" in v else None}
                       for k, v in PLACEMENTS.items()},
        "rows": rows, "hardware": hardware(), "commit": git_commit(), "command": sys.argv})


if __name__ == "__main__":
    main()
