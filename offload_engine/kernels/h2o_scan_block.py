"""The sequential part of teacher-forced H2O (offload_engine/kv/h2o_scan.py): one block of queries,
step by step, over the columns the block may attend.

Columns (B, Hkv, K) hold ascending positions: the k0 tokens kept before the block, then the
block's own n tokens (query i's token is column k0 + i). Step i keeps its column with a score
of 0 (minus its position for the sink baseline, whose scores never grow), takes the softmax of
its query rows' logits over the kept columns up to its own, scales the scores by `decay` (1:
H2O's sum; 0: TOVA's last step alone) and adds the probabilities, summed over the KV head's
query heads, and once its position is past the budget frees the
lowest-scoring kept column older than the recent window (ties: the earliest position): H2O's
rule (kv/h2o.py). Only softmax and eviction are left here: the logits before and the outputs
after are two matmuls over the whole block.

Two implementations: a PyTorch loop (any device; the reference) and a C++ loop on the CPU
(csrc/cpu_attention.cpp, `cpu_h2o_scan_block`, one task per sequence and KV head), where the
PyTorch loop's dozen small ops a step cost more than the step's arithmetic.

Layouts: logits (B, Hkv, n, rep, K) float32; kept (B, Hkv, K) bool and score (B, Hkv, K) float32,
updated in place; pos (B, Hkv, K) int64. Returns probs (B, Hkv, n, rep, K) float32, zeros outside
each step's kept columns. No padding: exactly one token is over the budget once a step's
position reaches it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .cpu_attention import library, use_cpp


def _check(logits: torch.Tensor, kept: torch.Tensor, score: torch.Tensor, pos: torch.Tensor, k0: int) -> None:
    if logits.dim() != 5 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a float32 (B, Hkv, n, rep, K) tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}.")
    b, hkv, n, _, k = logits.shape
    for name, x, dtype in (("kept", kept, torch.bool), ("score", score, torch.float32), ("pos", pos, torch.int64)):
        if x.dtype != dtype or tuple(x.shape) != (b, hkv, k) or x.device != logits.device:
            raise ValueError(f"{name} must be a {dtype} ({b}, {hkv}, {k}) tensor on {logits.device}, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}.")
    if not 0 <= k0 <= k - n:
        raise ValueError(f"k0={k0} leaves no column for each of the block's {n} queries among K={k}.")


def scan_block_torch(logits: torch.Tensor, kept: torch.Tensor, score: torch.Tensor, pos: torch.Tensor, k0: int,
                     budget: int, recent: int, sinks: bool, decay: float = 1.0) -> torch.Tensor:
    """The PyTorch loop (the reference)."""
    _check(logits, kept, score, pos, k0)
    probs = torch.zeros_like(logits)
    first = int(pos[0, 0, k0])  # the block's own columns hold the same positions in every row
    for i in range(logits.shape[2]):
        c, t = k0 + i, first + i
        used = c + 1
        kept[..., c] = True
        score[..., c] = -float(t) if sinks else 0.0
        p = logits[:, :, i, :, :used].masked_fill(~kept[:, :, None, :used], float("-inf")).softmax(-1)
        probs[:, :, i, :, :used] = p
        if not sinks:
            if decay != 1:
                score[..., :used].mul_(decay)
            score[..., :used] += p.sum(2)
        if t + 1 > budget:
            old = kept[..., :used] & (pos[..., :used] < t + 1 - recent)
            victim = score[..., :used].masked_fill(~old, float("inf")).argmin(-1, keepdim=True)  # first = earliest
            kept.scatter_(-1, victim, False)
            score.scatter_(-1, victim, 0.0)
    return probs


def scan_block_cpp(logits: torch.Tensor, kept: torch.Tensor, score: torch.Tensor, pos: torch.Tensor, k0: int,
                   budget: int, recent: int, sinks: bool, decay: float = 1.0,
                   num_threads: int | None = None) -> torch.Tensor:
    """The C++ loop on CPU tensors (RuntimeError if the kernel could not be built here)."""
    _check(logits, kept, score, pos, k0)
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU attention kernel is not available here.")
    if logits.device.type != "cpu" or not all(x.is_contiguous() for x in (logits, kept, score, pos)):
        raise ValueError("logits, kept, score and pos must be contiguous CPU tensors.")
    b, hkv, n, rep, k = logits.shape
    probs = torch.empty_like(logits)
    rc = lib.cpu_h2o_scan_block(logits.data_ptr(), probs.data_ptr(), kept.view(torch.uint8).data_ptr(),
                                score.data_ptr(), pos.data_ptr(), b * hkv, n, rep, k, k0, budget, recent, int(sinks),
                                decay, num_threads or torch.get_num_threads())
    if rc:
        raise RuntimeError(f"cpu_h2o_scan_block C++ kernel failed with code {rc}.")
    return probs


def scan_block(logits: torch.Tensor, kept: torch.Tensor, score: torch.Tensor, pos: torch.Tensor, k0: int,
               budget: int, recent: int, sinks: bool, decay: float = 1.0) -> torch.Tensor:
    """The C++ loop on the CPU where it is built (OFFLOAD_ENGINE_CPU_ATTENTION=torch: not), else PyTorch's."""
    if logits.device.type != "cpu":
        return scan_block_torch(logits, kept, score, pos, k0, budget, recent, sinks, decay)
    if use_cpp():
        return scan_block_cpp(logits, kept, score, pos, k0, budget, recent, sinks, decay)
    with intra_op_threads(1):  # a step's ops are a few thousand elements
        return scan_block_torch(logits, kept, score, pos, k0, budget, recent, sinks, decay)


@contextmanager
def intra_op_threads(threads: int):
    """PyTorch's intra-op threads (and so the C++ kernel's) set to `threads` within: for small
    ops, since on a busy host waking the pool cost milliseconds an op (2 cores shared with other
    work: index_select of 1.2 MB 5.4 ms on two threads, 0.21 ms on one)."""
    saved = torch.get_num_threads()
    if threads == saved:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
