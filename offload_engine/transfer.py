"""Copies between tiers that overlap with compute.

On a GPU, loads and stores run on their own CUDA streams; disk reads and writes run on
background threads. Every copy returns a `Pending`; the consumer calls `wait()` before use.
Without overlap (or without a GPU) copies run inline, except disk I/O, which still goes to
threads when overlap is on so that it runs beside compute.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Sequence

import torch

from .profiler import Profiler


class Pending:
    """A copy in flight."""

    __slots__ = ("event", "future")

    def __init__(self, event: "torch.cuda.Event | None" = None, future: Future | None = None):
        self.event = event
        self.future = future

    def _resolve(self) -> None:
        future = self.future  # may be resolved by several threads at once
        if future is not None:
            self.event = future.result()
            self.future = None

    def wait(self) -> None:
        """Order the current stream after this copy; block the host for disk I/O."""
        self._resolve()
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the copy is done."""
        self._resolve()
        if self.event is not None:
            self.event.synchronize()


DONE = Pending()


class Mover:
    def __init__(self, device: torch.device, overlap: bool, profiler: Profiler, io_threads: int = 4):
        self.cuda = device.type == "cuda"
        self.profiler = profiler
        self.load_stream = torch.cuda.Stream(device) if self.cuda and overlap else None
        self.store_stream = torch.cuda.Stream(device) if self.cuda and overlap else None
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="disk-io") if overlap else None

    def load(self, dst: torch.Tensor, src: torch.Tensor, category: str, from_disk: bool = False,
             after: Sequence[Pending] = ()) -> Pending:
        """dst (compute device) <- src (host or disk), after `after` and all compute issued so far."""
        return self._copy(dst, src, self.load_stream, category, from_disk, after)

    def store(self, dst: torch.Tensor, src: torch.Tensor, category: str, to_disk: bool = False) -> Pending:
        """dst (host or disk) <- src (compute device), after the compute that produced src."""
        if self.store_stream is not None:
            src.record_stream(self.store_stream)  # keep src's memory until the copy is done
        return self._copy(dst, src, self.store_stream, category, to_disk, ())

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

    def on_host(self, fn) -> Pending:
        """Run host-side work (e.g. a copy between host buffers) beside compute when overlapping."""
        if self.pool is None:
            fn()
            return DONE
        return Pending(future=self.pool.submit(fn))  # fn returns None: no event to wait on

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
