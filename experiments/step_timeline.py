"""Where a decode step's time goes across streams: every span the profiler times on the GPU
(compute per layer and GPU batch, CPU attention, each weight tensor's copy, activations), laid
out on one clock for one decode step (device machine).

  PYTHONPATH=. python experiments/step_timeline.py --model opt-30b --percent 20 80 0 100 0 100 \\
      --gpu-batch-size 24 --num-gpu-batches 2 --cpu-cache-compute --gpu-mem 16 --out DIR
  (--h2o 0.1 0.1: H2O's 20% budget instead of the full cache)

Writes DIR/timeline.json (the spans of the middle decode step, ms from its first span) and prints
each category's busy time, the time its stream sat idle inside the step, and the longest idle
gaps with what ran just before them.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI runs it

import torch  # noqa: E402

from offload_engine.cli.run import synthetic_prompts  # noqa: E402
from offload_engine.engine import Engine, EngineOptions  # noqa: E402
from offload_engine.model_zoo import resolve_model  # noqa: E402
from offload_engine.sampling import GenerationConfig  # noqa: E402
from offload_engine.policies.memory import Workload  # noqa: E402
from offload_engine.policies.kv_policy import H2OConfig, KVSettings  # noqa: E402
from offload_engine.policies.placement import Policy  # noqa: E402


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals, sorted."""
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def summarize(spans: list[tuple[str, float, float]], top: int = 8) -> dict:
    """Busy (union) and idle time per category within the step's extent, and the largest idle gaps."""
    lo, hi = min(s for _, s, _ in spans), max(e for _, _, e in spans)
    report = {"step_ms": hi - lo, "categories": {}}
    for cat in sorted({c for c, _, _ in spans}):
        busy = merged([(s, e) for c, s, e in spans if c == cat])
        gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
        report["categories"][cat] = {
            "busy_ms": sum(e - s for s, e in busy), "spans": sum(1 for c, _, _ in spans if c == cat),
            "first_ms": busy[0][0] - lo, "last_ms": busy[-1][1] - lo,
            "largest_gaps_ms": [(round(s - lo, 2), round(e - s, 2)) for s, e in sorted(gaps, key=lambda g: g[0] - g[1])[:top]],
        }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-30b")
    ap.add_argument("--percent", nargs=6, type=float, default=[20, 80, 0, 100, 0, 100])
    ap.add_argument("--gpu-batch-size", type=int, default=24)
    ap.add_argument("--num-gpu-batches", type=int, default=2)
    ap.add_argument("--cpu-cache-compute", action="store_true")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GPU cap in GiB")
    ap.add_argument("--h2o", type=float, nargs=2, metavar=("HH_RATIO", "RECENT_RATIO"), default=None,
                    help="H2O eviction with these budget fractions (e.g. 0.1 0.1) instead of the full cache")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    model = resolve_model(args.model, dummy=True).config
    policy = Policy.from_percent(args.percent, gpu_batch_size=args.gpu_batch_size,
                                 num_gpu_batches=args.num_gpu_batches, cpu_cache_compute=args.cpu_cache_compute,
                                 kv=KVSettings("h2o", H2OConfig(hh_ratio=args.h2o[0], recent_ratio=args.h2o[1]))
                                 if args.h2o else KVSettings())
    cap = int(args.gpu_mem * 2 ** 30) if args.gpu_mem else None
    engine = Engine(model, policy, Workload(args.prompt_len, args.gen_len),
                    EngineOptions(progress=False, gpu_mem_bytes=cap, offload_dir=args.out / "offload", profile=True))
    engine.profiler.timeline = True
    prompts = synthetic_prompts(model, policy.batch_size, args.prompt_len, 0)
    result = engine.generate(prompts, None, GenerationConfig(max_new_tokens=args.gen_len))
    engine.close()
    steps = engine.profiler.timelines[1:]  # [0]: the prefill
    middle = steps[len(steps) // 2]
    report = {"model": args.model, "policy": vars(args) | {"out": str(args.out)}, "gpu": torch.cuda.get_device_name(),
              "decode_s_per_step": result.decode_s / max(1, len(steps)),
              "each_step_ms": [round(max(e for _, _, e in st) - min(b for _, b, _ in st), 1) for st in steps],
              **summarize(middle)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timeline.json").write_text(json.dumps({"report": report, "spans": middle}))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
