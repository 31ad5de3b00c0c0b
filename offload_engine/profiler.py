"""Busy time per category (weight I/O, KV I/O, compute...), measured on the stream doing the work.

With overlap, categories run at the same time, so their sum exceeds the wall time: the
largest one is the bottleneck. Off by default: events cost a little.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Profiler:
    def __init__(self, enabled: bool = False, timeline: bool = False):
        self.enabled = enabled or timeline
        self.timeline = timeline  # also keep each collect()'s GPU spans: (category, start ms, end ms)
        self.timelines: list[list[tuple[str, float, float]]] = []
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._host: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def span(self, category: str, stream: "torch.cuda.Stream | None" = None, host: bool = False):
        """Time the work issued inside: with CUDA events on `stream`, or the host clock."""
        if not self.enabled:
            yield
            return
        if stream is not None and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            yield
            end.record(stream)
            with self._lock:
                self._events.append((category, start, end))
            return
        if stream is not None:
            stream.synchronize()
        t0 = time.perf_counter()
        yield
        if stream is not None:
            stream.synchronize()
        with self._lock:
            self._host[category] += time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        """Seconds per category since the last call (waits for the timed work to finish)."""
        if not self.enabled:
            return {}
        with self._lock:
            events, self._events = self._events, []
            out: dict[str, float] = defaultdict(float, self._host)
            self._host.clear()
        for cat, start, end in events:
            end.synchronize()  # only the timed work: a whole-device sync would also wait for whatever
            out[cat] += start.elapsed_time(end) / 1e3  # else is queued (a pipeline stage's posted receive)
        if self.timeline and events:  # offsets from the first span issued, in issue order
            base = events[0][1]
            self.timelines.append([(cat, base.elapsed_time(start), base.elapsed_time(end))
                                   for cat, start, end in events])
        return dict(out)


def mean_split(splits: list[dict[str, float]]) -> dict[str, float]:
    """Seconds per category averaged over steps (the decode steps' `collect()` results)."""
    return {k: sum(sp.get(k, 0.0) for sp in splits) / len(splits) for k in splits[0]} if splits else {}
