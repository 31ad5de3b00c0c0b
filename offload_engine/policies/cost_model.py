"""Predicted prefill and decode-step time of a policy on a machine, and its memory per tier.

Memory is the engine's own plan (memory.py): what the model predicts is what the engine would
allocate or refuse. Time adds up the bytes and FLOPs each part of the zig-zag schedule moves,
over the rates of a `HardwareProfile`, and combines them the way the schedule overlaps them:

  decode step = max(PCIe link, disk, activation I/O, GPU compute + CPU attention + launches,
                    host memory)

weights and KV stream on their own streams and threads beside compute, so they overlap it, but
they share the resources they cross: every streamed byte crosses the PCIe link, and weights and
cache on disk share the disk, so each resource sums its users (taken as separate channels, an
OPT-30B policy with both partly on disk was predicted at 2.7x its measured speed). CPU attention
runs on the host thread between a layer's GPU halves, so it adds to compute; the host's memory
is read by both weight DMA and CPU attention, each slower while the other runs
(Terms.host_memory_s). Prefill = max(compute, weights in, cache out, disk). Every term is linear
in the placement fractions, which is what lets search.py solve for the percentages with a linear
program (`Terms`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offload_engine.config import ModelConfig
from offload_engine.io.tiers import Tier
from offload_engine.models import build_layers

from .hardware import HardwareProfile
from .memory import MemoryPlan, Workload, kv_token_bytes, plan_memory, weight_bytes
from .placement import Policy

FUSED_MAX_ROWS = 32  # kernels/quant/linear.py: packed weights are read packed only for small batches


@dataclass
class Terms:
    """A policy's per-step quantities, split so that each is a constant times a placement fraction.

    Bytes: W weights (as stored), KV_read K+V a decode step reads (average length), KV_prompt the
    cache a prefill writes; times in seconds. Fractions: wg/wc (weights on GPU/CPU, the rest on
    disk), cg/cc (KV cache), and whether CPU-resident cache is attended on the CPU.
    """

    W: float
    KV_read: float
    KV_prompt: float
    ACT_step: float  # hidden states stored and loaded back between layers in a decode step
    ACT_prompt: float  # the same in prefill
    gemm_s: float  # GPU matmuls of one decode step (all GPU batches)
    prefill_compute_s: float
    overhead_s: float  # host time of an eager step (0 when the step is captured)
    cpu_attention: bool
    gen_len: int
    batch: int
    cpu_attention_bytes_s: float  # cache bytes, as stored, CPU attention reads per second (cpu_attention_rate)
    cpu_calls_s: float  # the round trips of a step that attends its whole cache on the CPU

    def weight_io_s(self, hw: HardwareProfile, wc: float, wd: float) -> float:
        """Weights alone: over PCIe from host memory and disk, the disk's share also at its rate."""
        dr = min(hw.disk_read_bytes_s, hw.h2d_bytes_s)
        return self.W * max((wc + wd) / hw.h2d_bytes_s, wd / dr)

    def kv_io_s(self, hw: HardwareProfile, cc: float, cd: float) -> float:
        """The KV cache alone: what is not attended on the CPU crosses PCIe; the disk's share also the disk."""
        streamed_cpu = 0.0 if self.cpu_attention else cc
        dr = min(hw.disk_read_bytes_s, hw.h2d_bytes_s)
        return self.KV_read * max((streamed_cpu + cd) / hw.h2d_bytes_s, cd / dr)

    def link_s(self, hw: HardwareProfile, wc: float, wd: float, cc: float, cd: float) -> float:
        """PCIe host -> GPU, shared by every streamed byte: weights and cache from host memory and
        from disk (whose reads land in host memory first)."""
        streamed_cpu = 0.0 if self.cpu_attention else cc
        return (self.W * (wc + wd) + self.KV_read * (streamed_cpu + cd)) / hw.h2d_bytes_s

    def disk_s(self, hw: HardwareProfile, wd: float, cd: float) -> float:
        """The disk, shared by the weights and the cache read from it."""
        return (self.W * wd + self.KV_read * cd) / min(hw.disk_read_bytes_s, hw.h2d_bytes_s)

    def attention_s(self, hw: HardwareProfile, cg: float, cc: float, cd: float) -> tuple[float, float]:
        """(GPU attention, CPU attention) seconds of a decode step."""
        on_cpu = cc if self.cpu_attention else 0.0
        return (self.KV_read * (1.0 - on_cpu) / hw.gpu_attention_bytes_s,
                on_cpu * (self.KV_read / self.cpu_attention_bytes_s + self.cpu_calls_s))

    def act_io_s(self, hw: HardwareProfile, hc: float, hd: float, prefill: bool = False) -> float:
        """Hidden states off the GPU go out and come back at every layer."""
        moved = self.ACT_prompt if prefill else self.ACT_step
        cpu = 1 / hw.d2h_bytes_s + 1 / hw.h2d_bytes_s
        disk = 1 / hw.disk_write_bytes_s + 1 / min(hw.disk_read_bytes_s, hw.h2d_bytes_s)
        return moved * (hc * cpu + hd * disk) / 2

    def host_reads(self, wc: float, cc: float) -> tuple[float, float]:
        """Host-memory bytes a decode step reads: (by CPU attention, by DMA to the GPU)."""
        attended = self.KV_read * cc if self.cpu_attention else 0.0
        return attended, self.W * wc + (0.0 if self.cpu_attention else self.KV_read * cc)

    def host_memory_s(self, hw: HardwareProfile, wc: float, cc: float) -> float:
        """Both readers of host memory at once. Measured side by side (a' and d': each one's rate
        while the other runs), A bytes attended and D copied take, whichever finishes first,
        max(D/d + A (1 - d'/d) / a', A/a + D (1 - a'/a) / d'): exact when running both at once
        beats running them in turn (a'/a + d'/d >= 1), else an upper bound. Unmeasured, they
        share one read stream: (A + D) / cpu_mem."""
        a_bytes, d_bytes = self.host_reads(wc, cc)
        return max(c_a * a_bytes + c_d * d_bytes for c_a, c_d in host_coefficients(hw))


def host_coefficients(hw: HardwareProfile) -> list[tuple[float, float]]:
    """Seconds per byte (attended, copied) of each linear piece of Terms.host_memory_s (the step
    is at least each piece: what the search's linear program takes as constraints)."""
    if not hw.contention_measured:
        return [(1 / hw.cpu_mem_bytes_s, 1 / hw.cpu_mem_bytes_s)]
    a, d = hw.cpu_attention_bytes_s, hw.h2d_bytes_s
    a2, d2 = min(hw.cpu_attention_dma_bytes_s, a), min(hw.h2d_cpu_attention_bytes_s, d)
    return [((1 - d2 / d) / a2, 1 / d), (1 / a, (1 - a2 / a) / d2)]


@dataclass
class Estimate:
    policy: Policy
    prefill_s: float
    step_s: float
    memory: dict[Tier, int]  # bytes the plan needs per tier (what the caps are checked against)
    persistent: dict[Tier, int]  # of which allocated up front (all but transient working memory)
    parts: dict[str, float] = field(default_factory=dict)  # the decode step's terms, seconds
    gen_len: int = 1

    @property
    def total_s(self) -> float:
        return self.prefill_s + (self.gen_len - 1) * self.step_s

    @property
    def throughput(self) -> float:
        """FlexGen's: generated tokens / (prefill + decode time)."""
        return self.policy.batch_size * self.gen_len / self.total_s


def cpu_attention_rate(policy: Policy, hw: HardwareProfile, num_heads: int, head_dim: int) -> float:
    """Cache bytes, as stored, that CPU decode attention reads per second under the policy: a
    packed cache at the profile's packed rate (given in fp16 bytes, so scaled to the packed size);
    unmeasured, a packed element costs what an fp16 one does."""
    if policy.compress_cache is None:
        return hw.cpu_attention_bytes_s
    packed_per_fp16 = kv_token_bytes(num_heads, head_dim, policy, 2) / (num_heads * head_dim * 2)
    return (hw.cpu_packed_attention_bytes_s or hw.cpu_attention_bytes_s) * packed_per_fp16


def _plan(model: ModelConfig, policy: Policy, work: Workload, dtype: torch.dtype, relay_bytes: int,
          hw: HardwareProfile) -> MemoryPlan:
    """The engine's plan: like Engine._plan, a third weight staging slot when it fits the caps."""
    layers = build_layers(model, policy.sep_layer)
    caps = {Tier.GPU: hw.gpu_mem_bytes, Tier.CPU: hw.cpu_mem_bytes, Tier.DISK: hw.disk_free_bytes}
    plan = None
    for slots in [policy.weight_buffers] if policy.weight_buffers else [3, 2]:
        plan = plan_memory(layers, policy, work, dtype, model.hidden_size, slots, relay_bytes)
        if all(plan.tiers[t].total <= caps[t] for t in Tier):
            break
    return plan


def terms(model: ModelConfig, policy: Policy, work: Workload, hw: HardwareProfile,
          dtype: torch.dtype = torch.float16) -> Terms:
    """The policy-independent-of-placement quantities of the cost (batch, compression, KV policy)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    layers = build_layers(model, policy.sep_layer)
    specs = {s.key: s for layer in layers for s in layer.weight_specs()}
    stored = sum(weight_bytes(s, policy, itemsize) for s in specs.values())
    params = sum(s.numel() for s in specs.values())
    b, k = policy.gpu_batch_size, policy.num_gpu_batches
    attn = [layer.kv_spec for layer in layers if layer.kv_spec is not None]
    token = kv_token_bytes(attn[0].num_heads, attn[0].head_dim, policy, itemsize) if attn else 0
    if policy.kv.evicts:  # the cache stays at the budget
        read_len = float(policy.kv.cache_len(work.prompt_len, work.max_len))
    elif policy.kv.policy == "hip":  # the selected blocks, sink and window
        hip = policy.kv.hip
        read_len = float(min(work.prompt_len + work.gen_len / 2, hip.k + hip.window + hip.sink))
    else:
        read_len = work.prompt_len + work.gen_len / 2
    kv_read = 2 * read_len * b * k * token * len(attn)
    kv_prompt = 2 * policy.kv.prefill_tokens(work.prompt_len, work.max_len) * b * k * token * len(attn)
    # Decode matmuls: each GPU batch reads every weight (as stored, when the fused kernel reads it
    # packed) unless the batch is large enough to be compute-bound.
    read = stored if (policy.compress_weight is None or b <= FUSED_MAX_ROWS) else params * itemsize
    gemm = k * max(read / hw.weight_read_bytes_s, 2.0 * params * b / hw.gpu_flops)
    attn_flops = 2.0 * b * k * work.prompt_len ** 2 * model.hidden_size * len(attn)  # causal: half of 4 b s^2 h
    prefill = (2.0 * params * b * k * work.prompt_len + attn_flops) / hw.gpu_flops
    n_layers = len(layers)
    overhead = 0.0 if _captured(policy, hw) else n_layers * k * hw.layer_overhead_s
    act = 2.0 * n_layers * b * k * model.hidden_size * itemsize  # out and back, one token a sequence
    cpu_rate = cpu_attention_rate(policy, hw, attn[0].num_heads, attn[0].head_dim) if attn else hw.cpu_attention_bytes_s
    calls = len(attn) * k * hw.cpu_attention_call_s if policy.cpu_cache_compute else 0.0
    return Terms(stored, kv_read, kv_prompt, act, act * work.prompt_len, gemm, prefill, overhead,
                 policy.cpu_cache_compute, work.gen_len, b * k, cpu_rate, calls)


def _captured(policy: Policy, hw: HardwareProfile) -> bool:
    """Whether the engine captures the decode step (decode_graph.graphs_apply, from the policy and
    whether there is a GPU)."""
    if hw.cpu_device:
        return False
    on_gpu = policy.weight_gpu_percent == 100 and policy.cache_gpu_percent == 100 and policy.act_gpu_percent == 100
    return policy.cuda_graphs and on_gpu and policy.kv.capturable and policy.compress_cache is None


def estimate(model: ModelConfig, policy: Policy, work: Workload, hw: HardwareProfile,
             dtype: torch.dtype = torch.float16, relay_bytes: int | None = None) -> Estimate:
    """`relay_bytes`: the disk relay's pinned ring when the policy uses disk (None: the default ring)."""
    if relay_bytes is None:
        relay_bytes = 0
        if policy.uses_disk:  # the engine's ring: the default fitted to the disk tier
            from offload_engine.io.disk_relay import DiskRelaySettings
            disk = _plan(model, policy, work, dtype, 0, hw).tiers[Tier.DISK].total
            relay_bytes = DiskRelaySettings().fitted(disk).host_bytes()
    plan = _plan(model, policy, work, dtype, relay_bytes, hw)
    t = terms(model, policy, work, hw, dtype)
    w_total = max(1, plan.model_bytes)
    wc, wd = plan.tiers[Tier.CPU].weights / w_total, plan.tiers[Tier.DISK].weights / w_total
    items = max(1, plan.kv_split.count)
    counts = plan.kv_split.counts()
    cg, cc, cd = counts[Tier.GPU] / items, counts[Tier.CPU] / items, counts[Tier.DISK] / items
    gpu_attn, cpu_attn = t.attention_s(hw, cg, cc, cd)
    acts = max(1, plan.act_split.count)
    a_counts = plan.act_split.counts()
    hc, hd = a_counts[Tier.CPU] / acts, a_counts[Tier.DISK] / acts
    parts = {"link": t.link_s(hw, wc, wd, cc, cd), "disk": t.disk_s(hw, wd, cd), "act_io": t.act_io_s(hw, hc, hd),
             "compute": t.gemm_s + gpu_attn + cpu_attn + t.overhead_s, "host_memory": t.host_memory_s(hw, wc, cc),
             "weight_io": t.weight_io_s(hw, wc, wd), "kv_io": t.kv_io_s(hw, cc, cd),
             "gpu_attention": gpu_attn, "cpu_attention": cpu_attn, "gemm": t.gemm_s, "launch": t.overhead_s}
    parts["layer_by_layer"] = serial_step_s(model, policy, work, hw, plan, t, dtype)
    step = max(parts[k] for k in ("link", "disk", "act_io", "compute", "host_memory", "layer_by_layer"))
    # Prefill: weights in over PCIe (once per block), the prompt's cache out (the other direction),
    # the disk reading weights and writing cache in turn. A cache attended on the CPU is stored
    # head-major: it leaves through a small pinned staging ring and a host copy into its strided
    # home, which the compute waits on (measured: prefill = compute + both, within 8%).
    dr = min(hw.disk_read_bytes_s, hw.h2d_bytes_s)
    link_in = t.W * (wc + wd) / hw.h2d_bytes_s
    cache_out = t.KV_prompt * (1 - cg) / hw.d2h_bytes_s
    disk = t.W * wd / dr + t.KV_prompt * cd / hw.disk_write_bytes_s
    head_major = t.KV_prompt * cc * (1 / hw.d2h_bytes_s + 1 / hw.cpu_mem_bytes_s) if t.cpu_attention else 0.0
    prefill = max(t.prefill_compute_s + t.overhead_s + head_major, link_in, cache_out, disk,
                  t.act_io_s(hw, hc, hd, True))
    memory = {tier: plan.tiers[tier].total for tier in Tier}
    persistent = {tier: plan.persistent_bytes(tier) for tier in Tier}
    return Estimate(policy, prefill, step, memory, persistent, parts, work.gen_len)


def serial_step_s(model: ModelConfig, policy: Policy, work: Workload, hw: HardwareProfile, plan: MemoryPlan,
                  t: Terms, dtype: torch.dtype) -> float:
    """The decode step layer by layer: the sum over scheduled layers of the longest of its compute,
    its bytes over PCIe and its bytes from disk, at the tiers the plan gives that layer.

    The schedule fetches a layer or two ahead, so a layer's I/O overlaps only its neighbours'
    compute, not the whole step's: the placement puts the last percents of the weights and cache
    in the last layers, and a few layers with gigabytes on disk stall the step however idle the
    disk is elsewhere. Always at least each resource's whole-step total.

    CPU attention adds to its layer rather than overlapping the weight copies: measured on OPT-30B
    (one H100, 16 cores; h100_2026-11-26_h2o_hip_cost), a step took weight I/O + CPU attention +
    GPU compute within 1-8% at three placements and batches, where overlap predicted 21-33% less.
    Both read host memory, and each slows the other (the profile's contended rates)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    layers = build_layers(model, policy.sep_layer)
    b, k = policy.gpu_batch_size, policy.num_gpu_batches
    dr = min(hw.disk_read_bytes_s, hw.h2d_bytes_s)
    gemv = hw.weight_read_bytes_s
    n_attn = max(1, len(plan.kv_layers))
    item_read = t.KV_read / (n_attn * plan.kv_batches)  # K + V one (layer, gpu batch) item reads a step
    overhead = t.overhead_s / max(1, len(layers))
    total = 0.0
    for i, layer in enumerate(layers):  # a tied weight is fetched by each layer that uses it
        cpu_attention = 0.0
        specs = list({s.key: s for s in layer.weight_specs()}.values())
        by_tier = {tier: 0 for tier in Tier}
        for spec in specs:
            by_tier[plan.weight_tiers[spec.key]] += weight_bytes(spec, policy, itemsize)
        stored, params = sum(by_tier.values()), sum(s.numel() for s in specs)
        read = stored if (policy.compress_weight is None or b <= FUSED_MAX_ROWS) else params * itemsize
        compute = k * max(read / gemv, 2.0 * params * b / hw.gpu_flops) + overhead
        link = by_tier[Tier.CPU] + by_tier[Tier.DISK]
        disk = by_tier[Tier.DISK]
        if layer.kv_spec is not None:
            for batch in range(k):
                tier = plan.kv_tier(i, batch)
                attended_on_cpu = tier == Tier.CPU and policy.cpu_cache_compute
                if attended_on_cpu:
                    cpu_attention += item_read / t.cpu_attention_bytes_s + hw.cpu_attention_call_s
                else:
                    compute += item_read / hw.gpu_attention_bytes_s
                if tier == Tier.DISK or (tier == Tier.CPU and not attended_on_cpu):
                    link += item_read
                if tier == Tier.DISK:
                    disk += item_read
        total += max(compute, link / hw.h2d_bytes_s, disk / dr) + cpu_attention
    return total


def fits(estimate: Estimate, hw: HardwareProfile) -> bool:
    caps = {Tier.GPU: hw.gpu_mem_bytes, Tier.CPU: hw.cpu_mem_bytes, Tier.DISK: hw.disk_free_bytes}
    return all(estimate.memory[tier] <= caps[tier] for tier in Tier)


def layer_seconds(model: ModelConfig, policy: Policy, work: Workload, hw: HardwareProfile,
                  dtype: torch.dtype = torch.float16) -> list[float]:
    """Each scheduled layer's share of a decode step under the policy, for balancing pipeline
    stages: its weight and KV I/O (at the policy's fractions off the GPU) or its compute and
    attention, whichever is longer, since the schedule overlaps the two."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    b, k = policy.gpu_batch_size, policy.num_gpu_batches
    wc, wd = policy.weight_cpu_percent / 100, 1 - (policy.weight_gpu_percent + policy.weight_cpu_percent) / 100
    cc = policy.cache_cpu_percent / 100
    cd = 1 - (policy.cache_gpu_percent + policy.cache_cpu_percent) / 100
    disk = min(hw.disk_read_bytes_s, hw.h2d_bytes_s)
    on_cpu = cc if policy.cpu_cache_compute else 0.0
    read_len = work.prompt_len + work.gen_len / 2
    if policy.kv.evicts:
        read_len = float(policy.kv.cache_len(work.prompt_len, work.max_len))
    out = []
    for layer in build_layers(model, policy.sep_layer):
        specs = {s.key: s for s in layer.weight_specs()}.values()
        stored = sum(weight_bytes(s, policy, itemsize) for s in specs)
        params = sum(s.numel() for s in specs)
        kv, cpu_rate = 0.0, hw.cpu_attention_bytes_s
        if layer.kv_spec is not None:
            heads, head_dim = layer.kv_spec.num_heads, layer.kv_spec.head_dim
            kv = 2 * read_len * b * k * kv_token_bytes(heads, head_dim, policy, itemsize)
            cpu_rate = cpu_attention_rate(policy, hw, heads, head_dim)
        io = stored * (wc / hw.h2d_bytes_s + wd / disk) + kv * ((cc - on_cpu) / hw.h2d_bytes_s + cd / disk)
        compute = k * max(stored / hw.weight_read_bytes_s, 2.0 * params * b / hw.gpu_flops) \
            + kv * (1 - on_cpu) / hw.gpu_attention_bytes_s + kv * on_cpu / cpu_rate \
            + (on_cpu * k * hw.cpu_attention_call_s if layer.kv_spec is not None else 0.0)
        out.append(max(io, compute))
    return out
