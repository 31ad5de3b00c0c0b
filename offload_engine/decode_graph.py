"""Decode steps without launch overhead: the whole step (every layer, every GPU batch) captured
once in a CUDA graph and replayed.

A decode step of a GPU-resident model is bound by Python and kernel launches (about 20 a
layer), not by the bytes it reads. It can be captured when nothing in it moves between tiers
and every shape is fixed: weights, KV cache and hidden states on the GPU, and an uncompressed
cache, full or with H2O's real eviction (a fixed number of slots). The attention then reads the
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
    if any(t != Tier.GPU for t in plan.kv_tiers.values()) or any(t != Tier.GPU for t in plan.act_tiers):
        return "the KV cache or hidden states leave the GPU"
    if policy.compress_cache is not None:
        return "a compressed cache is decoded per step"
    if not policy.kv.capturable:
        if policy.kv.evicts:
            return "H2O's masked simulation attends a growing prefix"
        return f"the {policy.kv.policy} KV policy changes its selection per step"
    return None


class DecodeGraph:
    def __init__(self, scheduler: Scheduler, states: list[BatchState], device: torch.device, eager: bool = False):
        self.scheduler, self.states, self.eager = scheduler, states, eager or device.type != "cuda"
        self.inputs = [torch.zeros(st.key_valid.shape[0], 1, dtype=torch.int64, device=device) for st in states]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: list[torch.Tensor] = []

    def step(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """One decode step on the new tokens `ids` (B, 1) per GPU batch; returns logits per batch."""
        for st in self.states:
            st.static = True
            st.load_static()
        for buf, x in zip(self.inputs, ids):
            buf.copy_(x)
        if self.eager:
            out = self.scheduler.step(self.inputs, self.states, advance=False)
        elif self.graph is None:
            out = self._capture()
        else:
            self.graph.replay()
            out = self.outputs
        for st in self.states:
            st.advance(1)
        return out

    def _capture(self) -> list[torch.Tensor]:
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
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.scheduler.step(self.inputs, self.states, advance=False)
        return out
