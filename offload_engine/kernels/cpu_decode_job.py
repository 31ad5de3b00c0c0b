"""A whole CPU decode item as one C call: write the new token's keys and values into the
head-major homes at position t, then attend positions 0..t with kernels/cpu_attention.py's C++
kernel (csrc/cpu_attention.cpp, `cpu_decode_job`); or H2O's item over its slots, eviction
included (`cpu_h2o_job`). A call takes one pointer, so CUDA can run it as a host function in a
stream's order (offload_engine/kv/cpu_queue.py); `run_job` runs it on the calling thread (tests).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from .cpu_attention import _FLOATS, DTYPE_CODE, library


class DecodeJob(ctypes.Structure):
    """One decode item for `cpu_decode_job` (struct DecodeJob in the .cpp): write the new token's
    keys and values into the head-major homes at position t, then attend positions 0..t."""
    _fields_ = ([(name, ctypes.c_void_p) for name in ("qkv", "k_home", "v_home", "valid", "out")]
                + [(name, ctypes.c_int64) for name in ("B", "Hq", "Hkv", "D", "t", "ksb", "ksh", "kst",
                                                       "vsb", "vsh", "vst", "valid_sb")]
                + [(name, ctypes.c_int32) for name in ("dtype", "nthreads", "rc")])


def decode_job(qkv: torch.Tensor, k_home: torch.Tensor, v_home: torch.Tensor, t: int,
               key_valid: torch.Tensor | None, out: torch.Tensor, num_threads: int | None = None) -> DecodeJob:
    """A DecodeJob over CPU tensors: qkv (B, Hq + 2 Hkv, D) contiguous, the new token's q (already
    scaled), k and v in the homes' dtype; k_home, v_home (B, Hkv, capacity, D) with a contiguous
    head_dim; key_valid (B, >= t + 1) bool or None; out (B, Hq, D) contiguous float32. The tensors
    must outlive the job's run: the job holds their addresses only."""
    b, hkv, cap, d = k_home.shape
    _check_qkv(qkv, k_home, v_home, out)
    if not 0 <= t < cap:
        raise ValueError(f"position t={t} is outside the homes' capacity of {cap} tokens.")
    valid_ptr = valid_sb = 0
    if key_valid is not None:
        if key_valid.dtype != torch.bool or key_valid.shape[0] != b or key_valid.shape[1] <= t \
                or key_valid.stride(-1) != 1:
            raise ValueError(f"key_valid must be a bool (B={b}, >= {t + 1}) tensor with unit stride along tokens, "
                             f"got {key_valid.dtype} {tuple(key_valid.shape)}.")
        valid_ptr, valid_sb = key_valid.data_ptr(), key_valid.stride(0)
    return DecodeJob(qkv.data_ptr(), k_home.data_ptr(), v_home.data_ptr(), valid_ptr, out.data_ptr(),
                     b, out.shape[1], hkv, d, t, *k_home.stride()[:3], *v_home.stride()[:3], valid_sb,
                     DTYPE_CODE[qkv.dtype], num_threads or torch.get_num_threads(), 0)


def _check_qkv(qkv: torch.Tensor, k_home: torch.Tensor, v_home: torch.Tensor, out: torch.Tensor,
               packed: bool = False) -> None:
    """qkv and out against the homes' shape; the homes themselves unless they hold packed records."""
    b, hkv = k_home.shape[:2]
    d = qkv.shape[-1] if packed else k_home.shape[3]
    hq = qkv.shape[1] - 2 * hkv if qkv.dim() == 3 else -1
    if qkv.dtype not in _FLOATS or qkv.dim() != 3 or qkv.shape[0] != b or qkv.shape[2] != d or hq < hkv \
            or hq % hkv or not qkv.is_contiguous():
        raise ValueError(f"qkv must be a contiguous float (B={b}, Hq + 2*{hkv}, D={d}) tensor with Hq a multiple "
                         f"of {hkv}, got {qkv.dtype} {tuple(qkv.shape)}.")
    for name, x in (() if packed else (("k_home", k_home), ("v_home", v_home))):
        if x.shape != k_home.shape or x.dtype != qkv.dtype or x.stride(-1) != 1 or x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU {qkv.dtype} {tuple(k_home.shape)} head-major home with a "
                             f"contiguous head_dim, got {x.dtype} {tuple(x.shape)} on {x.device}.")
    if out.dtype != torch.float32 or tuple(out.shape) != (b, hq, d) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({b}, {hq}, {d}) tensor, got {out.dtype} "
                         f"{tuple(out.shape)}.")


class H2OJob(ctypes.Structure):
    """One H2O decode item for `cpu_h2o_job` (struct H2OJob in the .cpp): the new token into each
    (sequence, KV head)'s first free slot, attention over the occupied slots, scores accumulated,
    one slot freed above the budget (offload_engine/kv/h2o.py's rule). A packed cache also takes
    the new token's records and keeps its exact keys and values in a ring (kv/recent.py)."""
    _fields_ = ([(name, ctypes.c_void_p) for name in ("qkv", "k_home", "v_home", "position", "score", "out",
                                                       "records", "ring_k", "ring_v")]
                + [(name, ctypes.c_int64) for name in ("B", "Hq", "Hkv", "D", "C", "t", "budget", "recent",
                                                       "ksb", "ksh", "kst", "vsb", "vsh", "vst",
                                                       "record", "ring", "group_size")]
                + [(name, ctypes.c_int32) for name in ("dtype", "nthreads", "sinks", "bits")]
                + [("decay", ctypes.c_float), ("rc", ctypes.c_int32)])


@dataclass(frozen=True)
class PackedSlots:
    """What a packed slot cache adds to an H2OJob: the new token's records (B, 2, Hkv, G, R) uint8
    contiguous (keys then values, from the codec), the exact ring (B, Hkv, size, D) of keys and of
    values in the compute dtype, contiguous, and the codec's bits and group size."""

    records: torch.Tensor
    ring_k: torch.Tensor
    ring_v: torch.Tensor
    bits: int
    group_size: int


def h2o_job(qkv: torch.Tensor, k_home: torch.Tensor, v_home: torch.Tensor, position: torch.Tensor,
            score: torch.Tensor, t: int, budget: int, recent: int, sinks: bool, out: torch.Tensor,
            num_threads: int | None = None, packed: PackedSlots | None = None, decay: float = 1.0) -> H2OJob:
    """An H2OJob over CPU tensors: qkv and out as for `decode_job`; homes (B, Hkv, >= C, D) in
    qkv's dtype, or with `packed` (B, Hkv, >= C, G, R) uint8 records; position (B, Hkv, C) int64
    and score (B, Hkv, C) float32, contiguous, updated in place; `decay` as H2OConfig's."""
    b, hkv, cap = k_home.shape[:3]
    _check_qkv(qkv, k_home, v_home, out, packed=packed is not None)
    extra = (0, 0, 0, 0, 0, 0) if packed is None else _check_packed(packed, qkv, k_home, v_home)
    c = position.shape[-1] if position.dim() == 3 else -1
    for name, x, dtype in (("position", position, torch.int64), ("score", score, torch.float32)):
        if x.dtype != dtype or tuple(x.shape) != (b, hkv, c) or not x.is_contiguous() or x.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU {dtype} ({b}, {hkv}, C) tensor, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}.")
    if not 0 < c <= cap or t < 0 or not 0 <= recent <= budget:  # a budget of C or more never evicts
        raise ValueError(f"slots C={c} must fit the homes' {cap} tokens, t={t} must be >= 0 and "
                         f"0 <= recent ({recent}) <= budget ({budget}).")
    nbytes = [x.element_size() for x in (k_home, v_home)]
    strides = [st * n for x, n in zip((k_home, v_home), nbytes) for st in x.stride()[:3]]
    return H2OJob(qkv.data_ptr(), k_home.data_ptr(), v_home.data_ptr(), position.data_ptr(), score.data_ptr(),
                  out.data_ptr(), *extra[:3], b, out.shape[1], hkv, qkv.shape[-1], c, t, budget, recent, *strides,
                  *extra[3:], DTYPE_CODE[qkv.dtype], num_threads or torch.get_num_threads(), int(sinks),
                  0 if packed is None else packed.bits, decay, 0)


def _check_packed(packed: PackedSlots, qkv: torch.Tensor, k_home: torch.Tensor, v_home: torch.Tensor) -> tuple:
    """(records, ring_k, ring_v addresses, record bytes, ring size, group size) of a valid PackedSlots."""
    b, hkv, cap = k_home.shape[:3]
    d = qkv.shape[-1]
    tail = tuple(k_home.shape[3:])
    if packed.bits not in (4, 8) or packed.group_size < 2 or packed.group_size % 2:
        raise ValueError(f"the C++ job reads 4- or 8-bit records of an even group size, got {packed.bits} bits, "
                         f"groups of {packed.group_size}.")
    for name, x in (("k_home", k_home), ("v_home", v_home)):
        if x.dtype != torch.uint8 or x.dim() != 5 or tuple(x.shape) != tuple(k_home.shape) \
                or not x[0, 0, 0].is_contiguous() or x.device.type != "cpu":
            raise ValueError(f"{name} must be CPU uint8 (B, Hkv, C, G, R) records with each token's record "
                             f"contiguous, got {x.dtype} {tuple(x.shape)} on {x.device}.")
    if packed.records.dtype != torch.uint8 or tuple(packed.records.shape) != (b, 2, hkv, *tail) \
            or not packed.records.is_contiguous() or packed.records.device.type != "cpu":
        raise ValueError(f"records must be contiguous CPU uint8 ({b}, 2, {hkv}, {tail[0]}, {tail[1]}), got "
                         f"{packed.records.dtype} {tuple(packed.records.shape)} on {packed.records.device}.")
    size = packed.ring_k.shape[2] if packed.ring_k.dim() == 4 else -1
    for name, x in (("ring_k", packed.ring_k), ("ring_v", packed.ring_v)):
        if x.dtype != qkv.dtype or tuple(x.shape) != (b, hkv, size, d) or size < 1 or not x.is_contiguous() \
                or x.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU {qkv.dtype} ({b}, {hkv}, size, {d}) ring, got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}.")
    return (packed.records.data_ptr(), packed.ring_k.data_ptr(), packed.ring_v.data_ptr(), tail[0] * tail[1], size,
            packed.group_size)


def decode_job_function() -> int:
    """The address of `cpu_decode_job`, a `void (*)(void*)` for cuLaunchHostFunc (the C++ kernel
    must be available: see `use_cpp`)."""
    return ctypes.cast(library().cpu_decode_job, ctypes.c_void_p).value


def h2o_job_function() -> int:
    """The address of `cpu_h2o_job`, as `decode_job_function`."""
    return ctypes.cast(library().cpu_h2o_job, ctypes.c_void_p).value


def run_job(job: DecodeJob | H2OJob) -> None:
    """Run a job on this thread (RuntimeError if the C++ kernel is unavailable or the job fails)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU attention kernel is not available here.")
    name = "cpu_h2o_job" if isinstance(job, H2OJob) else "cpu_decode_job"
    getattr(lib, name)(ctypes.byref(job))
    if job.rc:
        raise RuntimeError(f"{name} failed with code {job.rc}.")
