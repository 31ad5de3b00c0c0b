"""Policy search: the best placement, batch and KV settings for a model, workload and machine.

Discrete knobs (GPU batch size, GPU batches per block, CPU attention, compression, KV policy)
are enumerated; for each combination a linear program over the six placement fractions
minimises prefill + (gen - 1) x decode step under the memory caps, with the cost model's terms
(cost_model.Terms) as constraints (step >= each overlapped part; FlexGen's paper formulates the
same program and its users never got it). The LP's fractions are rounded to whole percentages and
checked with the engine's own memory plan and cost model; what the plan refuses is dropped, so
every returned policy is one the engine accepts.
"""
from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, replace

import numpy as np
import torch

from offload_engine.config import ModelConfig
from offload_engine.io.tiers import Tier
from offload_engine.models import build_layers

from .cost_model import Estimate, estimate, fits, host_coefficients, terms
from .hardware import HardwareProfile
from .kv_policy import Compression, KVSettings
from .memory import MemoryPlan, Workload, plan_memory
from .placement import Policy

PERCENT_FIELDS = ("weight_gpu_percent", "weight_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                  "act_gpu_percent", "act_cpu_percent")
COMPRESSION = {"none": (False, False), "cache": (False, True), "weight": (True, False), "both": (True, True)}


@dataclass(frozen=True)
class SearchSpace:
    gpu_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    num_gpu_batches: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    cpu_attention: tuple[bool, ...] = (False, True)
    compression: tuple[str, ...] = ("none",)
    kv: tuple[KVSettings, ...] = (KVSettings(),)
    quant: Compression = Compression()

    def combos(self):
        for b, k, cpu, comp, kv in itertools.product(self.gpu_batch_sizes, self.num_gpu_batches, self.cpu_attention,
                                                     self.compression, self.kv):
            w, c = COMPRESSION[comp]
            yield Policy(gpu_batch_size=b, num_gpu_batches=k, cpu_cache_compute=cpu, kv=kv,
                         compress_weight=self.quant if w else None, compress_cache=self.quant if c else None)


def _placed(model: ModelConfig, base: Policy, work: Workload, dtype, percent: tuple[float, ...]) -> MemoryPlan:
    """The engine's memory plan of the combination placed at `percent`."""
    policy = replace(base, **dict(zip(PERCENT_FIELDS, percent)))
    return plan_memory(build_layers(model, base.sep_layer), policy, work, dtype, model.hidden_size, 2)


def _lp(model: ModelConfig, base: Policy, work: Workload, hw: HardwareProfile, dtype) -> list[tuple[float, ...]]:
    """Placement percentages (wg, wc, cg, cc, hg, hc) minimising the estimated total time: one
    solution with weights and cache kept on the GPU (no staging slots), and with anything streamed
    (its GPU staging counted at the worst case) one with and one without disk; any may be
    infeasible. The LP sees whole-step totals; the layer-by-layer term (cost_model.serial_step_s)
    that `estimate` adds can make a few percent on disk cost more than the LP thought, so the
    placement without disk is always a candidate too. With CPU attention each is solved twice:
    with CPU attention after the copies (as estimate counts it) and beside them (a relaxation that
    may keep more of the cache on the CPU, which `estimate` then judges)."""
    serial = (True, False) if base.cpu_cache_compute else (True,)
    found = [_solve(model, base, work, hw, dtype, resident, disk, after)
             for resident, disk in ((True, True), (False, True), (False, False)) for after in serial]
    return list(dict.fromkeys(p for p in found if p is not None))


def _solve(model: ModelConfig, base: Policy, work: Workload, hw: HardwareProfile, dtype,
           resident: bool, disk: bool = True, serial: bool = True) -> tuple[float, ...] | None:
    from scipy.optimize import linprog

    t = terms(model, base, work, hw, dtype)
    # What scales with the fractions (weights, KV cache, activations) comes from the plan with
    # everything on disk; what does not (staging slots, working memory) is taken at its worst:
    # the GPU's from that plan (everything streamed), the CPU's from the plan with everything there.
    on_disk = _placed(model, base, work, dtype, (0, 0, 0, 0, 0, 0))
    on_cpu = _placed(model, base, work, dtype, (0, 100, 0, 100, 0, 100))
    W, KV, ACT = (on_disk.tiers[Tier.DISK].weights, on_disk.tiers[Tier.DISK].kv_cache,
                  on_disk.tiers[Tier.DISK].activations)
    streamed = on_disk if disk else on_cpu  # without disk, no disk writes wait on the GPU
    gpu_fixed = (_placed(model, base, work, dtype, (100, 0, 100, 0, 100, 0)).tiers[Tier.GPU].working if resident
                 else streamed.tiers[Tier.GPU].total)
    cpu_fixed = on_cpu.tiers[Tier.CPU].total - on_cpu.tiers[Tier.CPU].weights - on_cpu.tiers[Tier.CPU].kv_cache \
        - on_cpu.tiers[Tier.CPU].activations
    dr = min(hw.disk_read_bytes_s, hw.h2d_bytes_s)
    gen = work.gen_len
    # x = [wg, wc, cg, cc, hg, hc, step, prefill]; minimise prefill + (gen - 1) step
    c = np.array([0, 0, 0, 0, 0, 0, gen - 1, 1], dtype=float)
    A, b = [], []

    def le(coef, rhs):
        A.append(coef)
        b.append(rhs)

    cpu_att = 1.0 if base.cpu_cache_compute else 0.0
    h2d = hw.h2d_bytes_s
    # PCIe link, decode: (W (1 - wg) + KV_read (1 - cg - cc att)) / h2d <= step; prefill: W (1 - wg) / h2d
    le([-W / h2d, 0, -t.KV_read / h2d, -t.KV_read * cpu_att / h2d, 0, 0, -1, 0], -(W + t.KV_read) / h2d)
    le([-W / h2d, 0, 0, 0, 0, 0, 0, -1], -W / h2d)
    # disk, decode: (W (1 - wg - wc) + KV_read (1 - cg - cc)) / dr <= step
    le([-W / dr, -W / dr, -t.KV_read / dr, -t.KV_read / dr, 0, 0, -1, 0], -(W + t.KV_read) / dr)
    # compute: gemm + overhead + KV_read ((1 - cc att) / gpu_attn + cc att / cpu_attn) + cc att calls <= step
    ga, ca = 1 / hw.gpu_attention_bytes_s, 1 / t.cpu_attention_bytes_s
    le([0, 0, 0, cpu_att * (t.KV_read * (ca - ga) + t.cpu_calls_s), 0, 0, -1, 0],
       -(t.gemm_s + t.overhead_s + t.KV_read * ga))
    # CPU attention after the copies, not beside them (cost_model.serial_step_s):
    # the link's bytes / h2d + cc att (KV_read / cpu_attn + calls) <= step
    if cpu_att and serial:
        le([-W / h2d, 0, -t.KV_read / h2d, t.KV_read * (ca - 1 / h2d) + t.cpu_calls_s, 0, 0, -1, 0],
           -(W + t.KV_read) / h2d)
    # activation I/O: ACT ((hc (1/d2h + 1/h2d) + (1 - hg - hc) (1/dw + 1/dr)) / 2 <= step (ACT_prompt: prefill)
    cpu_rt = (1 / hw.d2h_bytes_s + 1 / hw.h2d_bytes_s) / 2
    disk_rt = (1 / hw.disk_write_bytes_s + 1 / dr) / 2
    for col, moved in ((6, t.ACT_step), (7, t.ACT_prompt)):
        row = [0, 0, 0, 0, -moved * disk_rt, moved * (cpu_rt - disk_rt), 0, 0]
        row[col] = -1
        le(row, -moved * disk_rt)
    # host memory, each piece: s_a (KV_read cc att) + s_d (W wc + KV_read cc (1 - att)) <= step
    for s_a, s_d in host_coefficients(hw):
        le([0, W * s_d, 0, t.KV_read * (cpu_att * s_a + (1 - cpu_att) * s_d), 0, 0, -1, 0], 0)
    # prefill compute; the prompt's cache out: KV_prompt (1 - cg) / d2h <= prefill; the disk reading
    # weights and writing cache: W (1 - wg - wc) / dr + KV_prompt (1 - cg - cc) / dw <= prefill
    # prefill compute, plus a CPU-attended cache's way out to its head-major home (cost_model.estimate)
    head_major = t.KV_prompt * cpu_att * serial * (1 / hw.d2h_bytes_s + 1 / hw.cpu_mem_bytes_s)
    le([0, 0, 0, head_major, 0, 0, 0, -1], -(t.prefill_compute_s + t.overhead_s))
    le([0, 0, -t.KV_prompt / hw.d2h_bytes_s, 0, 0, 0, 0, -1], -t.KV_prompt / hw.d2h_bytes_s)
    dw = hw.disk_write_bytes_s
    le([-W / dr, -W / dr, -t.KV_prompt / dw, -t.KV_prompt / dw, 0, 0, 0, -1], -(W / dr + t.KV_prompt / dw))
    # memory caps
    le([W, 0, KV, 0, ACT, 0, 0, 0], hw.gpu_mem_bytes - gpu_fixed)
    le([0, W, 0, KV, 0, ACT, 0, 0], hw.cpu_mem_bytes - cpu_fixed)
    le([-W, -W, -KV, -KV, -ACT, -ACT, 0, 0], hw.disk_free_bytes - W - KV - ACT)
    # each pair sums to at most 1 (exactly 1: nothing on disk)
    pairs = []
    for i in (0, 2, 4):
        row = [0] * 8
        row[i] = row[i + 1] = 1
        le(row, 1)
        pairs.append(row)
    bounds = [(0, 1)] * 6 + [(0, None), (0, None)]
    if resident:  # weights and KV cache stay on the GPU: nothing is staged
        bounds[0] = bounds[2] = (1, 1)
    eq = {} if disk else {"A_eq": np.array(pairs, dtype=float), "b_eq": np.ones(len(pairs))}
    res = linprog(c, A_ub=np.array(A, dtype=float), b_ub=np.array(b, dtype=float), bounds=bounds, method="highs", **eq)
    if res.status != 0:
        return None
    return tuple(float(v) * 100 for v in res.x[:6])


def _rounded(percent: tuple[float, ...]) -> tuple[float, ...]:
    """Whole percentages (nearest: an LP's 99.99 must not put 0.01% on disk, which would bring the
    disk relay's ring along); a plan that no longer fits is mended by `_feasible`."""
    out = []
    for g, c in zip(percent[0::2], percent[1::2]):
        g = min(100.0, float(round(g)))
        out += [g, min(100.0 - g, float(round(c)))]
    return tuple(out)


def _feasible(model, policy, work, hw, dtype) -> Estimate | None:
    """The policy or a nearby one (GPU shares lowered step by step) that the plan accepts."""
    for _ in range(12):
        est = estimate(model, policy, work, hw, dtype)
        if fits(est, hw):
            return est
        p = list(policy.percent)
        over = {tier for tier in Tier if est.memory[tier] > {Tier.GPU: hw.gpu_mem_bytes, Tier.CPU: hw.cpu_mem_bytes,
                                                              Tier.DISK: hw.disk_free_bytes}[tier]}
        for i in (0, 2, 4):
            if Tier.GPU in over and p[i] > 0:
                moved = min(p[i], 5.0)
                p[i] -= moved
                p[i + 1] = min(100.0 - p[i], p[i + 1] + moved)
            if Tier.CPU in over and p[i + 1] > 0:
                p[i + 1] = max(0.0, p[i + 1] - 5.0)
        if tuple(p) == policy.percent:
            return None
        policy = replace(policy, **dict(zip(PERCENT_FIELDS, p)))
    return None


def search(model: ModelConfig, work: Workload, hw: HardwareProfile, space: SearchSpace = SearchSpace(),
           objective: str = "throughput", top: int = 5, dtype: torch.dtype = torch.float16) -> list[Estimate]:
    """The best policies, best first (throughput: token/s; latency: the batch's total time)."""
    if objective not in ("throughput", "latency"):
        raise ValueError(f"objective must be 'throughput' or 'latency', got {objective!r}.")
    found: dict[tuple, Estimate] = {}
    for base in space.combos():
        for percent in _lp(model, base, work, hw, dtype):
            policy = replace(base, **dict(zip(PERCENT_FIELDS, _rounded(percent))))
            if policy.cpu_cache_compute and policy.cache_cpu_percent == 0:
                continue  # CPU attention without a CPU cache is the same policy without it
            est = _feasible(model, policy, work, hw, dtype)
            if est is not None:
                key = (est.policy.percent, est.policy.gpu_batch_size, est.policy.num_gpu_batches,
                       est.policy.cpu_cache_compute, est.policy.compress_weight, est.policy.compress_cache,
                       est.policy.kv)
                found[key] = est
    score = (lambda e: -e.throughput) if objective == "throughput" else (lambda e: e.total_s)
    return sorted(found.values(), key=score)[:top]


def command_line(model_name: str, work: Workload, est: Estimate, extra: list[str] | tuple[str, ...] = ()) -> str:
    """The `offload-engine run` flags that reproduce a searched policy; `extra`: flags appended
    as they are (the caps and dtype it was planned under)."""
    p = est.policy
    flags = ["offload-engine run", f"--model {model_name}", f"--prompt-len {work.prompt_len}",
             f"--gen-len {work.gen_len}", "--percent " + " ".join(f"{x:g}" for x in p.percent),
             f"--gpu-batch-size {p.gpu_batch_size}", f"--num-gpu-batches {p.num_gpu_batches}"]
    if p.cpu_cache_compute:
        flags.append("--cpu-cache-compute")
    if p.compress_weight:
        flags.append("--compress-weight")
    if p.compress_cache:
        flags.append("--compress-cache")
    if p.kv.policy != "full":
        flags.append(f"--kv-policy {p.kv.policy}")
    return " ".join([*flags, *(shlex.quote(f) for f in extra)])
