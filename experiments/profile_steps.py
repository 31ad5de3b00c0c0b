"""Profile prefill and decode steps of the engine with torch.profiler (device machine).

  PYTHONPATH=. python experiments/profile_steps.py --model opt-6.7b --layers 8 --batch 32 --out DIR
Prints the top kernels and host ops by time, and writes a Chrome trace.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from offload_engine.config import replace
from offload_engine.model_zoo import resolve_model
from offload_engine.engine import Engine, EngineOptions
from offload_engine.cli.run import synthetic_prompts
from offload_engine.sampling import GenerationConfig
from policies.memory import Workload
from policies.placement import Policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--layers", type=int, default=8, help="cut the model to this many layers")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0])
    ap.add_argument("--cpu-cache-compute", action="store_true")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    model = resolve_model(args.model, dummy=True).config
    model = replace(model, num_layers=args.layers)
    policy = Policy.from_percent(args.percent, gpu_batch_size=args.batch, cpu_cache_compute=args.cpu_cache_compute,
                                 cuda_graphs=args.cuda_graphs)
    engine = Engine(model, policy, Workload(args.prompt_len, args.gen_len), EngineOptions(progress=False))
    prompts = synthetic_prompts(model, args.batch, args.prompt_len, 0)
    cfg = GenerationConfig(max_new_tokens=args.gen_len)
    for _ in range(2):
        r = engine.generate(prompts, None, cfg)
    print(f"{model.name} x{args.layers} layers: prefill {r.prefill_s * 1e3:.1f} ms, "
          f"decode {r.decode_s / (args.gen_len - 1) * 1e3:.2f} ms/step")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate(prompts, None, cfg)
        torch.cuda.synchronize()
        print(f"profiled generate: {time.perf_counter() - t0:.3f} s")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    args.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out / "trace.json"))


if __name__ == "__main__":
    main()
