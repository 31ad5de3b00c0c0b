"""H2O's decode attention on the CPU: one query per sequence over the slots of its heavy-hitter
cache, returning the attention each slot received (what H2O accumulates) beside the output.

The cache is small (the budget, e.g. 103 slots of OPT-30B at 512 tokens) but there are many of
them: PyTorch's batched matmuls over (B, Hkv, 1, C) x (B, Hkv, C, D) in fp16 ran at a few GB/s
on the host. The C++ kernel of kernels/cpu_attention.py (csrc/cpu_attention.cpp,
`cpu_slot_attention`) reads each slot's key and value once, converts in registers, and writes
the probability sums from the softmax it already keeps in cache.

Layouts: q (B, Hq, D) already scaled; k, v (B, Hkv, C, D) views with a contiguous head_dim (the
head-major home[:, :, :C]); valid (B, Hkv, C) bool, the slots that hold a token (each (sequence,
KV head) needs at least one). Returns out (B, Hq, D) in q.dtype and probs (B, Hkv, C) float32:
softmax probabilities summed over the query heads that share the KV head.
"""
from __future__ import annotations

import torch

from .cpu_attention import DTYPE_CODE, library

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
    if q.dim() != 3 or q.dtype not in _FLOATS:
        raise ValueError(f"q must be a (B, Hq, D) float tensor, got {q.dtype} {tuple(q.shape)}.")
    b, hq, d = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype or k.dtype not in _FLOATS:
        raise ValueError(f"k and v must be float (B, Hkv, C, D) tensors of one shape and dtype, got k {k.dtype} "
                         f"{tuple(k.shape)}, v {v.dtype} {tuple(v.shape)}.")
    hkv, c = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hkv < 1 or hq % hkv:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: (B, Hkv, C, D) with Hq a "
                         "multiple of Hkv.")
    if (k.stride(-1) != 1 or v.stride(-1) != 1) and d > 1:
        raise ValueError("k and v need a contiguous head_dim (stride(-1) == 1).")
    if valid.dtype != torch.bool or tuple(valid.shape) != (b, hkv, c):
        raise ValueError(f"valid must be a bool ({b}, {hkv}, {c}) tensor, got {valid.dtype} {tuple(valid.shape)}.")
    if any(x.device.type != "cpu" for x in (q, k, v, valid)):
        raise ValueError("q, k, v and valid must be CPU tensors.")
    if not bool(valid.any(-1).all()):
        raise ValueError("valid leaves a (sequence, KV head) without any slot; each needs at least one.")


def slot_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
    """Float64 softmax(q K^T) V over the valid slots, and the probabilities summed per KV head."""
    _check(q, k, v, valid)
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.double().reshape(b, hkv, hq // hkv, d)
    scores = (qg @ k.double().transpose(-1, -2)).masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = probs @ v.double().masked_fill(~valid[..., None], 0.0)   # free slots may hold anything
    return out.reshape(b, hq, d), probs.sum(2)


def cpu_slot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                       num_threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernel; RuntimeError if it could not be built (the caller keeps its PyTorch path)."""
    _check(q, k, v, valid)
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU attention kernel is not available here.")
    b, hq, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    qf = q.float().contiguous()
    ok = (valid if valid.stride(-1) == 1 else valid.contiguous()).view(torch.uint8)
    out = torch.empty(b, hq, d, dtype=torch.float32)
    probs = torch.empty(b, hkv, c, dtype=torch.float32)
    rc = lib.cpu_slot_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), ok.data_ptr(), out.data_ptr(), probs.data_ptr(), b, hq, hkv, c, d,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), ok.stride(0), ok.stride(1),
        DTYPE_CODE[k.dtype], num_threads or torch.get_num_threads())
    if rc:
        raise RuntimeError(f"cpu_slot_attention C++ kernel failed with code {rc}.")
    return out.to(q.dtype), probs
