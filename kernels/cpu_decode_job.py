"""A whole CPU decode item as one C call: write the new token's keys and values into the
head-major homes at position t, then attend positions 0..t with kernels/cpu_attention.py's C++
kernel (csrc/cpu_attention.cpp, `cpu_decode_job`). The call takes one pointer, so CUDA can run
it as a host function in a stream's order (offload_engine/kv/cpu_queue.py); `run_decode_job`
runs it on the calling thread (tests).
"""
from __future__ import annotations

import ctypes

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
    hq = qkv.shape[1] - 2 * hkv if qkv.dim() == 3 else -1
    if qkv.dtype not in _FLOATS or qkv.dim() != 3 or qkv.shape[0] != b or qkv.shape[2] != d or hq < hkv or hq % hkv or not qkv.is_contiguous():
        raise ValueError(f"qkv must be a contiguous float (B={b}, Hq + 2*{hkv}, D={d}) tensor with Hq a multiple "
                         f"of {hkv}, got {qkv.dtype} {tuple(qkv.shape)}.")
    for name, x in (("k_home", k_home), ("v_home", v_home)):
        if x.shape != k_home.shape or x.dtype != qkv.dtype or x.stride(-1) != 1 or x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU {qkv.dtype} {tuple(k_home.shape)} head-major home with a "
                             f"contiguous head_dim, got {x.dtype} {tuple(x.shape)} on {x.device}.")
    if not 0 <= t < cap:
        raise ValueError(f"position t={t} is outside the homes' capacity of {cap} tokens.")
    if out.dtype != torch.float32 or tuple(out.shape) != (b, hq, d) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({b}, {hq}, {d}) tensor, got {out.dtype} "
                         f"{tuple(out.shape)}.")
    valid_ptr = valid_sb = 0
    if key_valid is not None:
        if key_valid.dtype != torch.bool or key_valid.shape[0] != b or key_valid.shape[1] <= t \
                or key_valid.stride(-1) != 1:
            raise ValueError(f"key_valid must be a bool (B={b}, >= {t + 1}) tensor with unit stride along tokens, "
                             f"got {key_valid.dtype} {tuple(key_valid.shape)}.")
        valid_ptr, valid_sb = key_valid.data_ptr(), key_valid.stride(0)
    return DecodeJob(qkv.data_ptr(), k_home.data_ptr(), v_home.data_ptr(), valid_ptr, out.data_ptr(),
                     b, hq, hkv, d, t, *k_home.stride()[:3], *v_home.stride()[:3], valid_sb,
                     DTYPE_CODE[qkv.dtype], num_threads or torch.get_num_threads(), 0)


def decode_job_function() -> int:
    """The address of `cpu_decode_job`, a `void (*)(void*)` for cuLaunchHostFunc (the C++ kernel
    must be available: see `use_cpp`)."""
    return ctypes.cast(library().cpu_decode_job, ctypes.c_void_p).value


def run_decode_job(job: DecodeJob) -> None:
    """Run a job on this thread (RuntimeError if the C++ kernel is unavailable or the job fails)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU attention kernel is not available here.")
    lib.cpu_decode_job(ctypes.byref(job))
    if job.rc:
        raise RuntimeError(f"cpu_decode_job failed with code {job.rc}.")
