"""Hidden states between layers, one home per GPU batch on the tier the policy gives it.

GPU-homed hidden states stay where they are computed. The others are stored after each
layer and loaded back before the next; the load of the next GPU batch overlaps compute.
Homes are flat so the first B*s*h elements are one contiguous block for any length s.

A decode step's hidden states on a pinned CPU home are read back by a kernel on the compute
stream, through the GPU's mapping of the home (io/tiers.py's device_view), not by a copy: a copy
would queue in the copy engine behind the next layers' weights (a 15 ms wait in every streamed
layer of OPT-30B at `20 80`). A prefill's (hundreds of MB) are copied: the copy engine reads
host memory faster than a kernel does (prefill 3.22 s read by a kernel against 2.97 copied).

A captured decode step (decode_graph.py) keeps its hidden states on the GPU whatever their tier:
they are batch x hidden elements, and the tier exists for the prefill's prompt x batch.
"""
from __future__ import annotations

import math

import torch

from .io.tiers import Storage, Tier, device_view
from .io.transfer import Mover, Pending

MAPPED_READ_BYTES = 4 << 20  # hidden states at most this large are read through the mapping


class ActivationStore:
    def __init__(self, tiers: list[Tier], storages: dict[Tier, Storage], max_elems: int, dtype: torch.dtype,
                 device: torch.device, mover: Mover):
        self.tiers, self.device, self.mover = tiers, device, mover
        self.decode_on_gpu = False  # set by the engine when the decode step is captured
        self.homes = [None if t == Tier.GPU else storages[t].allocate((max_elems,), dtype, f"hidden_{k}")
                      for k, t in enumerate(tiers)]
        self._resident: list[torch.Tensor | None] = [None] * len(tiers)
        self._stored: list[tuple[tuple[int, ...], Pending] | None] = [None] * len(tiers)
        self._loaded: list[tuple[torch.Tensor, Pending] | None] = [None] * len(tiers)
        self._mapped = [device_view(h, device) if t == Tier.CPU else None for h, t in zip(self.homes, tiers)]

    def put(self, k: int, x: torch.Tensor, decode: bool = False) -> None:
        if self.homes[k] is None or decode and self.decode_on_gpu:
            self._resident[k] = x
            return
        home = self.homes[k][: x.numel()].view(x.shape)
        self._stored[k] = (tuple(x.shape), self.mover.store(home, x, "act_io", to_disk=self.tiers[k] == Tier.DISK))

    def _reads_mapped(self, k: int) -> bool:
        """Whether batch k's stored hidden states are read through the home's mapping."""
        if self._mapped[k] is None or self._stored[k] is None:
            return False
        return math.prod(self._stored[k][0]) * self._mapped[k].element_size() <= MAPPED_READ_BYTES

    def prefetch(self, k: int) -> None:
        """Start loading batch k's hidden states, if they were stored and not loaded yet."""
        if self.homes[k] is None or self._stored[k] is None or self._loaded[k] is not None or self._reads_mapped(k):
            return
        shape, stored = self._stored[k]
        self._stored[k] = None
        buf = torch.empty(shape, dtype=self.homes[k].dtype, device=self.device)
        home = self.homes[k][: buf.numel()].view(shape)
        self._loaded[k] = (buf, self.mover.load(buf, home, "act_io", from_disk=self.tiers[k] == Tier.DISK,
                                                after=[stored]))

    def get(self, k: int) -> torch.Tensor:
        if self._resident[k] is not None:
            x, self._resident[k] = self._resident[k], None
            return x
        if self._reads_mapped(k):
            (shape, stored), self._stored[k] = self._stored[k], None
            stored.wait()
            with self.mover.profiler.span("act_io", torch.cuda.current_stream(self.device)):
                return torch.mul(self._mapped[k][: math.prod(shape)].view(shape), 1)  # a read, bit for bit
        self.prefetch(k)
        buf, pend = self._loaded[k]
        self._loaded[k] = None
        pend.wait()
        return buf
