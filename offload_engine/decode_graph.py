"""Decode steps without launch overhead: the whole step (every layer, every GPU batch) captured
once in a CUDA graph and replayed.

A decode step of a GPU-resident model is bound by Python and kernel launches (about 20 a
layer), not by the bytes it reads. It can be captured when nothing in it moves between tiers
and every shape is fixed: weights and KV cache on the GPU (a decode step's hidden states stay
there whatever their tier, activations.py), and an uncompressed
cache, full or with H2O's real eviction (a fixed number of slots); or HiP, also with its cache
(16- or 4-bit) in pinned host memory, which its hot cache reads in place (kv/hip_static.py). The attention then reads the
cache index, the length and where each row's padding ends from device tensors (BatchState's
static copies) instead of slicing by the host's length, so one graph serves every step and every
later generation with the same batch shape.

On a machine without a GPU nothing is captured; `eager=True` runs the same static step
directly, which is how the tests check it against the reference.
"""
from __future__ import annotations

import torch

from .batch import BatchState
from .schedule import Scheduler


def graphs_apply(policy, plan, device: torch.device, profiling: bool) -> str | None:
    """Why the decode step cannot be captured, or None when it can."""
    from .io.tiers import Tier

    if not policy.cuda_graphs:
        return "--no-cuda-graphs"
    if profiling:
        return "--profile times each stream with events"
    if any(t != Tier.GPU for t in plan.weight_tiers.values()):
        return "weights are streamed"
    kv_tiers = set(plan.kv_tiers.values())
    # HiP reads a cache in pinned host memory through its hot cache, written and fetched in place.
    hip_home = policy.kv.policy == "hip" and kv_tiers <= {Tier.GPU, Tier.CPU} and not policy.cpu_cache_compute
    if kv_tiers - {Tier.GPU} and not hip_home:
        return "the KV cache leaves the GPU"
    if policy.compress_cache is not None and policy.kv.policy != "hip":
        return "a compressed cache is decoded per step"
    if policy.kv.policy == "hip" and policy.kv.hip.dense_layers and Tier.CPU in kv_tiers:
        return "HiP's dense layers read the whole cache from host memory"
    if not policy.kv.capturable:
        if policy.kv.evicts:
            return "H2O's masked simulation attends a growing prefix"
        return "HiP's exact top-k scores every key each step"
    return None


class DecodeGraph:
    """One graph per phase of the step: a KV policy whose steps differ (HiP refreshes its selection
    every few steps) names the phase of the step about to run (`begin_static_step`)."""

    def __init__(self, scheduler: Scheduler, states: list[BatchState], device: torch.device, eager: bool = False):
        self.scheduler, self.states, self.eager = scheduler, states, eager or device.type != "cuda"
        self.inputs = [torch.zeros(st.key_valid.shape[0], 1, dtype=torch.int64, device=device) for st in states]
        self.graphs: dict[object, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}

    def step(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """One decode step on the new tokens `ids` (B, 1) per GPU batch; returns logits per batch."""
        for st in self.states:
            st.static = True
            st.load_static()
        for buf, x in zip(self.inputs, ids):
            buf.copy_(x)
        self.scheduler.kv.order_after_stores()  # the prefill's write-backs land before homes are read in place
        begin = getattr(self.scheduler.kv.policy, "begin_static_step", None)
        phase = begin(self.states[0]) if begin is not None else None
        if self.eager:
            out = self.scheduler.step(self.inputs, self.states, advance=False)
        elif phase not in self.graphs:
            out = self._capture(phase)
        else:
            graph, out = self.graphs[phase]
            graph.replay()
        for st in self.states:
            st.advance(1)
        return out

    def _capture(self, phase) -> list[torch.Tensor]:
        """Run this step once for real, then record it; returns the real run's logits.

        The real run doubles as capture's warm-up (library handles and workspaces are created on a
        side stream first, as capture requires). Recording executes nothing, so the step takes
        effect exactly once: replaying the graph now would apply it a second time, which a
        cache that writes into its first free slot (H2O, the sink baseline) would see as the new
        token written twice."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.scheduler.step(self.inputs, self.states, advance=False)
        torch.cuda.current_stream().wait_stream(side)
        for o in out:
            o.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.scheduler.step(self.inputs, self.states, advance=False)
        self.graphs[phase] = (graph, outputs)
        return out
