"""Small results computed on the CPU handed to the GPU through mapped pinned buffers.

A host-to-device copy runs on the GPU's copy engine, which runs the copies of one direction in
the order they were issued: behind the weight copies already in flight (up to a GiB a layer when
weights stream from the CPU), so a decode step's attention output, a few hundred KiB, would wait
tens of milliseconds, and the CPU work after it with it. A GPU kernel reading a pinned buffer
through its mapping (tiers.device_view) does not queue behind them.
"""
from __future__ import annotations

import torch

from .tiers import device_view

MAPPED_LIMIT = 16 << 20  # bytes; larger results (prefill outputs) are copied: bandwidth, not latency, bounds them


class HostReturn:
    """A ring of `depth` pinned buffers per (device, shape, dtype), each reused once the GPU's
    read of it has run."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._rings: dict[tuple, list] = {}
        self._next: dict[tuple, int] = {}

    def to_device(self, out: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`out` (a CPU tensor) as a fresh tensor on `device`, valid in its current stream's order."""
        nbytes = out.numel() * out.element_size()
        if device.type != "cuda" or out.device.type != "cpu" or not 0 < nbytes <= MAPPED_LIMIT:
            return out.to(device)
        key = (device, tuple(out.shape), out.dtype)
        ring = self._rings.setdefault(key, [])
        if len(ring) < self.depth:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            mapped = device_view(host, device)
            if mapped is None:  # no unified addressing here
                return out.to(device)
            ring.append([host, mapped, None])
        slot = self._next.get(key, 0) % len(ring)
        self._next[key] = slot + 1
        host, mapped, read = ring[slot]
        if read is not None:
            read.synchronize()  # the GPU's last read of this buffer has run
        host.copy_(out)
        result = mapped.clone()
        read = torch.cuda.Event()
        read.record(torch.cuda.current_stream(device))
        ring[slot][2] = read
        return result
