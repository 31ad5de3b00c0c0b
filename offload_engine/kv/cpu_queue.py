"""CPU decode attention queued on the compute stream.

Attended inline (dense.py's CpuCacheAccess), each (layer, GPU batch) item copies q/k/v to the
host, blocks the Python thread on that copy, runs the C++ kernel and copies the output back:
between two kernel runs sit the GPU work queued before the next item's q/k/v and Python's own
launch overhead, and the CPU attention, the bound of such a placement, idles meanwhile.

Queued, an item is three operations on the compute stream: an asynchronous copy of q/k/v into
pinned memory, the C++ kernel as a CUDA host function (cuLaunchHostFunc: the driver calls it
when the stream reaches it and holds the stream's later work until it returns), and a read
of the output by a GPU kernel through its mapping of the pinned buffer. The Python thread runs
ahead through the step; the host functions run in stream order, one at a time, each with every
core. H2O's item (kernels/cpu_decode_job.py's H2OJob) runs the same way, its eviction included.
Results are bit-identical to the inline path (the same kernel on the same bytes; fp32 -> fp16
rounds the same on both sides).
"""
from __future__ import annotations

import ctypes
import os
import weakref
from collections import deque
from dataclasses import replace

import torch

from offload_engine.kernels.cpu_attention import BACKEND_ENV, use_cpp
from offload_engine.kernels.cpu_decode_job import (PackedSlots, decode_job, decode_job_function, h2o_job,
                                                   h2o_job_function)

from ..io.tiers import device_view

_libcuda_handle = None
_libcuda_tried = False
_driver_launch = None


def libcuda() -> ctypes.CDLL | None:
    """The CUDA driver library, or None where it is not there."""
    global _libcuda_handle, _libcuda_tried
    if not _libcuda_tried:
        _libcuda_tried = True
        try:
            _libcuda_handle = ctypes.CDLL("libcuda.so.1")
        except OSError:
            pass
    return _libcuda_handle


def _launch_host_func():
    """libcuda's cuLaunchHostFunc, or None where the driver library is not there."""
    global _driver_launch
    if _driver_launch is None and getattr(libcuda(), "cuLaunchHostFunc", None) is not None:
        fn = libcuda().cuLaunchHostFunc
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _driver_launch = fn
    return _driver_launch


def queue_supported(device: torch.device) -> bool:
    """Whether decode attention over a CPU cache can be queued on `device`'s streams here."""
    return (device.type == "cuda" and os.environ.get(BACKEND_ENV) not in ("inline", "torch") and use_cpp()
            and _launch_host_func() is not None)


class QueuesCpuAttention:
    """A KV policy whose decode attention over CPU homes may be queued: `cpu_queue(device)` makes
    its queue on first use, where the device allows one (else None: attend inline)."""

    _queue: "CpuAttentionQueue | None" = None

    def cpu_queue(self, device: torch.device) -> "CpuAttentionQueue | None":
        if self._queue is None and queue_supported(device):
            self._queue = CpuAttentionQueue()
        return self._queue


def _drain(inflight: deque) -> None:
    """Wait for every queued job: their structs and tensors must outlive the host functions."""
    while inflight:
        inflight.popleft()[0].synchronize()


class CpuAttentionQueue:
    """Queues decode items on the current CUDA stream; one pinned staging pair per stream and shape
    (stream order keeps an item's copies and job apart from the next item's)."""

    def __init__(self):
        self._inflight: deque = deque()  # (done event, job, tensors the job points at)
        self._staging: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._records: dict[tuple, torch.Tensor] = {}  # a packed cache's new records, staged
        self._finalizer = weakref.finalize(self, _drain, self._inflight)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_home: torch.Tensor, v_home: torch.Tensor,
               t: int, key_valid: torch.Tensor | None) -> torch.Tensor:
        """q (B, 1, Hq, D) already scaled, k/v (B, 1, Hkv, D) of the new token, on the GPU; homes
        (B, Hkv, capacity, D) in host memory, written at position t. Returns (B, 1, Hq, D) on the
        GPU in q's dtype, valid in the current stream's order."""
        return self._submit(q, k, v, lambda qkv, out: decode_job(qkv, k_home, v_home, t, key_valid, out),
                            decode_job_function(), (key_valid, k_home, v_home))

    def attend_h2o(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_home: torch.Tensor,
                   v_home: torch.Tensor, position: torch.Tensor, score: torch.Tensor, t: int, budget: int,
                   recent: int, sinks: bool, packed: PackedSlots | None = None, decay: float = 1.0) -> torch.Tensor:
        """H2O's decode item (kernels/cpu_decode_job.py's H2OJob): as `attend`, over the slot homes
        (B, Hkv, >= C, D), with the slots' positions and scores (B, Hkv, C) on the host updated in
        stream order (read them only after the stream has run the item). A packed cache's `packed`
        has the new token's records on the GPU (staged here) and its exact ring on the host."""
        keep = (k_home, v_home, position, score)
        if packed is not None:
            records = self._stage(("records", *packed.records.shape), packed.records)
            packed = replace(packed, records=records)
            keep += (records, packed.ring_k, packed.ring_v)
        return self._submit(q, k, v, lambda qkv, out: h2o_job(qkv, k_home, v_home, position, score, t, budget,
                                                              recent, sinks, out, packed=packed, decay=decay),
                            h2o_job_function(), keep)

    def _stage(self, key: tuple, x: torch.Tensor) -> torch.Tensor:
        """A pinned host copy of x, made in the current stream's order into a buffer reused per
        stream and shape (the stream runs this item's job before the next item's copy)."""
        key = (torch.cuda.current_stream(x.device).cuda_stream, *key)
        if key not in self._records:
            self._records[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host = self._records[key]
        host.copy_(x, non_blocking=True)
        return host

    def _submit(self, q, k, v, make_job, function: int, keep: tuple) -> torch.Tensor:
        """Stage q/k/v, queue `function` over make_job(qkv_host, out_host), read the output back;
        `keep`: tensors the job points at, held until it has run."""
        self._retire()
        stream = torch.cuda.current_stream(q.device)
        b, _, hq, d = q.shape
        hkv = k.shape[2]
        key = (stream.cuda_stream, b, hq, hkv, d, q.dtype)
        if key not in self._staging:
            out_host = torch.empty(b, hq, d, dtype=torch.float32, pin_memory=True)
            self._staging[key] = (torch.empty(b, hq + 2 * hkv, d, dtype=q.dtype, pin_memory=True),
                                  out_host, device_view(out_host, q.device))
        qkv_host, out_host, out_mapped = self._staging[key]
        qkv_host.copy_(torch.cat([q, k, v], dim=2).view(qkv_host.shape), non_blocking=True)
        job = make_job(qkv_host, out_host)
        rc = _launch_host_func()(stream.cuda_stream, function, ctypes.addressof(job))
        if rc:
            raise RuntimeError(f"cuLaunchHostFunc failed with CUDA error {rc}.")
        # Read through the mapping, not copied: a host-to-device copy queues behind the weight
        # copies in flight (tens of ms a layer), and the next item's attention would wait with it.
        # copy=True: a fresh GPU tensor even where q is fp32, never a view of the reused staging buffer.
        out = (out_mapped.to(q.dtype, copy=True) if out_mapped is not None
               else out_host.to(q.device, non_blocking=True).to(q.dtype))
        done = torch.cuda.Event()
        done.record(stream)
        self._inflight.append((done, job, keep))
        return out[:, None]

    def _retire(self) -> None:
        while self._inflight and self._inflight[0][0].query():
            _, job, _ = self._inflight.popleft()
            if job.rc:
                raise RuntimeError(f"a queued CPU attention job failed with code {job.rc}.")

    def drain(self) -> None:
        """Block until every queued item has run (RuntimeError if one failed)."""
        while self._inflight:
            self._inflight[0][0].synchronize()
            self._retire()
