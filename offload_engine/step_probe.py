"""Timings of a real engine's decode step, for the hardware profile (`offload-engine profile`):
what the host spends per scheduled layer (launches, bookkeeping), and what attending a layer's
GPU batch on the CPU adds (the copies out and back, the synchronisation)."""
from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import torch


def eager_layer_overhead(device: torch.device, offload_dir: Path, steps: int, reps: int,
                         cpu_attention: bool = False) -> dict:
    """Host time per scheduled layer and GPU batch of an eager decode step: a real Engine (2-layer
    OPT, hidden 64, everything on the compute device, CUDA graphs off) whose compute is negligible,
    so a decode step is launches and bookkeeping. Median over `reps` generate calls (after one
    untimed) of decode time / decode steps, divided by the layers the schedule runs per step.
    `cpu_attention`: the cache in host memory, attended there (--cpu-cache-compute)."""
    from offload_engine.policies.memory import Workload
    from offload_engine.policies.placement import Policy

    from .config import ModelConfig
    from .engine import Engine, EngineOptions
    from .sampling import GenerationConfig

    model = ModelConfig(name="profile-tiny-opt", family="opt", num_layers=2, hidden_size=64, num_heads=4,
                        ffn_dim=256, vocab_size=1000, max_positions=64)
    policy = Policy(gpu_batch_size=4, num_gpu_batches=1, cuda_graphs=False)
    if cpu_attention:
        policy = replace(policy, cache_gpu_percent=0, cache_cpu_percent=100, cpu_cache_compute=True)
    prompt = torch.randint(4, model.vocab_size, (policy.batch_size, 8), generator=torch.Generator().manual_seed(0))
    options = EngineOptions(device=str(device), offload_dir=offload_dir, progress=False)
    with Engine(model, policy, Workload(prompt.shape[1], steps), options) as engine:
        config = GenerationConfig(max_new_tokens=steps)
        runs = [engine.generate(prompt, None, config) for _ in range(reps + 1)][1:]
        layers = len(engine.layers) * policy.num_gpu_batches
        attention_items = sum(layer.kv_spec is not None for layer in engine.layers) * policy.num_gpu_batches
    step_s = statistics.median(r.decode_s / (steps - 1) for r in runs)
    return {"step_s": step_s, "layers": layers, "model_layers": model.num_layers, "per_layer_s": step_s / layers,
            "attention_items": attention_items}


def cpu_attention_call_overhead(device: torch.device, offload_dir: Path, steps: int, reps: int,
                                on_device: dict | None = None) -> dict:
    """Host time a CPU-attended (attention layer, GPU batch) adds to an eager decode step beyond
    attending on the device: q/k/v copied out, the synchronisation that waits for them, the
    output copied back, the call itself over a tiny cache. The tiny engine's step with its cache in
    host memory and attended there, against the same step with the cache on the device
    (`on_device`: that measurement, when already taken)."""
    on_device = on_device or eager_layer_overhead(device, offload_dir, steps, reps)
    on_host = eager_layer_overhead(device, offload_dir, steps, reps, cpu_attention=True)
    extra = max(0.0, on_host["step_s"] - on_device["step_s"])
    return {"step_s": on_host["step_s"], "per_call_s": extra / on_host["attention_items"]}
