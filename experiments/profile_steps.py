"""Profile prefill and decode steps of the engine with torch.profiler (device machine).

  PYTHONPATH=. python experiments/profile_steps.py --model opt-6.7b --layers 8 --batch 32 --out DIR
Prints the top kernels and host ops by time, then the decode step alone: kernels of a whole
generate minus those of a prefill-only generate (one new token), per decode step. Writes a
Chrome trace.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from offload_engine.config import replace
from offload_engine.model_zoo import resolve_model
from offload_engine.engine import Engine, EngineOptions
from offload_engine.cli.run import synthetic_prompts
from offload_engine.sampling import GenerationConfig
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy


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
    with profile(activities=[ProfilerActivity.CUDA]) as prefill_only:
        engine.generate(prompts, None, GenerationConfig(max_new_tokens=1))
        torch.cuda.synchronize()
    print(decode_table(kernel_totals(prof), kernel_totals(prefill_only), args.gen_len - 1, args.layers))


def kernel_totals(prof) -> dict[str, tuple[float, int]]:
    """name -> (self device us, calls) of the kernels and copies (host ops, which carry their
    kernels' time too, left out)."""
    out = {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            out[e.key] = (us, e.count)
    return out


def decode_table(full: dict, prefill: dict, steps: int, layers: int, rows: int = 25) -> str:
    """Per decode step: each kernel's us and calls, the whole generate minus the prefill-only one."""
    diff = {k: ((us - prefill.get(k, (0.0, 0))[0]) / steps, (n - prefill.get(k, (0.0, 0))[1]) / steps)
            for k, (us, n) in full.items()}
    total = sum(us for us, _ in diff.values())
    lines = [f"decode step, {steps} steps: {total:.0f} us of kernels a step ({total / layers:.1f} us a layer)",
             f"{'us/step':>9} {'calls/step':>10} {'us/call':>8}  kernel"]
    for name, (us, n) in sorted(diff.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{us:9.1f} {n:10.1f} {us / n if n > 0 else 0.0:8.2f}  {name[:90]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
