"""Flash-decoding attention for a captured decode step: one new query per sequence over a
token-major KV cache, reading only the keys that exist.

A CUDA-graph-captured decode step cannot pass the current length as a host value, so the
engine ran SDPA over the whole preallocated cache with a mask: it reads T_max keys and the
memory-efficient kernel is far from HBM speed at one query per sequence. Here the grid is
fixed at capture time, (B, Hkv, NUM_SPLITS) with NUM_SPLITS from T_max and the SM count, and
each program loads `length` (and its row's `key_start`) from device memory: the row's keys
[key_start, length) are cut into NUM_SPLITS tile-aligned parts, so all splits share the work
whatever the length, and nothing outside that range is read. Each split keeps an fp32 online
softmax in log2 units; a second small kernel merges the splits by their log-sum-exp (with one
split the first kernel writes the output itself). Empty splits (past `length`) write lse = -inf
and zero partials, so they weigh nothing; a row with no keys at all gives zeros.

Grouped-query attention: one program serves a KV head's whole query group, so K/V are read
once. Groups of 2 or more run as tl.dot with the group padded to 16 rows (tensor cores are idle
anyway; one MMA covers the group instead of a 3-D broadcast per tile). A single query (MHA)
uses a broadcast-multiply-sum in fp32 registers: a 16-row MMA would waste 15/16 of its work and
stage K/V through shared memory for nothing.

Layouts: q (B, Hq, D), already scaled; k_cache, v_cache (T_max, B, Hkv, D) views, any strides;
`length` a 0-dim int32/int64 tensor; `key_start` None or (B,) int32/int64; out (B, Hq, D) in
q.dtype. The CUDA launcher reads only shapes, strides and dtypes on the host (no .item(), no
int(), no data-dependent allocation), so a captured graph replays correctly as `length` moves.
On CPU tensors `decode_attention` runs a PyTorch version that reads `length` with int().
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
# Split programs counted as resident per SM when no launch config says (see _config); the
# benchmark's grid checks the guesses. The interpreter has no SMs; an H100's count stands in.
_PROGRAMS_PER_SM = 4
_INTERPRETER_SMS = 132


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
           key_start: torch.Tensor | None, dtypes: tuple[torch.dtype, ...] = _DTYPES) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be (B, Hq, D) and the caches (T_max, B, Hkv, D), got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)}; pass one query per sequence and token-major caches.")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ; "
                         "pass the keys and values of one cache.")
    (b, hq, d), (_, bk, hkv, dk) = q.shape, k_cache.shape
    if b != bk or d != dk:
        raise ValueError(f"q {tuple(q.shape)} and the cache {tuple(k_cache.shape)} disagree on batch or head dim; "
                         "pass matching tensors.")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads; fix the head counts.")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype or q.dtype not in dtypes:
        raise ValueError(f"q and the caches must share one dtype of {dtypes}, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}; cast them.")
    if not (q.device == k_cache.device == v_cache.device == length.device):
        raise ValueError("q, the caches and length are on different devices; move them to one device.")
    if length.dim() != 0 or length.dtype not in _INDEX_DTYPES:
        raise ValueError(f"length must be a 0-dim int32/int64 tensor, got {length.dtype} {tuple(length.shape)}; "
                         "pass the device copy of the cache length.")
    if key_start is not None and (tuple(key_start.shape) != (b,) or key_start.dtype not in _INDEX_DTYPES
                                  or key_start.device != q.device):
        raise ValueError(f"key_start must be an int32/int64 ({b},) tensor on {q.device}, got {key_start.dtype} "
                         f"{tuple(key_start.shape)} on {key_start.device}; pass each row's first real key.")


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                               key_start: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 softmax(q k^T) v per row over the keys [key_start, length) only; a row without keys gives
    zeros. Returns (B, Hq, D) float64."""
    _check(q, k_cache, v_cache, length, key_start, _DTYPES + (torch.float64,))
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    n = int(length)
    out = torch.zeros(b, hq, d, dtype=torch.float64, device=q.device)
    for row in range(b):
        lo = max(int(key_start[row]), 0) if key_start is not None else 0
        if lo >= n:
            continue
        keys, values = k_cache[lo:n, row].double(), v_cache[lo:n, row].double()  # (t, Hkv, D)
        scores = torch.einsum("hgd,thd->hgt", q[row].double().reshape(hkv, hq // hkv, d), keys)
        out[row] = torch.einsum("hgt,thd->hgd", scores.softmax(-1), values).reshape(hq, d)
    return out


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                           key_start: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch version (the CPU path): fp32 scores and softmax, keys sliced to [min key_start, length)."""
    _check(q, k_cache, v_cache, length, key_start)
    t_max, b, hkv, d = k_cache.shape
    hq, n = q.shape[1], int(length)
    if not 0 <= n <= t_max:
        raise ValueError(f"length {n} is outside the cache's 0..{t_max} tokens; pass the number of cached tokens.")
    starts = (key_start.long().clamp(min=0) if key_start is not None
              else torch.zeros(b, dtype=torch.long, device=q.device))
    lo = min(int(starts.min()), n)
    valid = torch.arange(lo, n, device=q.device)[None, :] >= starts[:, None]  # (B, t)
    keys = k_cache[lo:n].permute(1, 2, 3, 0).float()  # (B, Hkv, D, t)
    values = v_cache[lo:n].permute(1, 2, 0, 3).float()  # (B, Hkv, t, D)
    # Padding may hold anything (NaN): mask the scores and zero the values, or 0 * NaN leaks.
    scores = (q.float().reshape(b, hkv, hq // hkv, d) @ keys).masked_fill(~valid[:, None, None, :], float("-inf"))
    values = values.masked_fill(~valid[:, None, :, None], 0.0)
    probs = torch.where(valid.any(-1)[:, None, None, None], scores.softmax(-1), 0.0)  # empty rows: 0, not NaN
    return (probs @ values).reshape(b, hq, d).to(q.dtype)


@triton.jit
def _split_range(length_ptr, key_start_ptr, b, split, t_max,
                 HAS_KEY_START: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_T: tl.constexpr):
    """[lo, hi) of this split: the row's keys [key_start, length) in NUM_SPLITS tile-aligned parts."""
    n = tl.minimum(tl.load(length_ptr).to(tl.int32), t_max)  # a bad length must not read past the cache
    if HAS_KEY_START:
        ks = tl.maximum(tl.load(key_start_ptr + b).to(tl.int32), 0)
    else:
        ks = n * 0
    per = tl.cdiv(tl.cdiv(tl.maximum(n - ks, 0), NUM_SPLITS), BLOCK_T) * BLOCK_T
    lo = ks + split * per
    return lo, tl.minimum(lo + per, n)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, length_ptr, key_start_ptr, out_ptr, part_ptr, lse_ptr,
                  sqb, sqh, sqd, skt, skb, skh, skd, svt, svb, svh, svd, sob, soh, sod, t_max, hq,
                  GROUP: tl.constexpr, HAS_KEY_START: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi = _split_range(length_ptr, key_start_ptr, b, split, t_max, HAS_KEY_START, NUM_SPLITS, BLOCK_T)
    b64, kvh64 = b.to(tl.int64), kvh.to(tl.int64)
    k_base = k_ptr + b64 * skb + kvh64 * skh
    v_base = v_ptr + b64 * svb + kvh64 * svh
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # Every tile starts below hi, so its first key is real and the running max turns finite at
    # once: -inf as the start value never meets -inf - (-inf).
    if USE_DOT:
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < GROUP
        heads = kvh64 * GROUP + offs_g
        q = tl.load(q_ptr + b64 * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # padding rows: q = 0, finite, never stored
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for t0 in range(lo, hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < hi
            t64 = offs_t.to(tl.int64)
            kt = tl.load(k_base + t64[None, :] * skt + offs_d[:, None] * skd, mask=t_ok[None, :] & d_ok[:, None],
                         other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * 1.4426950408889634  # x log2(e): exp2 below
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            vt = tl.load(v_base + t64[:, None] * svt + offs_d[None, :] * svd, mask=t_ok[:, None] & d_ok[None, :],
                         other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an empty split: acc = 0 stays 0
        res = acc / l_safe[:, None]
        ok = g_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + b64 * sob + heads[:, None] * soh + offs_d[None, :] * sod,
                     res.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            slot = (b64 * hq + heads) * NUM_SPLITS + split
            tl.store(part_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], res, mask=ok)
            tl.store(lse_ptr + slot, tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf")), mask=g_ok)
    else:
        q = tl.load(q_ptr + b64 * sqb + kvh64 * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)
        m_i = float("-inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
        for t0 in range(lo, hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < hi
            t64 = offs_t.to(tl.int64)
            ok = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + t64[:, None] * skt + offs_d[None, :] * skd, mask=ok, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * 1.4426950408889634
            s = tl.where(t_ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp2(s - m_new)
            alpha = tl.exp2(m_i - m_new)
            v = tl.load(v_base + t64[:, None] * svt + offs_d[None, :] * svd, mask=ok, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        res = acc / l_safe
        if NUM_SPLITS == 1:
            tl.store(out_ptr + b64 * sob + kvh64 * soh + offs_d * sod, res.to(out_ptr.dtype.element_ty), mask=d_ok)
        else:
            slot = (b64 * hq + kvh64) * NUM_SPLITS + split
            tl.store(part_ptr + slot * HEAD_DIM + offs_d, res, mask=d_ok)
            tl.store(lse_ptr + slot, tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf")))


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, sob, soh, sod, hq,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    row = b.to(tl.int64) * hq + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split has keys: every weight is 0, out = 0
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - m))
    part = tl.load(part_ptr + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                   mask=(w[:, None] > 0.0) & d_ok[None, :], other=0.0)
    den = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * part, axis=0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * sob + h * soh + offs_d * sod, res.to(out_ptr.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


class LaunchConfig(NamedTuple):
    block_t: int
    num_warps: int
    num_stages: int
    programs_per_sm: int  # resident split programs per SM, for the split rule's wave count


def _config(dtype: torch.dtype, d: int, group: int) -> LaunchConfig:
    """Tile, warps and stages by path, from the num_splits x num_warps x block_t grid of
    experiments/bench_decode_attention.py on an H100 (fp16, D = 128, padded rows):
    - single query (MHA), fp16/bf16: one warp over 32-key tiles. Its loads are not pipelined, so
      what hides their latency is programs in flight: at one warp an SM holds about 16 of them
      (registers; 32 is the hardware's block limit) against about 5 at four warps. 20-35% faster
      than four warps over 64 keys at OPT-6.7B B = 32 and 128 and OPT-30B B = 64.
    - grouped queries (tl.dot, pipelined loads): four warps over 64-key tiles, two stages
      (90 registers, 38 KiB of shared memory: about 4 programs an SM); the grid found no better.
    - fp32 or D > 128: 32-key tiles, four warps (registers)."""
    if dtype == torch.float32 or d > 128:
        return LaunchConfig(32, 4, 2, 4)
    if group == 1:
        return LaunchConfig(32, 1, 2, 16)
    return LaunchConfig(64, 4, 2, 4)


def default_num_splits(programs: int, t_max: int, block_t: int, sm_count: int,
                       programs_per_sm: int = _PROGRAMS_PER_SM) -> int:
    """Splits per (row, KV head) for `programs` = B x Hkv: 1 when they already fill the GPU, else
    flash-attention's wave-efficiency rule (the fewest splits within 85% of the best fill of the
    last wave), counting programs_per_sm slots per SM. Static: depends on shapes only."""
    slots = sm_count * programs_per_sm
    if programs >= 0.8 * slots:
        return 1
    max_splits = max(1, min(_MAX_SPLITS, triton.cdiv(t_max, block_t)))
    eff = {s: (programs * s / slots) / triton.cdiv(programs * s, slots) for s in range(1, max_splits + 1)}
    best = max(eff.values())
    return min(s for s, e in eff.items() if e >= 0.85 * best)


def split_scratch(q: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials (B, Hq, S, D), lse (B, Hq, S)) float32 for `scratch=`: static shapes, reusable every step."""
    b, hq, d = q.shape
    return (torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device),
            torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                            key_start: torch.Tensor | None = None, *, num_splits: int | None = None,
                            block_t: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                            out: torch.Tensor | None = None,
                            scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The Triton kernels. num_splits/block_t/num_warps/num_stages default by shape, dtype and SM count;
    `out` and `scratch` (split_scratch's buffers) may be given. Host work depends on shapes only."""
    _check(q, k_cache, v_cache, length, key_start)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton launcher needs CUDA tensors (or TRITON_INTERPRET=1); call decode_attention.")
    t_max, b, hkv, d = k_cache.shape
    hq = q.shape[1]
    group = hq // hkv
    bt, warps, stages, per_sm = _config(q.dtype, d, group)
    bt, warps, stages = block_t or bt, num_warps or warps, num_stages or stages
    if bt < 16 or bt & (bt - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {bt}; pick 16, 32, 64 or 128.")
    if hkv > 65535:
        raise ValueError(f"{hkv} KV heads exceed CUDA's 65535 grid limit; split the heads.")
    splits = num_splits or default_num_splits(b * hkv, t_max, bt, _sm_count(q.device), per_sm)
    if not 1 <= splits <= 2 * _MAX_SPLITS:  # the merge kernel holds all splits of a row in registers
        raise ValueError(f"num_splits must be 1..{2 * _MAX_SPLITS}, got {splits}; leave it None for the default.")
    if out is None:
        out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}; allocate it like q.")
    if splits == 1:
        part = lse = out  # unused: the split kernel writes the output itself
    else:
        part, lse = scratch if scratch is not None else split_scratch(q, splits)
        if (part.shape != (b, hq, splits, d) or lse.shape != (b, hq, splits) or part.dtype != torch.float32
                or lse.dtype != torch.float32 or not part.is_contiguous() or not lse.is_contiguous()
                or part.device != q.device or lse.device != q.device):
            raise ValueError(f"scratch must be contiguous float32 ({b}, {hq}, {splits}, {d}) and ({b}, {hq}, {splits}) "
                             f"tensors on {q.device}; build them with split_scratch(q, {splits}).")
    block_d = max(16, triton.next_power_of_2(d))
    _split_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, length, key_start if key_start is not None else length, out, part, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), t_max, hq,
        GROUP=group, HAS_KEY_START=key_start is not None, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_T=bt, NUM_SPLITS=splits, USE_DOT=group >= 2,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    if splits > 1:
        _merge_kernel[(b, hq)](part, lse, out, *out.stride(), hq, HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=splits,
                               BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     key_start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, D) attention of each row's new query over cache keys [key_start, length): Triton on
    CUDA (graph-capturable), PyTorch on CPU."""
    if q.is_cuda:
        return decode_attention_triton(q, k_cache, v_cache, length, key_start)
    return decode_attention_torch(q, k_cache, v_cache, length, key_start)
