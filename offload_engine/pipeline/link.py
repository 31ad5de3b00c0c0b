"""A stage's point-to-point traffic: hidden states in from the previous stage and out to the
next, sampled tokens from the last stage back to the first.

Everything is non-blocking (`isend`/`irecv`): a stage posts the receive of its next input
before computing the current one, and waits for a send only when a newer one is queued behind
it (so at most one block's outputs are in flight: the memory plan counts them). Every pair of
neighbours, and the last and first stage for the tokens, talk on a gloo group of their own, so a
middle stage's send to its successor never queues behind the receive it has posted from its
predecessor; barriers and gathered reports go over another, never in line with the hidden states.
GPU stages exchange through pinned host memory, not NCCL: a posted NCCL receive or send is a
kernel spinning on the GPU until the peer arrives, and whatever waits for the whole device
meanwhile (a page-locked allocation, freeing device memory, a kernel module loaded on first use)
then waits for the peer, which may be waiting for this stage. Two GPU stages over NCCL stalled so
(OPT-30B in its first step; a tiny all-GPU pipeline in the tests). The hidden states are small
beside the weights each stage streams (OPT-30B, 48 sequences: 0.7 MiB a decode step).
Each message carries the sender's clock when its data was ready: on one host (one clock) the
receiver splits its wait into the bubble (the data was not ready yet) and the transfer.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import EngineError


class PeerLost(EngineError):
    """Another stage stopped answering: a consequence of its failure, not a cause."""


@dataclass
class LinkStats:
    wait_input_s: float = 0.0  # blocked on the previous stage (or the tokens): bubble + unhidden transfer
    bubble_s: float | None = 0.0  # of which the sender had not finished the data (None: stages on several hosts)
    transfer_s: float | None = 0.0  # of which the data was on its way
    wait_send_s: float = 0.0  # blocked until a send finished
    sent_bytes: int = 0
    received_bytes: int = 0


class Incoming:
    """Posted receives; `wait()` returns the tensors once they have arrived."""

    def __init__(self, link: "StageLink", tensors: list[torch.Tensor], works: list, peer: int):
        self.link, self.tensors, self.works, self.peer = link, tensors[:-1], works, peer
        self.stamp = tensors[-1]

    def wait(self) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        self.link.finish(self.works, self.peer)
        waited = time.perf_counter() - t0
        st = self.link.stats
        st.wait_input_s += waited
        if st.bubble_s is not None:
            bubble = min(waited, max(0.0, float(self.stamp.item()) - t0))
            st.bubble_s += bubble
            st.transfer_s += waited - bubble
        device = self.link.device
        return [t.to(device, non_blocking=True) if t.device != device else t for t in self.tensors]


class StageLink:
    def __init__(self, rank: int, world: int, device: torch.device, one_host: bool):
        """Collective: every stage constructs its link, in the same order (the groups are made here).
        `one_host`: every stage on this host, so the senders' clocks are the receiver's."""
        self.rank, self.world, self.device = rank, world, device
        self.wire = torch.device("cpu")  # where messages travel from and to
        self.prev = rank - 1 if rank > 0 else None
        self.next = rank + 1 if rank + 1 < world else None
        pairs = [dist.new_group([k, k + 1], backend="gloo") for k in range(world - 1)]
        self.from_prev = pairs[rank - 1] if self.prev is not None else None
        self.to_next = pairs[rank] if self.next is not None else None
        self.token_group = dist.new_group([0, world - 1], backend="gloo")
        self.control = dist.new_group(backend="gloo")  # barriers, reports
        self.one_host = one_host
        self.stats = self.new_stats()
        self._sends: deque[tuple[list, list[torch.Tensor], int]] = deque()

    def new_stats(self) -> LinkStats:
        return LinkStats() if self.one_host else LinkStats(bubble_s=None, transfer_s=None)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def _empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        pinned = self.device.type == "cuda"  # the copy to the GPU is asynchronous
        return torch.empty(shape, dtype=dtype, device=self.wire, pin_memory=pinned)

    def recv_hidden(self, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> Incoming:
        return self._recv([self._empty(s, dtype) for s in shapes], self.prev, self.from_prev)

    def send_hidden(self, tensors: list[torch.Tensor]) -> None:
        self._send([t.contiguous() for t in tensors], self.next, self.to_next)

    def recv_tokens(self, n: int) -> Incoming:
        return self._recv([self._empty(n, torch.int64)], self.world - 1, self.token_group)

    def send_tokens(self, tokens: torch.Tensor) -> None:
        self._send([tokens.to(torch.int64).contiguous()], 0, self.token_group)

    def _recv(self, tensors: list[torch.Tensor], peer: int, group=None) -> Incoming:
        self.stats.received_bytes += sum(t.numel() * t.element_size() for t in tensors)
        tensors.append(torch.empty(1, dtype=torch.float64, device=self.wire))  # the sender's stamp
        return Incoming(self, tensors, [self._call(dist.irecv, t, peer, group) for t in tensors], peer)

    def flush(self, keep: int = 0) -> None:
        """Release finished sends, and wait for all but the `keep` most recent (their tensors
        stay alive until sent)."""
        while self._sends and all(w.is_completed() for w in self._sends[0][0]):
            works, _, peer = self._sends.popleft()
            self.finish(works, peer)  # raises if it failed
        t0 = time.perf_counter()
        while len(self._sends) > keep:
            works, _, peer = self._sends.popleft()
            self.finish(works, peer)
        self.stats.wait_send_s += time.perf_counter() - t0

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    def finish(self, works: list, peer: int) -> None:
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:  # gloo: the connection was closed
            raise PeerLost(f"lost the connection to stage {peer} ({str(e).splitlines()[0][:200]}).") from None

    def _send(self, tensors: list[torch.Tensor], peer: int, group=None) -> None:
        self.stats.sent_bytes += sum(t.numel() * t.element_size() for t in tensors)
        if self.device.type == "cuda":  # the stamp says when the data was ready, not when it was queued
            torch.cuda.current_stream(self.device).synchronize()
        tensors = [self._to_wire(t) for t in tensors]
        tensors = tensors + [torch.tensor([time.perf_counter()], dtype=torch.float64, device=self.wire)]
        works = [self._call(dist.isend, t, peer, group) for t in tensors]
        self._sends.append((works, tensors, peer))  # the tensors stay alive until sent

    def _to_wire(self, t: torch.Tensor) -> torch.Tensor:
        """A GPU tensor's copy in pinned host memory (its stream was synchronized: the data is there)."""
        if t.device == self.wire:
            return t
        out = torch.empty(t.shape, dtype=t.dtype, device=self.wire, pin_memory=True)
        return out.copy_(t)

    def _call(self, op, tensor: torch.Tensor, peer: int, group=None):
        try:
            return op(tensor, peer, group=group)
        except RuntimeError as e:
            raise PeerLost(f"lost the connection to stage {peer} ({str(e).splitlines()[0][:200]}).") from None
