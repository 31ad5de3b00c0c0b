"""Decode attention (one new query per sequence) straight from a packed KV cache.

The cache stays compressed in every tier (kernels/quant/pack.py format, grouped along head_dim), so
attention dequantizes on the fly and never materialises the fp16 cache:
- CUDA: flash-decoding in Triton. Grid (B*Hq, splits of the token axis); each program walks its
  tokens in tiles, dequantizes a K and a V tile held as (tokens, groups, group/2) in registers
  (the two nibble halves of a record map to the two halves of each group of head_dim) and keeps
  an fp32 online softmax; a few torch ops merge the splits. Splits give long/low-batch caches
  enough programs to fill the GPU.
- CPU (the engine's CPU attention over a CPU-resident compressed cache): blocks of tokens are
  dequantized one at a time with an fp32 online softmax across blocks, so memory stays bounded
  and each block's working set stays in cache; torch ops use all cores.
Layouts: q (B, Hq, D), already scaled. k/v packed (T_max, B, Hkv, G, R) or any strided view in
that index order (e.g. a head-major (B, Hkv, T_max, G, R) store passed as .permute(2, 0, 1, 3, 4)).
Query head h reads kv head h // (Hq // Hkv). key_valid (B, length) masks left padding.
`keys_per_channel`: keys in KIVI's layout (kivi.py: per channel over blocks of 32 tokens; the
length a whole number of blocks), values per token as usual.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from offload_engine.kernels.quant.kivi import BLOCK, dequantize_keys, dequantize_keys_reference
from offload_engine.kernels.quant.pack import (QuantSpec, check_packed, codes_of_halves, dequantize_reference,
                                               dequantize_torch, half_view, load_f16)

NEG_BIG = -1.0e30        # running-max start: finite, so a fully masked tile gives exp(-inf) = 0, not NaN


def _check(q, k_packed, v_packed, spec, head_dim, length, key_valid, keys_per_channel=False) -> None:
    if q.dim() != 3 or not q.is_floating_point() or q.shape[2] != head_dim:
        raise ValueError(f"q must be a float (B, Hq, head_dim={head_dim}) tensor, got {q.dtype} {tuple(q.shape)}.")
    b, hq, _ = q.shape
    for name, p in (("k_packed", k_packed), ("v_packed", v_packed)):
        if p.dim() != 5 or p.shape[1] != b:
            raise ValueError(f"{name} must be (T_max, B={b}, Hkv, G, R), got shape {tuple(p.shape)}.")
        check_packed(p, spec, head_dim)
    if k_packed.shape != v_packed.shape:
        raise ValueError(f"k_packed {tuple(k_packed.shape)} and v_packed {tuple(v_packed.shape)} differ; "
                         "they must describe the same cache.")
    hkv = k_packed.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}; grouped-query attention needs that.")
    if not 1 <= length <= k_packed.shape[0]:
        raise ValueError(f"length={length} must be in [1, T_max={k_packed.shape[0]}].")
    if keys_per_channel and (length % BLOCK or spec.group_size != BLOCK):
        raise ValueError(f"per-channel keys are attended in whole blocks of {BLOCK} tokens with groups of {BLOCK}, "
                         f"got length {length} and {spec}.")
    if key_valid is not None and (key_valid.dtype != torch.bool or tuple(key_valid.shape) != (b, length)):
        raise ValueError(f"key_valid must be a bool ({b}, {length}) tensor, got {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}.")


def quant_decode_attention_reference(q, k_packed, v_packed, spec: QuantSpec, head_dim: int, length: int,
                                     key_valid: torch.Tensor | None = None, keys_per_channel: bool = False):
    """(out, probs) in float64: dequantize everything, plain softmax. For tests."""
    _check(q, k_packed, v_packed, spec, head_dim, length, key_valid, keys_per_channel)
    b, hq, d = q.shape
    if keys_per_channel:
        k = dequantize_keys_reference(k_packed[:length], spec)
    else:
        k = dequantize_reference(k_packed[:length], spec, head_dim)     # (t, B, Hkv, D)
    v = dequantize_reference(v_packed[:length], spec, head_dim)
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bhd,tbhd->bht", q.double(), k)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, :], float("-inf"))
        v = v.masked_fill(~key_valid.T[:, :, None, None], 0.0)         # masked slots may hold anything
    probs = scores.softmax(-1)
    return torch.einsum("bht,tbhd->bhd", probs, v), probs


# ----------------------------------------------------------------------------- CPU path

def _records_contiguous(*packed: torch.Tensor) -> bool:
    """Each token's (G, R) records side by side in memory: what the C++ kernel reads."""
    return all(p.stride(4) == 1 and p.stride(3) == p.shape[4] for p in packed)


def _attention_torch(q, k_packed, v_packed, spec, head_dim, length, key_valid, return_probs, block_tokens,
                     keys_per_channel=False, return_lse=False):
    b, hq, d = q.shape
    hkv = k_packed.shape[2]
    qf = q.float().reshape(b, hkv, hq // hkv, d)
    if block_tokens is None:  # ~4M dequantized floats per block: bounded memory, cache-sized passes
        block_tokens = max(16, min(2048, (1 << 22) // (b * hkv * d)))
    if keys_per_channel:
        block_tokens = -(-block_tokens // BLOCK) * BLOCK
    m = torch.full((b, hkv, hq // hkv, 1), NEG_BIG)
    l = torch.zeros_like(m)
    acc = torch.zeros_like(qf)
    scores_all = torch.empty(b, hkv, hq // hkv, length) if return_probs else None
    for t0 in range(0, length, block_tokens):
        t1 = min(length, t0 + block_tokens)
        if keys_per_channel:
            k = dequantize_keys(k_packed[t0:t1], spec).permute(1, 2, 0, 3)
        else:
            k = dequantize_torch(k_packed[t0:t1].permute(1, 2, 0, 3, 4), spec, head_dim, torch.float32)
        v = dequantize_torch(v_packed[t0:t1].permute(1, 2, 0, 3, 4), spec, head_dim, torch.float32)
        s = qf @ k.transpose(-1, -2)                                    # (B, Hkv, rep, tb)
        if key_valid is not None and not bool(key_valid[:, t0:t1].all()):
            dead = ~key_valid[:, None, t0:t1]
            s = s.masked_fill(dead[..., None, :], float("-inf"))
            v = v.masked_fill(dead[..., None], 0.0)                     # 0 * NaN in a padded slot is NaN
        if scores_all is not None:
            scores_all[..., t0:t1] = s
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - m_new)
        alpha = torch.exp(m - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p @ v
        m = m_new
    out = (acc / l).view(b, hq, d).to(q.dtype)
    if return_lse:
        return out, (m + torch.log(l)).view(b, hq)
    if not return_probs:
        return out
    probs = torch.exp(scores_all - (m + torch.log(l)))
    return out, probs.view(b, hq, length)


# ----------------------------------------------------------------------------- Triton path

@triton.jit
def _dequant_tile(p_ptr, sm_ptr, rec, g, j, row_ok, G: tl.constexpr, EVEN: tl.constexpr,
                  BITS: tl.constexpr, GS: tl.constexpr):
    """Values of a (BLOCK_T, G_P2, HALF_P2) tile: (low half, high half) of every group."""
    HALF: tl.constexpr = GS // 2
    R: tl.constexpr = 4 + GS * BITS // 8
    off = rec[:, None] + (g * R)[None, :]                              # (BLOCK_T, G_P2) record starts
    ok = row_ok[:, None] & (g < G)[None, :]
    s = load_f16(p_ptr, sm_ptr, off, ok, EVEN)[:, :, None]
    mn = load_f16(p_ptr, sm_ptr, off + 2, ok, EVEN)[:, :, None]
    cm = ok[:, :, None] & (j < HALF)[None, None, :]
    c_lo, c_hi = codes_of_halves(p_ptr, off[:, :, None] + 4, j[None, None, :], cm, BITS, HALF)
    return c_lo.to(tl.float32) * s + mn, c_hi.to(tl.float32) * s + mn


@triton.jit
def _dequant_key_channel_tile(p_ptr, sm_ptr, rec, base, tj, skt, g, j, row_ok, G: tl.constexpr, EVEN: tl.constexpr,
                              BITS: tl.constexpr, GS: tl.constexpr):
    """A block's keys in KIVI's layout (kivi.py): codes per token, each channel's scale and min in
    the header of record (block start + channel mod 32); same (low half, high half) split."""
    HALF: tl.constexpr = GS // 2
    R: tl.constexpr = 4 + GS * BITS // 8
    gj = (g < G)[:, None] & (j < HALF)[None, :]
    p_lo = base + tj[None, :] * skt + (g * R)[:, None]                # (G_P2, HALF_P2) channel 32g + j
    p_hi = p_lo + HALF * skt                                           # channel 32g + 16 + j
    s_lo = load_f16(p_ptr, sm_ptr, p_lo, gj, EVEN)[None, :, :]
    mn_lo = load_f16(p_ptr, sm_ptr, p_lo + 2, gj, EVEN)[None, :, :]
    s_hi = load_f16(p_ptr, sm_ptr, p_hi, gj, EVEN)[None, :, :]
    mn_hi = load_f16(p_ptr, sm_ptr, p_hi + 2, gj, EVEN)[None, :, :]
    off = rec[:, None] + (g * R)[None, :]
    cm = (row_ok[:, None] & (g < G)[None, :])[:, :, None] & (j < HALF)[None, None, :]
    c_lo, c_hi = codes_of_halves(p_ptr, off[:, :, None] + 4, j[None, None, :], cm, BITS, HALF)
    return c_lo.to(tl.float32) * s_lo + mn_lo, c_hi.to(tl.float32) * s_hi + mn_hi


@triton.jit
def _qattn_kernel(q_ptr, k_ptr, ksm_ptr, v_ptr, vsm_ptr, valid_ptr, pm_ptr, pl_ptr, pacc_ptr, sc_ptr,
                  length, per_split, HQ, REP, D, S,
                  sqb, sqh, skt, skb, skh, svt, svb, svh, svalid,
                  EVEN: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, G: tl.constexpr,
                  G_P2: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_T: tl.constexpr,
                  HAS_MASK: tl.constexpr, WRITE_SCORES: tl.constexpr, KEY_CHANNEL: tl.constexpr):
    HALF: tl.constexpr = GS // 2
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kvh = h // REP
    g = tl.arange(0, G_P2)
    j = tl.arange(0, HALF_P2)
    d_lo = (g * GS)[:, None] + j[None, :]                              # (G_P2, HALF_P2) positions in D
    gj = (g < G)[:, None] & (j < HALF)[None, :]
    qrow = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q_lo = tl.load(qrow + d_lo, mask=gj & (d_lo < D), other=0.0).to(tl.float32)
    q_hi = tl.load(qrow + d_lo + HALF, mask=gj & (d_lo + HALF < D), other=0.0).to(tl.float32)
    kbase = b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    vbase = b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
    t_start = split * per_split
    t_end = tl.minimum(t_start + per_split, length)
    m_i = -1.0e30                                                      # NEG_BIG (globals must be constexpr)
    l_i = 0.0
    acc_lo = tl.zeros((G_P2, HALF_P2), dtype=tl.float32)
    acc_hi = tl.zeros((G_P2, HALF_P2), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_range = t < t_end
        ok = in_range
        if HAS_MASK:
            ok = ok & (tl.load(valid_ptr + b.to(tl.int64) * svalid + t, mask=in_range, other=0) != 0)
        tt = t.to(tl.int64)
        if KEY_CHANNEL:  # the tile is one block: t0 is a multiple of BLOCK_T = 32
            k_lo, k_hi = _dequant_key_channel_tile(k_ptr, ksm_ptr, kbase + tt * skt, kbase, (t0 + j).to(tl.int64),
                                                   skt, g, j, ok, G, EVEN, BITS, GS)
        else:
            k_lo, k_hi = _dequant_tile(k_ptr, ksm_ptr, kbase + tt * skt, g, j, ok, G, EVEN, BITS, GS)
        s = tl.sum(tl.sum(k_lo * q_lo[None, :, :] + k_hi * q_hi[None, :, :], axis=2), axis=1)
        s = tl.where(ok, s, float("-inf"))
        if WRITE_SCORES:
            tl.store(sc_ptr + bh.to(tl.int64) * length + t, s, mask=in_range)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        # Masked tokens are not even loaded (v = 0), so garbage in padded slots cannot leak.
        v_lo, v_hi = _dequant_tile(v_ptr, vsm_ptr, vbase + tt * svt, g, j, ok, G, EVEN, BITS, GS)
        acc_lo = acc_lo * alpha + tl.sum(p[:, None, None] * v_lo, axis=0)
        acc_hi = acc_hi * alpha + tl.sum(p[:, None, None] * v_hi, axis=0)
        m_i = m_new
    part = bh.to(tl.int64) * S + split
    tl.store(pm_ptr + part, m_i)
    tl.store(pl_ptr + part, l_i)
    tl.store(pacc_ptr + part * D + d_lo, acc_lo, mask=gj & (d_lo < D))
    tl.store(pacc_ptr + part * D + d_lo + HALF, acc_hi, mask=gj & (d_lo + HALF < D))


def _scratch(shape, device) -> torch.Tensor:
    # NaN-filled off the GPU (interpreter tests) so anything a kernel fails to write shows up.
    if device.type == "cuda":
        return torch.empty(shape, dtype=torch.float32, device=device)
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def quant_decode_attention_triton(q, k_packed, v_packed, spec: QuantSpec, head_dim: int, length: int,
                                  key_valid: torch.Tensor | None = None, return_probs: bool = False,
                                  num_splits: int | None = None, block_t: int | None = None,
                                  num_warps: int = 4, keys_per_channel: bool = False, return_lse: bool = False):
    """Flash-decoding over the packed cache (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(q, k_packed, v_packed, spec, head_dim, length, key_valid, keys_per_channel)
    r = spec.record_bytes
    for name, p in (("k_packed", k_packed), ("v_packed", v_packed)):
        if p.stride(-1) != 1 or (p.stride(-2) != r and p.shape[-2] > 1):
            raise ValueError(f"{name} must have contiguous records (strides (..., {r}, 1)); "
                             "keep (G, R) contiguous and permute only the leading dims.")
    if q.stride(-1) != 1:
        q = q.contiguous()
    b, hq, d = q.shape
    hkv = k_packed.shape[2]
    g = spec.num_groups(head_dim)
    g_p2, half_p2 = triton.next_power_of_2(g), triton.next_power_of_2(spec.group_size // 2)
    if block_t is None:  # K and V tiles of ~4K values each
        block_t = max(16, min(64, 4096 // (g_p2 * half_p2 * 2)))
    if keys_per_channel:
        block_t = BLOCK
    if num_splits is None:  # ~8 programs per SM (several resident per SM), no split under 4 tiles
        num_splits = max(1, min(triton.cdiv(8 * _num_sms(q.device), b * hq), triton.cdiv(length, 4 * block_t)))
    per_split = triton.cdiv(triton.cdiv(length, num_splits), block_t) * block_t
    num_splits = triton.cdiv(length, per_split)
    dev = q.device
    pm, pl = _scratch((b, hq, num_splits), dev), _scratch((b, hq, num_splits), dev)
    pacc = _scratch((b, hq, num_splits, d), dev)
    scores = _scratch((b, hq, length), dev) if return_probs else pm
    valid = key_valid.contiguous().view(torch.uint8) if key_valid is not None else pm
    ksm, k_even = half_view(k_packed)
    vsm, v_even = half_view(v_packed)
    even = k_even and v_even
    if not even:
        ksm, vsm = k_packed, v_packed
    _qattn_kernel[(b * hq, num_splits)](
        q, k_packed, ksm, v_packed, vsm, valid, pm, pl, pacc, scores,
        length, per_split, hq, hq // hkv, d, num_splits,
        q.stride(0), q.stride(1), *k_packed.stride()[:3], *v_packed.stride()[:3],
        valid.stride(0) if key_valid is not None else 0,
        EVEN=even, BITS=spec.bits, GS=spec.group_size, G=g, G_P2=g_p2, HALF_P2=half_p2, BLOCK_T=block_t,
        HAS_MASK=key_valid is not None, WRITE_SCORES=return_probs, KEY_CHANNEL=keys_per_channel,
        num_warps=num_warps)
    # Merge the splits (B*Hq*splits numbers: negligible next to the cache read).
    m = pm.amax(-1, keepdim=True)
    w = torch.exp(pm - m)
    l = (pl * w).sum(-1, keepdim=True)
    out = ((pacc * w[..., None]).sum(-2) / l).to(q.dtype)
    if return_lse:
        return out, (m + torch.log(l))[..., 0]
    if not return_probs:
        return out
    return out, torch.exp(scores - (m + torch.log(l)))


def quant_decode_attention(q, k_packed, v_packed, spec: QuantSpec, head_dim: int, length: int,
                           key_valid: torch.Tensor | None = None, return_probs: bool = False,
                           block_tokens: int | None = None):
    """softmax(q K^T) V over the first `length` cached tokens; out (B, Hq, D) in q.dtype, plus
    probs (B, Hq, length) float32 (masked keys 0) with return_probs. Every row needs a valid key
    (checked on CPU only: on CUDA the check would cost a sync; an empty row gives NaN there)."""
    if q.is_cuda:
        return quant_decode_attention_triton(q, k_packed, v_packed, spec, head_dim, length, key_valid, return_probs)
    _check(q, k_packed, v_packed, spec, head_dim, length, key_valid)
    if key_valid is not None and not bool(key_valid.any(-1).all()):
        raise ValueError("key_valid leaves a row without any valid key; every sequence needs at least one.")
    if not return_probs and block_tokens is None and spec.bits != 2 and _records_contiguous(k_packed, v_packed):
        from offload_engine.kernels.cpu_attention import cpu_packed_decode_attention_cpp, use_cpp
        if use_cpp():  # one pass, dequantizing a row at a time in L1 (the PyTorch path writes fp32 blocks)
            heads_first = (1, 2, 0, 3, 4)
            return cpu_packed_decode_attention_cpp(q, k_packed[:length].permute(heads_first),
                                                   v_packed[:length].permute(heads_first), spec.bits,
                                                   spec.group_size, key_valid)
    return _attention_torch(q, k_packed, v_packed, spec, head_dim, length, key_valid, return_probs, block_tokens)


def attention_with_recent(q, k_packed, v_packed, spec: QuantSpec, head_dim: int, flushed: int,
                          recent_k: torch.Tensor, recent_v: torch.Tensor, key_valid: torch.Tensor | None = None,
                          keys_per_channel: bool = True):
    """Decode attention over `flushed` packed tokens followed by the exact tokens KIVI keeps until
    their block fills: recent_k/recent_v (r, B, Hkv, D) in the compute dtype, r >= 1 (the new
    token is among them). key_valid (B, flushed + r) or None. The two parts are attended apart
    and merged by their log-sum-exp; a row with no valid packed key takes the recent part alone."""
    b, hq, d = q.shape
    r, hkv = recent_k.shape[0], recent_k.shape[2]
    qf = q.float().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bgqd,tbgd->bgqt", qf, recent_k.float())
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, flushed:flushed + r], float("-inf"))
    lse = torch.logsumexp(s, -1)                                       # (B, Hkv, rep)
    out = torch.einsum("bgqt,tbgd->bgqd", torch.softmax(s, -1), recent_v.float())
    if flushed:
        valid = key_valid[:, :flushed] if key_valid is not None else None
        if q.is_cuda:
            out_p, lse_p = quant_decode_attention_triton(q, k_packed, v_packed, spec, head_dim, flushed, valid,
                                                         keys_per_channel=keys_per_channel, return_lse=True)
        else:
            _check(q, k_packed, v_packed, spec, head_dim, flushed, valid, keys_per_channel)
            out_p, lse_p = _attention_torch(q, k_packed, v_packed, spec, head_dim, flushed, valid, False, None,
                                            keys_per_channel, return_lse=True)
        out_p, lse_p = out_p.float().view_as(out), lse_p.view_as(lse)
        both = torch.logaddexp(lse, lse_p)
        out_p = torch.where(torch.isfinite(lse_p)[..., None], out_p, 0.0)
        out = out * torch.exp(lse - both)[..., None] + out_p * torch.exp(lse_p - both)[..., None]
    return out.view(b, hq, d).to(q.dtype)
