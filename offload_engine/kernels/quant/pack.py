"""Group-wise asymmetric 4-/8-bit quantization in the project's packed record format.

Compressed weights and KV cache are what sits in every memory tier and crosses PCIe, so one
byte layout serves all of them: a tensor (*lead, N) becomes uint8 (*lead, G, R), one record of
R = 4 + group_size * bits / 8 bytes per group of `group_size` consecutive elements along the
last dim (N zero-padded to G * group_size; the caller remembers N):
    bytes 0-1 scale (float16, little-endian), bytes 2-3 min (float16), bytes 4.. the codes;
    value = code * scale + min in float32;
    4-bit: byte j holds element j (low nibble) and element j + group_size/2 (high nibble),
    which with group_size 32 is exactly llama.cpp's GGUF Q4_1 block; 8-bit: byte j = element j;
    2-bit: byte j holds elements j, j + q, j + 2q, j + 3q (q = group_size/4) in bits 0-1, 2-3,
    4-5, 6-7: its low nibble covers the group's first half and its high nibble the second, as
    in 4-bit, so kernels split a group into the same two halves.
The packed layout always has the grouped dim last; `dim=` moves another dim there and back.

The rounding rule is exact (not "whatever float32 gives"), so the bound
|dequantize(quantize(x)) - x| <= scale / 2 (+ float32 rounding of the dequantize) holds for
every element, and the PyTorch path, the Triton path and the float64 reference produce the
same bytes: per group, mn/mx = min/max of the float32 values (padding masked out);
min_h = largest float16 <= mn; scale = smallest float16 >= 0 with min_h + levels*scale >= mx;
code = #{c in [0, levels) : x >= min_h + (c + 1/2) * scale} (round half up), 0 if scale == 0;
padded elements get code 0; a zero scale or min is stored as +0. A group whose values all
equal one float16 gets scale 0.
The fast paths decide each comparison exactly in float32: levels * scale and (c + 1/2) * scale
are exact products (<= 21 significant bits), and the one rounded sum is corrected with
Knuth's TwoSum. Exact products also make fused multiply-adds harmless, so the GPU compiler
cannot change a byte. The division only makes a first guess that the exact tests correct.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .spec import FP16_MAX, QuantSpec, check_float, check_packed, half_view, lead3  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------- code bytes

def pack_codes(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., group) as uint8 -> the record's code bytes (the layout above)."""
    if bits == 8:
        return c
    parts = c.chunk(8 // bits, -1)
    out = parts[0]
    for i, part in enumerate(parts[1:], 1):
        out = out | (part << (bits * i))
    return out


def unpack_codes(b: torch.Tensor, bits: int) -> torch.Tensor:
    """The record's code bytes -> codes (..., group), any integer dtype."""
    if bits == 8:
        return b
    mask = (1 << bits) - 1
    return torch.cat([(b >> (bits * i)) & mask for i in range(8 // bits)], -1)


# ----------------------------------------------------------------------------- float64 reference

def quantize_reference(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The rule in exact float64 arithmetic (every sum here fits 53 bits), for tests."""
    check_float(x, "x")
    n, gs, lv = x.shape[-1], spec.group_size, spec.levels
    g = spec.num_groups(n)
    xd = x.float().double()
    pad = g * gs - n
    lo = F.pad(xd, (0, pad), value=float("inf")).unflatten(-1, (g, gs)).amin(-1)
    hi = F.pad(xd, (0, pad), value=float("-inf")).unflatten(-1, (g, gs)).amax(-1)
    down = torch.full_like(lo, float("-inf"), dtype=torch.float16)
    m16 = lo.to(torch.float16)
    m16 = torch.where(m16.double() > lo, torch.nextafter(m16, down), m16)
    m16 = torch.where(m16 == 0, torch.zeros_like(m16), m16)            # +0, never -0
    mh = m16.double()
    # Smallest float16 scale in a window around the rounded quotient that satisfies the bound.
    s = ((hi - mh) / lv).to(torch.float16)
    for _ in range(3):
        s = torch.nextafter(s, down).clamp_min(0)
    assert not ((mh + lv * s.double() >= hi) & (s > 0)).any(), "window too small"
    for _ in range(6):
        s = torch.where(mh + lv * s.double() >= hi, s, torch.nextafter(s, -down))
    s = torch.where(s == 0, torch.zeros_like(s), s)
    sd = s.double()[..., None]
    xg = F.pad(xd, (0, pad)).unflatten(-1, (g, gs))
    safe = torch.where(sd > 0, sd, torch.ones_like(sd))
    c = ((xg - mh[..., None]) / safe + 0.5).floor().clamp(0, lv)
    c = torch.where(xg >= mh[..., None] + (c + 0.5) * sd, c + 1, c)   # exact half-up corrections
    c = torch.where(xg < mh[..., None] + (c - 0.5) * sd, c - 1, c).clamp(0, lv)
    c = torch.where(sd > 0, c, torch.zeros_like(c))
    c = pack_codes(F.pad(c.flatten(-2)[..., :n], (0, pad)).unflatten(-1, (g, gs)).to(torch.uint8), spec.bits)
    sm = torch.stack([s, m16], -1).view(torch.int16).to(torch.int32) & 0xFFFF
    head = torch.stack([sm[..., 0] & 255, sm[..., 0] >> 8, sm[..., 1] & 255, sm[..., 1] >> 8], -1)
    return torch.cat([head.to(torch.uint8), c], -1)


def dequantize_reference(packed: torch.Tensor, spec: QuantSpec, n: int) -> torch.Tensor:
    """Float64 values of a packed tensor, reading the bytes as the layout describes them."""
    check_packed(packed, spec, n)
    p = packed.to(torch.int32)

    def f16(lo_byte: int) -> torch.Tensor:
        bits = p[..., lo_byte] + 256 * p[..., lo_byte + 1]            # little-endian
        return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.float16).double()

    scale, mn, codes = f16(0), f16(2), unpack_codes(p[..., 4:], spec.bits)
    vals = codes.double() * scale[..., None] + mn[..., None]
    return vals.flatten(-2)[..., :n]


# ----------------------------------------------------------------------------- PyTorch path (CPU)

def _two_sum(a: torch.Tensor, b: torch.Tensor):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _round_down_f16(v: torch.Tensor) -> torch.Tensor:
    """Largest float16 <= v (float32 in, float16 out), by stepping the bit pattern."""
    h = v.to(torch.float16)
    b = h.view(torch.int16).to(torch.int32)
    b = torch.where(h.float() > v, torch.where(b >= 0, b - 1, b + 1), b)
    b = torch.where(b == -32768, 0, b)                         # -0 -> +0: one byte pattern per value
    return b.to(torch.int16).view(torch.float16)


def _group_params(mn: torch.Tensor, mx: torch.Tensor, levels: int):
    """(scale16, min16) of each group from float32 min/max, exactly as the Triton kernel does."""
    m16 = _round_down_f16(mn)
    mh = m16.float()
    sb = ((mx - mh) / levels).to(torch.float16).view(torch.int16).to(torch.int32)
    sb = (sb - 2).clamp_min(0)
    for _ in range(4):
        s = sb.to(torch.int16).view(torch.float16).float()
        y, e = _two_sum(mh, s * levels)
        ok = (mx < y) | ((mx == y) & (e >= 0))                 # min_h + levels*s >= mx, exactly
        sb = torch.where(ok, sb, sb + 1)
    return sb.to(torch.int16).view(torch.float16), m16


def _codes(x: torch.Tensor, mh: torch.Tensor, s: torch.Tensor, levels: int) -> torch.Tensor:
    """Round-half-up codes, decided exactly; x (..., gs), mh/s (..., 1) float32.

    c0 = floor((x - mh) / s) is within a hair of the true quotient, so the code is
    c0 + [x >= mh + (c0 + 1/2) s] with that one comparison done exactly (ties included).
    """
    safe = torch.where(s > 0, s, torch.ones_like(s))
    c = ((x - mh) / safe).clamp(0, levels).floor()
    y, e = _two_sum(mh.expand_as(x), (c + 0.5) * s)
    up = (x > y) | ((x == y) & (e <= 0))
    c = c + (up & (c < levels)).float()
    return torch.where(s > 0, c, torch.zeros_like(c))


def _quantize_torch_rows(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> None:
    """x (rows, N) float32 -> out (rows, G, R), in row chunks that stay in cache."""
    rows, n = x.shape
    gs, g = spec.group_size, spec.num_groups(n)
    pad = g * gs - n
    step = max(1, (1 << 18) // (g * gs))
    for r0 in range(0, rows, step):
        xc = x[r0:r0 + step]
        if not bool((xc.abs() <= FP16_MAX).all()):
            raise ValueError("x holds NaN, inf or values beyond the float16 range (|x| > 65504); "
                             "scale or clip the input before quantizing.")
        # Replicating the row's last value into the padding leaves every min/max unchanged.
        xg = torch.cat([xc, xc[:, -1:].expand(-1, pad)], 1).view(-1, g, gs)
        s16, m16 = _group_params(xg.amin(-1), xg.amax(-1), spec.levels)
        c = _codes(xg, m16.float()[..., None], s16.float()[..., None], spec.levels).to(torch.uint8)
        if pad:
            c.view(-1, g * gs)[:, n:] = 0
        c = pack_codes(c, spec.bits)
        o = out[r0:r0 + step]
        o[..., :4].copy_(torch.stack([s16, m16], -1).view(torch.uint8))
        o[..., 4:].copy_(c)


def dequantize_torch(packed: torch.Tensor, spec: QuantSpec, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Any strided (..., G, R) packed view -> (..., n); same float32 values as the Triton kernel."""
    try:
        sm = packed[..., :4].view(torch.float16).float()
    except RuntimeError:                                       # odd strides: copy the 4-byte heads
        sm = packed[..., :4].contiguous().view(torch.float16).float()
    codes = unpack_codes(packed[..., 4:], spec.bits)
    vals = torch.addcmul(sm[..., 1:2], codes.float(), sm[..., 0:1])  # exact product: fma-proof
    return vals.flatten(-2)[..., :n].to(dtype)


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _tl_two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _f16_from_bits(b):
    return b.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def load_f16(u8_ptr, f16_ptr, off, mask, EVEN: tl.constexpr):
    """float32 value of the float16 at byte offset `off` (masked lanes read 0)."""
    if EVEN:
        return tl.load(f16_ptr + off // 2, mask=mask, other=0.0).to(tl.float32)
    else:
        lo = tl.load(u8_ptr + off, mask=mask, other=0).to(tl.int32)
        hi = tl.load(u8_ptr + off + 1, mask=mask, other=0).to(tl.int32)
        return _f16_from_bits(lo | (hi << 8)).to(tl.float32)


@triton.jit
def codes_of_halves(p_ptr, code_off, j, mask, BITS: tl.constexpr, HALF: tl.constexpr):
    """Codes of lanes j < HALF of a group's first and second halves, from the code bytes at byte
    offset `code_off` (broadcast against j): the layout's bytes, read per lane."""
    if BITS == 4:
        byte = tl.load(p_ptr + code_off + j, mask=mask, other=0).to(tl.int32)
        return byte & 15, byte >> 4
    elif BITS == 2:
        Q: tl.constexpr = HALF // 2
        byte = tl.load(p_ptr + code_off + j % Q, mask=mask, other=0).to(tl.int32)
        shift = 2 * (j // Q)
        return (byte >> shift) & 3, (byte >> (shift + 4)) & 3
    else:
        lo = tl.load(p_ptr + code_off + j, mask=mask, other=0).to(tl.int32)
        hi = tl.load(p_ptr + code_off + j + HALF, mask=mask, other=0).to(tl.int32)
        return lo, hi


@triton.jit
def _store_f16(u8_ptr, off, h, mask):
    bits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(u8_ptr + off, (bits & 255).to(tl.uint8), mask=mask)
    tl.store(u8_ptr + off + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, total, N, G, sx, S1, S2, st0, st1, st2,
                     BITS: tl.constexpr, GS: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_G: tl.constexpr):
    HALF: tl.constexpr = GS // 2
    R: tl.constexpr = 4 + GS * BITS // 8
    L: tl.constexpr = 2 ** BITS - 1
    gid = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    gvalid = gid < total
    row, g = gid // G, gid % G
    rec = (row // (S1 * S2)) * st0 + ((row // S2) % S1) * st1 + (row % S2) * st2 + g * R
    j = tl.arange(0, HALF_P2)
    e_lo = (g * GS)[:, None] + j[None, :]
    e_hi = e_lo + HALF
    jm = gvalid[:, None] & (j < HALF)[None, :]
    m_lo, m_hi = jm & (e_lo < N), jm & (e_hi < N)
    xrow = x_ptr + (row * sx)[:, None]
    x_lo = tl.load(xrow + e_lo, mask=m_lo, other=0.0).to(tl.float32)
    x_hi = tl.load(xrow + e_hi, mask=m_hi, other=0.0).to(tl.float32)
    inf = float("inf")
    mn = tl.minimum(tl.min(tl.where(m_lo, x_lo, inf), 1), tl.min(tl.where(m_hi, x_hi, inf), 1))
    mx = tl.maximum(tl.max(tl.where(m_lo, x_lo, -inf), 1), tl.max(tl.where(m_hi, x_hi, -inf), 1))
    mn = tl.where(gvalid, mn, 0.0)                             # no inf arithmetic in dead lanes
    mx = tl.where(gvalid, mx, 0.0)
    # min_h: largest float16 <= mn (step the bit pattern when round-to-nearest went up).
    h = mn.to(tl.float16)
    b = h.to(tl.int16, bitcast=True).to(tl.int32)
    b = tl.where(h.to(tl.float32) > mn, tl.where(b >= 0, b - 1, b + 1), b)
    b = tl.where(b == -32768, 0, b)                            # -0 -> +0: one byte pattern per value
    m16 = _f16_from_bits(b)
    mh = m16.to(tl.float32)
    # scale: smallest float16 with mh + L*scale >= mx; start 2 steps below the rounded quotient.
    sb = ((mx - mh) / L).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    sb = tl.maximum(sb - 2, 0)
    for _ in tl.static_range(4):
        y, err = _tl_two_sum(mh, _f16_from_bits(sb).to(tl.float32) * L)
        ok = (mx < y) | ((mx == y) & (err >= 0))
        sb = tl.where(ok, sb, sb + 1)
    s16 = _f16_from_bits(sb)
    s = s16.to(tl.float32)
    _store_f16(out_ptr, rec, s16, gvalid)      # bytewise: R may be odd (4-bit, group_size % 4 == 2)
    _store_f16(out_ptr, rec + 2, m16, gvalid)
    c_lo = _tl_codes(x_lo, mh[:, None], s[:, None], L)
    c_hi = _tl_codes(x_hi, mh[:, None], s[:, None], L)
    c_lo = tl.where(m_lo, c_lo, 0)                             # padding codes are 0
    c_hi = tl.where(m_hi, c_hi, 0)
    dst = out_ptr + rec[:, None] + 4 + j[None, :]
    if BITS == 4:
        tl.store(dst, (c_lo | (c_hi << 4)).to(tl.uint8), mask=jm)
    elif BITS == 2:  # lane j < q packs elements j, j + q (first half) and their twins in the second half
        Q: tl.constexpr = HALF // 2
        qm = gvalid[:, None] & (j < Q)[None, :]
        m_lo2, m_hi2 = qm & (e_lo + Q < N), qm & (e_hi + Q < N)
        x_lo2 = tl.load(xrow + e_lo + Q, mask=m_lo2, other=0.0).to(tl.float32)
        x_hi2 = tl.load(xrow + e_hi + Q, mask=m_hi2, other=0.0).to(tl.float32)
        c_lo2 = tl.where(m_lo2, _tl_codes(x_lo2, mh[:, None], s[:, None], L), 0)
        c_hi2 = tl.where(m_hi2, _tl_codes(x_hi2, mh[:, None], s[:, None], L), 0)
        tl.store(dst, (c_lo | (c_lo2 << 2) | (c_hi << 4) | (c_hi2 << 6)).to(tl.uint8), mask=qm)
    else:
        tl.store(dst, c_lo.to(tl.uint8), mask=jm)
        tl.store(dst + HALF, c_hi.to(tl.uint8), mask=jm)


@triton.jit
def _tl_codes(x, mh, s, L: tl.constexpr):
    """Same rule as _codes: floor guess, then one exact half-way comparison."""
    safe = tl.where(s > 0, s, 1.0)
    c = tl.minimum(tl.maximum((x - mh) / safe, 0.0), L).to(tl.int32)   # >= 0: trunc == floor
    y, err = _tl_two_sum(mh, (c.to(tl.float32) + 0.5) * s)
    up = (x > y) | ((x == y) & (err <= 0))
    c = tl.where(up & (c < L), c + 1, c)
    return tl.where(s > 0, c, 0)


@triton.jit
def _dequantize_kernel(p_ptr, sm_ptr, out_ptr, total, N, G, S1, S2, st0, st1, st2, EVEN: tl.constexpr,
                       BITS: tl.constexpr, GS: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_G: tl.constexpr):
    HALF: tl.constexpr = GS // 2
    R: tl.constexpr = 4 + GS * BITS // 8
    gid = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    gvalid = gid < total
    row, g = gid // G, gid % G
    rec = (row // (S1 * S2)) * st0 + ((row // S2) % S1) * st1 + (row % S2) * st2 + g * R
    s = load_f16(p_ptr, sm_ptr, rec, gvalid, EVEN)[:, None]
    mn = load_f16(p_ptr, sm_ptr, rec + 2, gvalid, EVEN)[:, None]
    j = tl.arange(0, HALF_P2)
    jm = gvalid[:, None] & (j < HALF)[None, :]
    c_lo, c_hi = codes_of_halves(p_ptr, rec[:, None] + 4, j[None, :], jm, BITS, HALF)
    e_lo = (g * GS)[:, None] + j[None, :]
    dst = out_ptr + (row * N)[:, None]
    ty = out_ptr.dtype.element_ty
    tl.store(dst + e_lo, (c_lo.to(tl.float32) * s + mn).to(ty), mask=jm & (e_lo < N))
    tl.store(dst + e_lo + HALF, (c_hi.to(tl.float32) * s + mn).to(ty), mask=jm & (e_lo + HALF < N))


def _blocks(spec: QuantSpec) -> tuple[int, int]:
    half_p2 = triton.next_power_of_2(spec.group_size // 2)
    return half_p2, max(1, 2048 // half_p2)                    # ~4K elements per program


def quantize_triton(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """Triton quantize (CUDA, or CPU under TRITON_INTERPRET=1). No finiteness check: a NaN/inf
    group gets garbage scale/min (its values dequantize to NaN/inf or nonsense), other groups
    are unaffected; checking would cost a device sync."""
    x, out = _prepare_quantize(x, spec, out, dim)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    lay = lead3(out, out.dim() - 2)
    target = out if lay is not None else torch.empty(out.shape, dtype=torch.uint8, device=out.device)
    (_, s1, s2), (t0, t1, t2) = lead3(target, target.dim() - 2)
    g = spec.num_groups(n)
    total = x2.shape[0] * g
    half_p2, block_g = _blocks(spec)
    grid = (triton.cdiv(total, block_g),)
    if total:
        _quantize_kernel[grid](x2, target, total, n, g, x2.stride(0), s1, s2, t0, t1, t2,
                               BITS=spec.bits, GS=spec.group_size, HALF_P2=half_p2, BLOCK_G=block_g)
    if target is not out:
        out.copy_(target)
    return out


def dequantize_triton(packed: torch.Tensor, spec: QuantSpec, n: int, dtype: torch.dtype = torch.float32,
                      dim: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton dequantize of any (…, G, R) view whose lead dims collapse to 3 (else copied once)."""
    check_packed(packed, spec, n)
    lead = tuple(packed.shape[:-2])
    if out is None:
        out = torch.empty((*lead, n), dtype=dtype, device=packed.device)
    elif tuple(out.shape) != (*lead, n) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {(*lead, n)}, got {tuple(out.shape)}.")
    if (lead3(packed, len(lead)) is None or packed.stride(-1) != 1
            or (packed.stride(-2) != spec.record_bytes and packed.shape[-2] > 1)):
        packed = packed.contiguous()
    (_, s1, s2), (t0, t1, t2) = lead3(packed, len(lead))
    g = spec.num_groups(n)
    total = out.numel() // n * g
    half_p2, block_g = _blocks(spec)
    if total:
        sm, even = half_view(packed)
        _dequantize_kernel[(triton.cdiv(total, block_g),)](
            packed, sm, out, total, n, g, s1, s2, t0, t1, t2, EVEN=even,
            BITS=spec.bits, GS=spec.group_size, HALF_P2=half_p2, BLOCK_G=block_g)
    return out.movedim(-1, dim) if dim not in (-1, out.dim() - 1) else out


# ----------------------------------------------------------------------------- public entry points

def _prepare_quantize(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None, dim: int):
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a QuantSpec, got {type(spec).__name__}.")
    check_float(x, "x")
    if dim not in (-1, x.dim() - 1):
        x = x.movedim(dim, -1)
    shape = spec.packed_shape(x.shape)
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8, device=x.device)
    elif out.dtype != torch.uint8 or tuple(out.shape) != shape or out.device != x.device:
        raise ValueError(f"out must be a uint8 tensor of shape {shape} on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}; allocate it with spec.packed_shape(x.shape).")
    elif out.stride(-1) != 1 or (out.stride(-2) != spec.record_bytes and out.shape[-2] > 1):
        raise ValueError("out must have contiguous records (strides (..., R, 1)); slice the cache only "
                         "along its leading dims.")
    return x, out


def quantize(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """Pack x (any float dtype; float64 is rounded to float32 first) group-wise along `dim`.

    Returns uint8 (*other dims, G, R) with the grouped dim last, written into `out` when given
    (e.g. a cache slice cache[t:t+s]). CUDA tensors run the Triton kernel, CPU tensors PyTorch
    (which raises ValueError for NaN/inf or |x| > 65504, the float16 range of scale/min).
    """
    if x.is_cuda:
        return quantize_triton(x, spec, out, dim)
    x, out = _prepare_quantize(x, spec, out, dim)
    n = x.shape[-1]
    x2 = x.reshape(-1, n).float()
    try:
        o2, direct = out.view(x2.shape[0], *out.shape[-2:]), True
    except RuntimeError:                                        # a non-flattenable view: write once
        o2, direct = torch.empty((x2.shape[0], *out.shape[-2:]), dtype=torch.uint8), False
    _quantize_torch_rows(x2, spec, o2)
    if not direct:
        out.copy_(o2.view(out.shape))
    return out


def dequantize(packed: torch.Tensor, spec: QuantSpec, n: int, dtype: torch.dtype = torch.float32,
               dim: int = -1) -> torch.Tensor:
    """Values (*lead, n) of a packed (*lead, G, R) tensor; `dim` moves the grouped dim back there."""
    if packed.is_cuda:
        return dequantize_triton(packed, spec, n, dtype, dim)
    check_packed(packed, spec, n)
    out = dequantize_torch(packed, spec, n, dtype)
    return out.movedim(-1, dim) if dim not in (-1, out.dim() - 1) else out
