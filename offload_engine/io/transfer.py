"""Copies between tiers that overlap with compute.

On a GPU, loads and stores run on their own CUDA streams; disk reads and writes run on
background threads. Every copy returns a `Pending`; the consumer calls `wait()` before use.
Without overlap (or without a GPU) copies run inline, except disk I/O, which still goes to
threads when overlap is on so that it runs beside compute.

Contiguous disk tensors go through the disk relay (disk_relay.py): large pread/pwrite on
worker threads into a ring of pinned buffers and asynchronous copies from there, instead of a
pageable, page-faulting copy from the memory mapping.

A write to disk holds its source (on the compute device) until the disk has taken it, and a
disk is slower than the compute that fills it (a prefill produces its KV cache faster than a
disk writes it). `disk_store_budget` bounds the source bytes queued writes may hold: a store
that would exceed it first waits for the oldest ones, so the device memory they pin is the
plan's (`MemoryPlan.disk_store_bytes`), not whatever the disk has fallen behind by.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Sequence

import torch

from ..profiler import Profiler


class Pending:
    """A copy in flight: a CUDA event, a future of one (or of a relay transfer), or nothing."""

    __slots__ = ("event", "future", "handle")

    def __init__(self, event: "torch.cuda.Event | None" = None, future: Future | None = None, handle=None):
        self.event = event
        self.future = future
        self.handle = handle  # a disk relay transfer (has wait/synchronize)

    def _resolve(self) -> None:
        future = self.future  # may be resolved by several threads at once
        if future is not None:
            result = future.result()
            if hasattr(result, "synchronize"):
                if isinstance(result, torch.cuda.Event):
                    self.event = result
                else:
                    self.handle = result
            self.future = None

    def wait(self) -> None:
        """Order the current stream after this copy; block the host for disk I/O."""
        self._resolve()
        if self.handle is not None:
            self.handle.wait()
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the copy is done."""
        self._resolve()
        if self.handle is not None:
            self.handle.synchronize()
        if self.event is not None:
            self.event.synchronize()


DONE = Pending()


class Mover:
    def __init__(self, device: torch.device, overlap: bool, profiler: Profiler, io_threads: int = 4,
                 relay=None, disk=None, disk_store_budget: int | None = None):
        self.cuda = device.type == "cuda"
        self.disk_store_budget = disk_store_budget  # source bytes queued disk writes may hold (None: no bound)
        self._disk_stores: deque[tuple[Pending, int]] = deque()
        self._disk_store_bytes = 0
        self.profiler = profiler
        self.relay, self.disk = relay, disk  # DiskRelay, and the DiskStorage that knows the files
        streams = self.cuda and overlap
        # Weights get a load stream of their own: a layer's weights take milliseconds to copy,
        # and a stream runs its copies in order, so a GPU batch's hidden states or KV cache
        # queued behind the next layers' weights would hold its compute (and its CPU attention)
        # until those weights had arrived.
        self.weight_stream = torch.cuda.Stream(device) if streams else None
        self.load_stream = torch.cuda.Stream(device) if streams else None
        self.store_stream = torch.cuda.Stream(device) if streams else None
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="disk-io") if overlap else None

    def load(self, dst: torch.Tensor, src: torch.Tensor, category: str, from_disk: bool = False,
             after: Sequence[Pending] = ()) -> Pending:
        """dst (compute device) <- src (host or disk), after `after` and all compute issued so far."""
        where = self._on_disk(src, dst) if from_disk else None
        if where is not None:
            return self._relay(lambda: self.relay.load(dst, *where), category, after)
        stream = self.weight_stream if category == "weight_io" else self.load_stream
        return self._copy(dst, src, stream, category, from_disk, after)

    def store(self, dst: torch.Tensor, src: torch.Tensor, category: str, to_disk: bool = False) -> Pending:
        """dst (host or disk) <- src (compute device), after the compute that produced src."""
        nbytes = src.numel() * src.element_size()
        if to_disk:
            self._make_room(nbytes)
        where = self._on_disk(dst, src) if to_disk else None
        if where is not None:  # the relay orders itself after the compute issued so far
            pending = self._relay(lambda: self.relay.store(src, *where), category, ())
        else:
            if self.store_stream is not None:
                src.record_stream(self.store_stream)  # keep src's memory until the copy is done
            pending = self._copy(dst, src, self.store_stream, category, to_disk, ())
        if to_disk and self.disk_store_budget is not None:
            self._disk_stores.append((pending, nbytes))
            self._disk_store_bytes += nbytes
        return pending

    def _make_room(self, nbytes: int) -> None:
        """Wait for the oldest queued disk writes until this one fits the budget (one larger than
        the whole budget waits for all of them, then goes alone)."""
        if self.disk_store_budget is None:
            return
        while self._disk_stores and self._disk_store_bytes + nbytes > self.disk_store_budget:
            pending, held = self._disk_stores.popleft()
            self._disk_store_bytes -= held  # a failed write raises here, and no longer counts
            pending.synchronize()

    @property
    def disk_store_bytes(self) -> int:
        """Source bytes of the disk writes not yet known to be done (at most the budget, or one write)."""
        return self._disk_store_bytes

    def _copy(self, dst, src, stream, category, disk, after: Sequence[Pending]) -> Pending:
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()  # the compute issued so far: producers of src, readers of dst's old data

        def run() -> "torch.cuda.Event | None":
            for p in after:
                p._resolve()
            ctx = torch.cuda.stream(stream) if stream is not None else nullcontext()
            with ctx:
                s = torch.cuda.current_stream() if self.cuda else None
                if s is not None:
                    s.wait_event(ready)
                    for p in after:
                        if p.event is not None:
                            s.wait_event(p.event)
                with self.profiler.span(category, s, host=disk):
                    dst.copy_(src, non_blocking=not disk)
                if s is None:
                    return None
                done = torch.cuda.Event()
                done.record(s)
                return done

        if disk and self.pool is not None:
            return Pending(future=self.pool.submit(run))
        return Pending(event=run())

    def _on_disk(self, disk_side: torch.Tensor, other: torch.Tensor):
        if self.relay is None or not other.is_contiguous():
            return None
        return self.disk.locate(disk_side)

    def _relay(self, start, category: str, after: Sequence[Pending]) -> Pending:
        """Start a relay transfer once `after` is done (host writes through the mapping must land
        before the relay reads the file); time it when profiling."""
        def run():
            for p in after:
                p.synchronize()
            if not self.profiler.enabled:
                return start()
            with self.profiler.span(category, None, host=True):
                handle = start()
                handle.synchronize()
            return handle

        if self.pool is None and not after:
            return Pending(handle=start())
        if self.pool is None:
            return Pending(handle=run())
        return Pending(future=self.pool.submit(run))

    def on_host(self, fn) -> Pending:
        """Run host-side work (e.g. a copy between host buffers) beside compute when overlapping."""
        if self.pool is None:
            fn()
            return DONE
        return Pending(future=self.pool.submit(fn))  # fn returns None: no event to wait on

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.relay is not None:
            self.relay.close()
