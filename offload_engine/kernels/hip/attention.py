"""Attention over selected key blocks only (the attention half of HiP, see kernels/hip/select.py).

Each query block attends the key blocks listed in its row of `block_idx` (-1 entries skipped),
with a flash-style online softmax in float32. A key token is valid for a query iff
key_start[b] <= pos <= q_idx[query] and pos < key_len, where pos is the token's logical index;
`block_pos` gives the logical block of each entry when the block's data lives elsewhere (the
engine's hot-block cache keeps blocks in arbitrary slots of a compact buffer, which `block_idx`
then addresses). Entries of a row must be unique (hip_select's are). All-masked rows give 0.

Two Triton kernels, chosen by the number of query rows per program: a tile kernel (tl.dot, one
program per (b, head, query block), for prefill) and a row kernel (one query per program,
broadcast-multiply-sum, for decode). Both load the selected blocks several at a time through
gathered offsets, so the cost is the number of selected tokens, not the cache length.
On CPU tensors `block_sparse_attention` runs `block_sparse_attention_torch`, which gathers the
selected keys in PyTorch; `block_sparse_attention_reference` (dense mask, float64) is for tests.
`key_len` (keyword, optional) is the logical cache length: k.shape[2] by default, unbounded when
`block_pos` remaps blocks (then q_idx bounds the keys).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import cpu_attention
from .gather import gather_rows

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2 e)


def _check(q, k, v, block_idx, q_idx, key_start, block_size_q, block_size_k, block_pos, key_len) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, Hq, Tq, D) and k, v one (B, Hkv, Tk, D) shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head dim, "
                         "and query heads must be a multiple of kv heads.")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k and v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    bk = block_size_k
    if block_size_q < 1 or bk < 1 or bk & (bk - 1):
        raise ValueError(f"block_size_q={block_size_q} must be >= 1 and block_size_k={bk} a power of two.")
    nqb = -(-Tq // block_size_q)
    if block_idx.dim() != 4 or block_idx.shape[:3] != (B, Hq, nqb) or block_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_idx must be an int32 tensor (B, Hq, NQB, NSEL) = ({B}, {Hq}, {nqb}, NSEL); "
                         f"got {block_idx.dtype} {tuple(block_idx.shape)}.")
    if block_pos is not None and (block_pos.shape != block_idx.shape or block_pos.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"block_pos must be an int32 tensor shaped like block_idx {tuple(block_idx.shape)}.")
    if q_idx.shape != (Tq,) or q_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"q_idx must be an int32 tensor of shape ({Tq},); got {q_idx.dtype} {tuple(q_idx.shape)}.")
    if key_start is not None and (key_start.shape != (B,) or key_start.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"key_start must be None or an int32 tensor of shape ({B},).")
    if key_len is not None and key_len < 0:
        raise ValueError(f"key_len={key_len} must be >= 0 (or None).")
    tensors = (k, v, block_idx, q_idx) + tuple(t for t in (key_start, block_pos) if t is not None)
    if any(t.device != q.device for t in tensors):
        raise ValueError("all inputs must be on one device.")


def _key_len(k: torch.Tensor, block_pos: torch.Tensor | None, key_len: int | None) -> int:
    """Logical key length: the cache length unless blocks are remapped (then q_idx bounds keys)."""
    if key_len is not None:
        return key_len
    return k.shape[2] if block_pos is None else 2**31 - 1


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                           q_idx: torch.Tensor, key_start: torch.Tensor | None, block_size_q: int, block_size_k: int,
                           block_pos: torch.Tensor | None = None, *, key_len: int | None = None) -> torch.Tensor:
    """(B, Hq, Tq, D) in q.dtype; Triton on CUDA tensors; on the CPU the C++ token-list kernel for
    one query (decode), else a gathering PyTorch version."""
    if q.is_cuda:
        return block_sparse_attention_triton(q, k, v, block_idx, q_idx, key_start, block_size_q, block_size_k,
                                             block_pos, key_len=key_len)
    if q.shape[2] == 1 and cpu_attention.use_cpp():
        return block_sparse_attention_cpu(q, k, v, block_idx, q_idx, key_start, block_size_q, block_size_k,
                                          block_pos, key_len=key_len)
    return block_sparse_attention_torch(q, k, v, block_idx, q_idx, key_start, block_size_q, block_size_k,
                                        block_pos, key_len=key_len)


def _tokens(block_idx, block_pos, key_start, block_size_k, num_keys, key_len):
    """Per entry token: physical index, logical index, validity (ignoring causality); (..., NSEL*bk)."""
    off = torch.arange(block_size_k, device=block_idx.device)
    blk = block_idx.long()
    phys = (blk[..., None] * block_size_k + off).flatten(-2)
    pos = (blk if block_pos is None else block_pos.long())[..., None] * block_size_k + off
    pos = pos.flatten(-2)
    B = block_idx.shape[0]
    start = key_start.long().view(B, 1, 1, 1) if key_start is not None else 0
    ok = (blk >= 0).repeat_interleave(block_size_k, -1) & (phys < num_keys) & (pos >= start) & (pos < key_len)
    return phys, pos, ok


def block_sparse_attention_reference(q, k, v, block_idx, q_idx, key_start, block_size_q: int, block_size_k: int,
                                     block_pos=None, *, key_len: int | None = None) -> torch.Tensor:
    """Dense boolean mask (B, Hq, Tq, Tk) from the selection, then float64 masked softmax attention."""
    _check(q, k, v, block_idx, q_idx, key_start, block_size_q, block_size_k, block_pos, key_len)
    B, Hq, Tq, _ = q.shape
    Tk, group = k.shape[2], Hq // k.shape[1]
    phys, pos, ok = _tokens(block_idx, block_pos, key_start, block_size_k, Tk, _key_len(k, block_pos, key_len))
    blk_of_query = torch.arange(Tq, device=q.device) // block_size_q
    phys, pos, ok = phys[:, :, blk_of_query], pos[:, :, blk_of_query], ok[:, :, blk_of_query]
    ok &= pos <= q_idx.long()[:, None]
    mask = torch.zeros(B, Hq, Tq, Tk + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(-1, torch.where(ok, phys, Tk), True)  # invalid entries land in a dropped column
    mask = mask[..., :Tk]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    scores = (q.double() @ kk.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # an all-masked row gives 0
    return (probs @ vv).to(q.dtype)


def block_sparse_attention_cpu(q, k, v, block_idx, q_idx, key_start, block_size_q: int, block_size_k: int,
                               block_pos=None, *, key_len: int | None = None) -> torch.Tensor:
    """One query (Tq = 1): the selected blocks as a token list per (row, query head), attended by the
    C++ CPU kernel straight from the cache (fp16 read once, no gathered copy)."""
    _check(q, k, v, block_idx, q_idx, key_start, block_size_q, block_size_k, block_pos, key_len)
    phys, pos, ok = _tokens(block_idx, block_pos, key_start, block_size_k, k.shape[2], _key_len(k, block_pos, key_len))
    ok &= pos <= q_idx.long()[0]
    tokens = torch.where(ok, phys, -1)[:, :, 0]  # (B, Hq, NSEL * bk)
    return cpu_attention.cpu_gather_attention_cpp(q[:, :, 0], k, v, tokens)[:, :, None]


def block_sparse_attention_torch(q, k, v, block_idx, q_idx, key_start, block_size_q: int, block_size_k: int,
                                 block_pos=None, *, key_len: int | None = None) -> torch.Tensor:
    """Gather the selected keys of a few query blocks at a time; float32 softmax (any device)."""
    _check(q, k, v, block_idx, q_idx, key_start, block_size_q, block_size_k, block_pos, key_len)
    key_len = _key_len(k, block_pos, key_len)
    B, Hq, Tq, D = q.shape
    nqb, nsel = block_idx.shape[2:]
    # One query block (decode: one query) is padded only to its own length, not to block_size_q.
    Tk, group, bq = k.shape[2], Hq // k.shape[1], (block_size_q if nqb > 1 else Tq)
    dev = q.device
    phys, pos, ok = _tokens(block_idx, block_pos, key_start, block_size_k, Tk, key_len)
    qi = torch.full((nqb * bq,), -1, dtype=torch.long, device=dev)
    qi[:Tq] = q_idx
    qi = qi.view(nqb, bq)
    qpad = torch.zeros(B, Hq, nqb * bq, D, dtype=torch.float32, device=dev)
    qpad[:, :, :Tq] = q.float()
    qpad = qpad.view(B, Hq, nqb, bq, D)
    out = torch.empty(B, Hq, nqb, bq, D, dtype=torch.float32, device=dev)
    b_of = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h_of = (torch.arange(Hq, device=dev) // group).view(1, Hq, 1, 1)
    step = max(1, (1 << 24) // max(1, B * Hq * nsel * block_size_k * D))  # bounds the gathered keys
    for j in range(0, nqb, step):
        sl = slice(j, j + step)
        idx = phys[:, :, sl].clamp(0, max(Tk - 1, 0))
        kg, vg = gather_rows(k, b_of, h_of, idx).float(), gather_rows(v, b_of, h_of, idx).float()
        allowed = ok[:, :, sl, None, :] & (pos[:, :, sl, None, :] <= qi[sl, :, None])
        s = (qpad[:, :, sl] @ kg.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        m = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
        p = (s - m).exp()
        out[:, :, sl] = (p @ vg) / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return out.view(B, Hq, nqb * bq, D)[:, :, :Tq].to(q.dtype)


@triton.jit
def _bsa_tile_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, pos_ptr, qidx_ptr, start_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
    Tq, Tk, key_len, Hq, NQB, NSEL, group,
    BQ: tl.constexpr, BQ_P: tl.constexpr, BK: tl.constexpr, TN: tl.constexpr, D: tl.constexpr,
    D_P: tl.constexpr, HAS_POS: tl.constexpr, HAS_START: tl.constexpr, PREC: tl.constexpr,
):
    """One (query block, head, row): BQ queries against TN selected keys per step, with tl.dot."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    r = tl.arange(0, BQ_P)
    rows = qb * BQ + r
    row_ok = (r < BQ) & (rows < Tq)
    qi = tl.load(qidx_ptr + rows, mask=row_ok, other=-1)
    start = 0
    if HAS_START:
        start = tl.load(start_ptr + b)
    d = tl.arange(0, D_P)
    dm = d < D
    qt = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows.to(tl.int64)[:, None] * sqt
                 + d[None, :] * sqd, mask=row_ok[:, None] & dm[None, :], other=0.0)
    kvh = (h // group).to(tl.int64)
    kbase = k_ptr + b.to(tl.int64) * skb + kvh * skh
    vbase = v_ptr + b.to(tl.int64) * svb + kvh * svh
    sel = ((b * Hq + h) * NQB + qb).to(tl.int64) * NSEL
    j = tl.arange(0, TN)
    jb = j // BK
    jo = j % BK
    m_i = tl.zeros([BQ_P], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BQ_P], dtype=tl.float32)
    acc = tl.zeros([BQ_P, D_P], dtype=tl.float32)
    for t0 in range(0, NSEL, TN // BK):
        slot = t0 + jb
        blk = tl.load(idx_ptr + sel + slot, mask=slot < NSEL, other=-1)
        lblk = blk
        if HAS_POS:
            lblk = tl.load(pos_ptr + sel + slot, mask=slot < NSEL, other=-1)
        phys = blk * BK + jo
        lp = lblk * BK + jo
        kok = (blk >= 0) & (phys < Tk) & (lp >= start) & (lp < key_len)
        phys = phys.to(tl.int64)
        kt = tl.load(kbase + phys[None, :] * skt + d[:, None] * skd, mask=kok[None, :] & dm[:, None], other=0.0)
        s = tl.dot(qt, kt, input_precision=PREC) * LOG2E
        s = tl.where(kok[None, :] & (lp[None, :] <= qi[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no NaN from -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(vbase + phys[:, None] * svt + d[None, :] * svd, mask=kok[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows.to(tl.int64)[:, None] * sot + d[None, :] * sod,
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dm[None, :])


@triton.jit
def _bsa_row_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, pos_ptr, qidx_ptr, start_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
    Tq, Tk, key_len, Hq, NQB, NSEL, group,
    BQ: tl.constexpr, BK: tl.constexpr, TN: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_START: tl.constexpr,
):
    """One (query, head, row): decode, where a dot's 16-row minimum would waste 15/16 of it."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    qb = row // BQ
    qi = tl.load(qidx_ptr + row)
    start = 0
    if HAS_START:
        start = tl.load(start_ptr + b)
    d = tl.arange(0, D_P)
    dm = d < D
    qv = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + row.to(tl.int64) * sqt + d * sqd,
                 mask=dm, other=0.0).to(tl.float32)
    kvh = (h // group).to(tl.int64)
    kbase = k_ptr + b.to(tl.int64) * skb + kvh * skh
    vbase = v_ptr + b.to(tl.int64) * svb + kvh * svh
    sel = ((b * Hq + h) * NQB + qb).to(tl.int64) * NSEL
    j = tl.arange(0, TN)
    jb = j // BK
    jo = j % BK
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D_P], dtype=tl.float32)
    for t0 in range(0, NSEL, TN // BK):
        slot = t0 + jb
        blk = tl.load(idx_ptr + sel + slot, mask=slot < NSEL, other=-1)
        lblk = blk
        if HAS_POS:
            lblk = tl.load(pos_ptr + sel + slot, mask=slot < NSEL, other=-1)
        phys = blk * BK + jo
        lp = lblk * BK + jo
        kok = (blk >= 0) & (phys < Tk) & (lp >= start) & (lp < key_len) & (lp <= qi)
        phys = phys.to(tl.int64)
        kk = tl.load(kbase + phys[:, None] * skt + d[None, :] * skd, mask=kok[:, None] & dm[None, :], other=0.0)
        s = tl.where(kok, tl.sum(kk.to(tl.float32) * qv[None, :], axis=1) * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        vv = tl.load(vbase + phys[:, None] * svt + d[None, :] * svd, mask=kok[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * vv.to(tl.float32), axis=0)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + row.to(tl.int64) * sot + d * sod,
             o.to(o_ptr.dtype.element_ty), mask=dm)


def block_sparse_attention_triton(q, k, v, block_idx, q_idx, key_start, block_size_q: int, block_size_k: int,
                                  block_pos=None, *, key_len: int | None = None, out: torch.Tensor | None = None,
                                  keys_per_tile: int | None = None, num_warps: int | None = None,
                                  num_stages: int | None = None) -> torch.Tensor:
    """Launch a Triton kernel (interpreter on CPU tensors). Tile sizes are arguments for tuning."""
    _check(q, k, v, block_idx, q_idx, key_start, block_size_q, block_size_k, block_pos, key_len)
    B, Hq, Tq, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}.")
    if keys_per_tile is not None and (keys_per_tile < 1 or keys_per_tile & (keys_per_tile - 1)):
        raise ValueError(f"keys_per_tile={keys_per_tile} must be a power of two.")
    if Tq == 0:
        return out
    nqb, nsel = block_idx.shape[2:]
    idx = block_idx.to(torch.int32).contiguous()
    pos = block_pos.to(torch.int32).contiguous() if block_pos is not None else idx
    q_idx = q_idx.to(torch.int32)
    starts = key_start.to(torch.int32) if key_start is not None else q_idx  # dummy pointer when absent
    rows = triton.next_power_of_2(min(block_size_q, Tq))
    kl = min(_key_len(k, block_pos, key_len), 2**31 - 1)
    args = (q, k, v, out, idx, pos, q_idx, starts, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Tq, k.shape[2], kl, Hq, nqb, nsel, Hq // k.shape[1])
    common = dict(BK=block_size_k, D=D, D_P=max(16, triton.next_power_of_2(D)),
                  HAS_POS=block_pos is not None, HAS_START=key_start is not None)
    if rows == 1:  # decode (or one query per block)
        tn = max(keys_per_tile or 64, block_size_k)
        _bsa_row_kernel[(Tq, Hq, B)](*args, BQ=block_size_q, TN=tn, num_warps=num_warps or 4,
                                     num_stages=num_stages or 3, **common)
    else:
        tn = max(keys_per_tile or 64, block_size_k, 16)
        _bsa_tile_kernel[(nqb, Hq, B)](*args, BQ=block_size_q, BQ_P=max(16, rows), TN=tn,
                                       PREC="ieee" if q.dtype == torch.float32 else "tf32",
                                       num_warps=num_warps or 4, num_stages=num_stages or 2, **common)
    return out
