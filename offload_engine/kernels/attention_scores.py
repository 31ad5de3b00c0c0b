"""Causal attention that also returns how much attention each key received (H2O scores).

H2O keeps, per layer, sequence and KV head, the keys with the largest accumulated softmax
probability. After prefill that is the column sum of the (Tq x Tk) probability matrix over
all valid queries and over the query heads of a KV group; the matrix itself is never built.

Conventions are those of kernels/attention.py: q (B, Hq, Tq, D) already scaled; k, v
(B, Hkv, Tk, D), possibly strided cache views; the queries are the last Tq of Tk positions;
a query sees `causal & key_valid`, plus always its own key (so a padded row is never empty).
Query head h uses KV head h // (Hq // Hkv).

On CUDA two deterministic Triton passes run (no atomics, so scores are reproducible):
pass 1 is flash attention per (b, h, query tile) and stores each row's log-sum-exp; pass 2
runs per (b, kv head, key tile), loops over the group's query heads and query tiles,
recomputes p = exp(s - lse) and sums it over queries. On CPU a chunked PyTorch version runs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_CPU_CHUNK_ELEMS = 1 << 24  # score elements per query chunk on CPU (64 MiB in fp32)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
           query_valid: torch.Tensor | None, dtypes: tuple[torch.dtype, ...] = _DTYPES) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T, D), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D; reshape them.")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ; pass keys and values of one cache.")
    (b, hq, tq, d), (bk, hkv, tk, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim; "
                         "pass matching tensors.")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads; fix the head counts.")
    if not 1 <= tq <= tk:
        raise ValueError(f"need 1 <= Tq <= Tk, got Tq={tq}, Tk={tk}; the queries must be the last Tq keys.")
    if q.dtype != k.dtype or k.dtype != v.dtype or q.dtype not in dtypes:
        raise ValueError(f"q, k, v must share one dtype of {dtypes}, got {q.dtype}, {k.dtype}, {v.dtype}; cast them.")
    if q.device != k.device or k.device != v.device:
        raise ValueError("q, k, v are on different devices; move them to one device.")
    for name, mask, n in (("key_valid", key_valid, tk), ("query_valid", query_valid, tq)):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, n) or mask.device != q.device):
            raise ValueError(f"{name} must be a bool ({b}, {n}) tensor on {q.device}, got {mask.dtype} "
                             f"{tuple(mask.shape)} on {mask.device}; pass one flag per sequence and token.")


def _allowed(tq: int, tk: int, key_valid: torch.Tensor | None, device: torch.device, start: int = 0,
             stop: int | None = None, keys: int | None = None) -> torch.Tensor:
    """(B or 1, rows, keys) bool: causal & key_valid, plus each query's own key."""
    stop, keys = tq if stop is None else stop, tk if keys is None else keys
    pos = torch.arange(start, stop, device=device)[:, None] + (tk - tq)
    cols = torch.arange(keys, device=device)[None, :]
    causal = (cols <= pos)[None]
    if key_valid is not None:
        causal = causal & key_valid[:, None, :keys]
    return causal | (cols == pos)[None]


def attention_with_column_sums_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                         key_valid: torch.Tensor | None = None,
                                         query_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 dense masked softmax: (out (B, Hq, Tq, D), colsum (B, Hkv, Tk)), both float64."""
    _check(q, k, v, key_valid, query_valid, _DTYPES + (torch.float64,))
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    kr = k.double().repeat_interleave(group, dim=1)
    vr = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ kr.transpose(-1, -2)
    scores = scores.masked_fill(~_allowed(tq, tk, key_valid, q.device)[:, None], float("-inf"))
    p = scores.softmax(-1)
    counted = p * query_valid[:, None, :, None] if query_valid is not None else p
    return p @ vr, counted.sum(2).unflatten(1, (hkv, group)).sum(2)


def attention_with_column_sums_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     key_valid: torch.Tensor | None = None, query_valid: torch.Tensor | None = None,
                                     chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version (the CPU path): queries in chunks of `chunk` rows, so memory stays bounded."""
    _check(q, k, v, key_valid, query_valid)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group, offset = hq // hkv, tk - tq
    chunk = chunk or max(1, _CPU_CHUNK_ELEMS // (b * hq * tk))
    # fp32 scores: fp16 matmuls round every score; k/v are converted once (a no-op for fp32).
    kf, vf = k.float(), v.float()
    qg = q.unflatten(1, (hkv, group))
    out = torch.empty(b, hkv, group, tq, d, dtype=q.dtype, device=q.device)
    colsum = torch.zeros(b, hkv, tk, dtype=torch.float32, device=q.device)
    for i0 in range(0, tq, chunk):
        i1 = min(tq, i0 + chunk)
        t = offset + i1  # the keys these queries can see
        # The group's heads are folded into rows, so k is never repeated.
        rows = qg[:, :, :, i0:i1].float().reshape(b, hkv, group * (i1 - i0), d)
        s = (rows @ kf[:, :, :t].transpose(-1, -2)).unflatten(2, (group, i1 - i0))
        s.masked_fill_(~_allowed(tq, tk, key_valid, q.device, i0, i1, t)[:, None, None], float("-inf"))
        p = s.softmax(-1)
        out[:, :, :, i0:i1] = (p.flatten(2, 3) @ vf[:, :, :t]).unflatten(2, (group, i1 - i0)).to(q.dtype)
        if query_valid is not None:
            p = p * query_valid[:, None, None, i0:i1, None]
        colsum[:, :, :t] += p.sum(dim=(2, 3))
    return out.flatten(1, 2), colsum


@triton.jit
def _forward_tile(q, m_i, l_i, acc, k_base, v_base, kvalid_base, n0, pos, tk, skt, skd, svt, svd,
                  CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of online softmax; CAUSAL tiles add the causal mask, each query's own key and bounds."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    kt = tl.load(k_base + offs_n64[None, :] * skt + offs_d[:, None] * skd,
                 mask=(offs_n[None, :] < tk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * 1.4426950408889634  # x log2(e): exp2 below
    if HAS_KEY_VALID:
        kv = tl.load(kvalid_base + offs_n, mask=offs_n < tk, other=0) != 0
        if CAUSAL:
            ok = ((offs_n[None, :] <= pos[:, None]) & kv[None, :]) | (offs_n[None, :] == pos[:, None])
            s = tl.where(ok, s, float("-inf"))
        else:
            s = tl.where(kv[None, :], s, float("-inf"))
    elif CAUSAL:
        s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    vt = tl.load(v_base + offs_n64[:, None] * svt + offs_d[None, :] * svd,
                 mask=(offs_n[:, None] < tk) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, kvalid_ptr, out_ptr, lse_ptr,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, skvb,
                    hq, group, tq, tk,
                    HAS_KEY_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Last query tiles see the most keys: launch them first.
    m0 = (tl.cdiv(tq, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // hq).to(tl.int64), (bh % hq).to(tl.int64)
    kvh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m + (tk - tq)  # key index of each query
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqt + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < tq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    kvalid_base = kvalid_ptr + b * skvb
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a fully masked tile gives p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    band = ((tk - tq + m0) // BLOCK_N) * BLOCK_N  # keys below it are causally visible to every row
    for n0 in range(0, band, BLOCK_N):
        m_i, l_i, acc = _forward_tile(q, m_i, l_i, acc, k_base, v_base, kvalid_base, n0, pos, tk, skt, skd,
                                      svt, svd, False, HAS_KEY_VALID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    for n0 in range(band, tl.minimum(tk, tk - tq + m0 + BLOCK_M), BLOCK_N):
        m_i, l_i, acc = _forward_tile(q, m_i, l_i, acc, k_base, v_base, kvalid_base, n0, pos, tk, skt, skd,
                                      svt, svd, True, HAS_KEY_VALID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past tq only; real rows always see their own key
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * sot + offs_d[None, :] * sod,
             out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < tq) & (offs_d[None, :] < HEAD_DIM))
    tl.store(lse_ptr + bh.to(tl.int64) * tq + offs_m, m_i + tl.log2(l_i), mask=offs_m < tq)


@triton.jit
def _query_tile_logits(q_base, lse_base, qvalid_base, kt, m0, tq, sqt, sqd,
                      HAS_QUERY_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """s - lse (log2 units) of one query tile against the program's key tile; -inf for rows that do not count."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * sqt + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < tq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    # lse = +inf for rows past tq and padded queries makes their p exactly 0 without a 2-D mask.
    lse = tl.load(lse_base + offs_m, mask=offs_m < tq, other=float("inf"))
    if HAS_QUERY_VALID:
        qv = tl.load(qvalid_base + offs_m, mask=offs_m < tq, other=0)
        lse = tl.where(qv != 0, lse, float("inf"))
    return tl.dot(q, kt, input_precision=DOT_PRECISION) * 1.4426950408889634 - lse[:, None]


@triton.jit
def _column_sum_kernel(q_ptr, k_ptr, kvalid_ptr, qvalid_ptr, lse_ptr, colsum_ptr,
                       sqb, sqh, sqt, sqd, skb, skh, skt, skd, skvb, sqvb,
                       hkv, group, tq, tk,
                       HAS_KEY_VALID: tl.constexpr, HAS_QUERY_VALID: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, kvh = (bh // hkv).to(tl.int64), (bh % hkv).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt = tl.load(k_ptr + b * skb + kvh * skh + offs_n.to(tl.int64)[None, :] * skt + offs_d[:, None] * skd,
                 mask=(offs_n[None, :] < tk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    kv = offs_n < tk
    if HAS_KEY_VALID:
        kv = kv & (tl.load(kvalid_ptr + b * skvb + offs_n, mask=offs_n < tk, other=0) != 0)
    offset = tk - tq
    start = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M  # earlier queries cannot see this key tile
    # Query tiles from `full` on sit strictly after the key tile: no causal mask, no own key in it
    # (so `kv` can drop padded keys afterwards; it also drops keys past tk).
    full = tl.cdiv(tl.maximum(n0 + BLOCK_N - offset, 0), BLOCK_M) * BLOCK_M
    full = tl.minimum(full, tl.cdiv(tq, BLOCK_M) * BLOCK_M)
    band_acc = tl.zeros([BLOCK_N], tl.float32)
    free_acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, group):
        h = kvh * group + g
        q_base = q_ptr + b * sqb + h * sqh
        lse_base = lse_ptr + (b * hkv * group + h) * tq
        qvalid_base = qvalid_ptr + b * sqvb
        for m0 in range(start, full, BLOCK_M):
            x = _query_tile_logits(q_base, lse_base, qvalid_base, kt, m0, tq, sqt, sqd, HAS_QUERY_VALID,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
            pos = m0 + tl.arange(0, BLOCK_M) + offset
            ok = ((offs_n[None, :] <= pos[:, None]) & kv[None, :]) | (offs_n[None, :] == pos[:, None])
            band_acc += tl.sum(tl.exp2(tl.where(ok, x, float("-inf"))), axis=0)  # mask first: no overflow
        for m0 in range(full, tq, BLOCK_M):
            x = _query_tile_logits(q_base, lse_base, qvalid_base, kt, m0, tq, sqt, sqd, HAS_QUERY_VALID,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
            free_acc += tl.sum(tl.exp2(x), axis=0)
    colsum = band_acc + tl.where(kv, free_acc, 0.0)  # padded keys get nothing off the diagonal
    tl.store(colsum_ptr + bh.to(tl.int64) * tk + offs_n, colsum, mask=offs_n < tk)


def _launchable(q: torch.Tensor, programs: int) -> None:
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton launcher needs CUDA tensors (or TRITON_INTERPRET=1); "
                         "call attention_with_column_sums.")
    if programs > 65535:  # CUDA's limit on grid axis 1
        raise ValueError(f"batch x heads = {programs} exceeds 65535; split the batch.")


def _blocks(dtype: torch.dtype, d: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for pass 1 on an H100-class GPU."""
    if dtype == torch.float32 or d > 128:
        return 64, 32, 4, 2
    return 128, 64, 8, 3


def attention_with_column_sums_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      key_valid: torch.Tensor | None = None, query_valid: torch.Tensor | None = None,
                                      block_m: int | None = None, block_n: int | None = None,
                                      out: torch.Tensor | None = None, colsum: torch.Tensor | None = None,
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both Triton passes. block_m/block_n are pass 1's query/key tiles and pass 2's key/query tiles
    (default: by dtype and head dim); `out`/`colsum` may be given (tests pass NaN-filled buffers)."""
    lse, out = attention_forward_triton(q, k, v, key_valid, block_m, block_n, out)
    colsum = column_sums_triton(q, k, lse, key_valid, query_valid, block_m, block_n, colsum)
    return out, colsum


def attention_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None,
                             block_m: int | None = None, block_n: int | None = None,
                             out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: (lse (B, Hq, Tq) float32 in log2 units, out (B, Hq, Tq, D))."""
    _check(q, k, v, key_valid, None)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    _launchable(q, b * hq)
    bm, bn, warps, stages = _blocks(q.dtype, d)
    bm, bn = block_m or bm, block_n or bn
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}; allocate it like q.")
    lse = torch.full((b, hq, tq), float("nan"), dtype=torch.float32, device=q.device)  # tiny; unwritten rows show
    kvalid = key_valid.to(torch.int8) if key_valid is not None else lse
    _forward_kernel[(triton.cdiv(tq, bm), b * hq)](
        q, k, v, kvalid, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        kvalid.stride(0), hq, hq // hkv, tq, tk,
        HAS_KEY_VALID=key_valid is not None, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages)
    return lse, out


def column_sums_triton(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_valid: torch.Tensor | None = None,
                       query_valid: torch.Tensor | None = None, block_m: int | None = None,
                       block_n: int | None = None, colsum: torch.Tensor | None = None) -> torch.Tensor:
    """Pass 2: colsum (B, Hkv, Tk) float32 from q, k and pass 1's lse (B, Hq, Tq)."""
    _check(q, k, k, key_valid, query_valid)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    _launchable(q, b * hkv)
    if lse.shape != (b, hq, tq) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be pass 1's float32 ({b}, {hq}, {tq}) tensor; pass attention_forward_triton's lse.")
    bq, bk, warps, stages = _blocks(q.dtype, d)
    # Each program keeps one key tile and streams query tiles past it: pass 1's wide tile is the key tile here.
    bq, bk = block_n or bk, block_m or bq
    if colsum is None:
        colsum = torch.empty(b, hkv, tk, dtype=torch.float32, device=q.device)
    elif colsum.shape != (b, hkv, tk) or colsum.dtype != torch.float32 or not colsum.is_contiguous():
        raise ValueError(f"colsum must be a contiguous float32 ({b}, {hkv}, {tk}) tensor; allocate it so.")
    kvalid = key_valid.to(torch.int8) if key_valid is not None else lse
    qvalid = query_valid.to(torch.int8) if query_valid is not None else lse
    _column_sum_kernel[(triton.cdiv(tk, bk), b * hkv)](
        q, k, kvalid, qvalid, lse.contiguous(), colsum, *q.stride(), *k.stride(), kvalid.stride(0), qvalid.stride(0),
        hkv, hq // hkv, tq, tk,
        HAS_KEY_VALID=key_valid is not None, HAS_QUERY_VALID=query_valid is not None, HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=bq, BLOCK_N=bk,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return colsum


def attention_with_column_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               key_valid: torch.Tensor | None = None,
                               query_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Tq, D) in q.dtype, colsum (B, Hkv, Tk) float32); Triton on CUDA, PyTorch on CPU."""
    if q.is_cuda:
        return attention_with_column_sums_triton(q, k, v, key_valid, query_valid)
    return attention_with_column_sums_torch(q, k, v, key_valid, query_valid)


def decode_attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                key_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: (out (B, Hq, 1, D), probs (B, Hkv, Tk) float32 summed over each KV group).

    Scores come from a matmul in the input dtype (as Hugging Face's OPT does) and the softmax
    runs in fp32; nothing larger than (B, Hq, Tk) is built, and k is never repeated for GQA.
    """
    if q.dim() == 4 and q.shape[2] != 1:
        raise ValueError(f"decode takes one query per sequence, got q {tuple(q.shape)}; "
                         "use attention_with_column_sums.")
    _check(q, k, v, key_valid, None)
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    rows = q.reshape(b, hkv, hq // hkv, d)  # the group's heads as rows of one matmul per KV head
    s = rows @ k.transpose(-1, -2)
    if key_valid is not None:
        allowed = key_valid.clone()
        allowed[:, -1] = True  # the new token always sees itself
        s = s.masked_fill(~allowed[:, None, None, :], float("-inf"))
    p = s.softmax(-1, dtype=torch.float32)
    out = (p.to(v.dtype) @ v).reshape(b, hq, 1, d)
    return out, p.sum(2)
