"""Copying missed key blocks from the KV cache's home into slots of HiP's hot-block pool.

The home is token-major (T, B, H, D): GPU memory, or pinned host memory mapped into the GPU's
address space (io/tiers.device_view), which the kernel then reads across PCIe itself: no host
gather, no staging copy, no host synchronisation, and only the blocks that missed cross the link.

A home may also be packed 4/8-bit (kernels/quant/pack.py's records, (T, B, H, G, R) uint8, with
`spec`): the kernel then dequantizes each token on its way into the pool, which stays in the
compute dtype, so only the packed bytes cross PCIe.

`blocks` and `slots` (B, H, M) list, per (row, KV head), the logical blocks to bring and the pool
slot each goes to; entries with a negative block or slot are skipped (the lookup pads its miss
list to a fixed width, so the launch never depends on how many blocks missed). Tokens at or
beyond `length` are not in the home yet and arrive as zeros; `length` may be a one-element
device tensor (a captured decode step reads it there). The pool is (B, H, slots * bk, D).

`fetch_blocks` runs the Triton kernel on CUDA tensors and `fetch_blocks_torch`, the reference, on
the CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.pack import dequantize_torch, load_f16
from ..quant.spec import QuantSpec, check_packed

ENTRIES = 16  # blocks one program copies


def _check(pool_k, pool_v, home_k, home_v, blocks, slots, block_size: int, spec=None) -> None:
    packed = spec is not None
    if home_k.dim() != 4 + packed or home_v.shape != home_k.shape:
        layout = "(T, B, H, G, R) uint8 records" if packed else "(T, B, H, D)"
        raise ValueError(f"homes must be one token-major {layout} shape; got {tuple(home_k.shape)}, "
                         f"{tuple(home_v.shape)}.")
    _, b, h = home_k.shape[:3]
    d = pool_k.shape[3] if packed else home_k.shape[3]
    if packed:
        check_packed(home_k, spec, d)
        if home_k.stride(4) != 1:
            raise ValueError("a packed home's records must be contiguous bytes.")
    if pool_k.dim() != 4 or pool_v.shape != pool_k.shape or pool_k.shape[:2] != (b, h) or pool_k.shape[3] != d:
        raise ValueError(f"pools must be (B, H, slots * block_size, D) = ({b}, {h}, *, {d}); got "
                         f"{tuple(pool_k.shape)}.")
    if pool_k.shape[2] % block_size:
        raise ValueError(f"pool length {pool_k.shape[2]} is not a multiple of block_size {block_size}.")
    if blocks.shape != slots.shape or blocks.dim() != 3 or blocks.shape[:2] != (b, h):
        raise ValueError(f"blocks and slots must both be (B, H, M) = ({b}, {h}, M); got {tuple(blocks.shape)} and "
                         f"{tuple(slots.shape)}.")
    if (not packed and pool_k.dtype != home_k.dtype) or home_v.dtype != home_k.dtype or pool_v.dtype != pool_k.dtype:
        raise ValueError("homes and pools must share one dtype (a packed home: uint8 records).")
    if home_v.stride() != home_k.stride() or pool_v.stride() != pool_k.stride():
        raise ValueError("keys and values must share one memory layout (the kernel reads both with one set of strides).")


def fetch_blocks(pool_k, pool_v, home_k, home_v, blocks, slots, length: int | torch.Tensor, block_size: int,
                 spec: QuantSpec | None = None) -> None:
    """pool[b, h, slot * bk + i] = home[block * bk + i, b, h] (dequantized with `spec` when the home
    is packed; zeros at or beyond `length`) for every valid (block, slot) entry, in place."""
    _check(pool_k, pool_v, home_k, home_v, blocks, slots, block_size, spec)
    if pool_k.is_cuda:
        fetch_blocks_triton(pool_k, pool_v, home_k, home_v, blocks, slots, length, block_size, spec)
    else:
        fetch_blocks_torch(pool_k, pool_v, home_k, home_v, blocks, slots, length, block_size, spec)


def fetch_blocks_torch(pool_k, pool_v, home_k, home_v, blocks, slots, length: int | torch.Tensor, block_size: int,
                       spec: QuantSpec | None = None) -> None:
    """The reference: gather the entries' tokens with advanced indexing (dequantizing packed
    records with the quant package's PyTorch path), scatter them into the pool."""
    _check(pool_k, pool_v, home_k, home_v, blocks, slots, block_size, spec)
    bk, dev = block_size, pool_k.device
    b, h, m = blocks.shape
    if m == 0:
        return
    blocks, slots = blocks.long().to(home_k.device), slots.long().to(home_k.device)
    take = (blocks >= 0) & (slots >= 0)
    tok = blocks.clamp(min=0)[..., None] * bk + torch.arange(bk, device=home_k.device)  # (B, H, M, bk)
    if isinstance(length, torch.Tensor):
        length = length.reshape(()).to(home_k.device)
    inside = (tok < length) & take[..., None]
    rows = torch.arange(b, device=home_k.device).view(b, 1, 1, 1).expand_as(tok)
    heads = torch.arange(h, device=home_k.device).view(1, h, 1, 1).expand_as(tok)
    safe = torch.where(inside, tok, 0)
    dst = (slots.clamp(min=0)[..., None] * bk + torch.arange(bk, device=home_k.device)).to(dev)
    for home, pool in ((home_k, pool_k), (home_v, pool_v)):
        data = home[safe, rows, heads]  # (B, H, M, bk, D), or packed (..., G, R)
        if spec is not None:
            data = dequantize_torch(data, spec, pool.shape[3], pool.dtype)
        data = data.masked_fill(~inside[..., None], 0).to(dev)
        keep = take.to(dev)
        bi, hi, mi = keep.nonzero(as_tuple=True)
        pool[bi[:, None], hi[:, None], dst[bi, hi, mi]] = data[bi, hi, mi]


@triton.jit
def _dequantized(ptr, rec, d, read, s_group, GS: tl.constexpr, BITS: tl.constexpr):
    """Elements d of the packed tokens whose records for group 0 start at byte offsets `rec`
    (rows), records `s_group` bytes apart; each group's scale and minimum are assembled from
    their bytes (any alignment)."""
    HALF: tl.constexpr = GS // 2
    j = d % GS
    head = rec[:, None] + (d // GS * s_group)[None, :]
    scale = load_f16(ptr, ptr, head, read, False)
    low = load_f16(ptr, ptr, head + 2, read, False)
    if BITS == 4:
        byte = tl.load(ptr + head + 4 + (j % HALF)[None, :], mask=read, other=0).to(tl.int32)
        code = tl.where((j >= HALF)[None, :], byte >> 4, byte & 15)
    else:
        code = tl.load(ptr + head + 4 + j[None, :], mask=read, other=0).to(tl.int32)
    return code.to(tl.float32) * scale + low


@triton.jit
def _fetch_kernel(hk_ptr, hv_ptr, pk_ptr, pv_ptr, blk_ptr, slot_ptr, length_ptr,
                  shT, shB, shH, shD, spB, spH, spT, spD, sbB, sbH, sbM, ssB, ssH, ssM,
                  H, M, BK: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, E: tl.constexpr,
                  PACKED: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    length = tl.load(length_ptr)
    r = tl.arange(0, E * BK)  # one row per token of E blocks
    entry = tl.program_id(1) * E + r // BK
    live = entry < M
    blk = tl.load(blk_ptr + b * sbB + h * sbH + entry * sbM, mask=live, other=-1).to(tl.int64)
    slot = tl.load(slot_ptr + b * ssB + h * ssH + entry * ssM, mask=live, other=-1).to(tl.int64)
    take = live & (blk >= 0) & (slot >= 0)
    tok = blk * BK + r % BK
    d = tl.arange(0, D_P)
    dmask = d < D
    row = b.to(tl.int64) * shB + h.to(tl.int64) * shH + tok * shT
    dst = b.to(tl.int64) * spB + h.to(tl.int64) * spH + (slot * BK + r % BK)[:, None] * spT + d[None, :] * spD
    read = (take & (tok < length))[:, None] & dmask[None, :]
    write = take[:, None] & dmask[None, :]
    ty = pk_ptr.dtype.element_ty
    if PACKED:  # shD: the stride of a group record (its bytes are contiguous)
        k = _dequantized(hk_ptr, row, d, read, shD, GS, BITS)
        v = _dequantized(hv_ptr, row, d, read, shD, GS, BITS)
    else:
        src = row[:, None] + d[None, :] * shD
        k = tl.load(hk_ptr + src, mask=read, other=0.0)
        v = tl.load(hv_ptr + src, mask=read, other=0.0)
    tl.store(pk_ptr + dst, tl.where(read, k, 0.0).to(ty), mask=write)
    tl.store(pv_ptr + dst, tl.where(read, v, 0.0).to(ty), mask=write)


def fetch_blocks_triton(pool_k, pool_v, home_k, home_v, blocks, slots, length: int | torch.Tensor,
                        block_size: int, spec: QuantSpec | None = None) -> None:
    """The kernel: one program per (row, KV head) and ENTRIES entries; skipped entries issue no reads.
    Runs in Triton's interpreter on CPU tensors."""
    _check(pool_k, pool_v, home_k, home_v, blocks, slots, block_size, spec)
    b, h, m = blocks.shape
    if m == 0 or b * h == 0:
        return
    d = pool_k.shape[3]
    if not isinstance(length, torch.Tensor):
        length = torch.full((1,), length, dtype=torch.int64, device=pool_k.device)  # a fill, not a copy
    strides = home_k.stride()[:4]  # packed: (T, B, H, group record); plain: (T, B, H, element)
    _fetch_kernel[(b * h, triton.cdiv(m, ENTRIES))](
        home_k, home_v, pool_k, pool_v, blocks, slots, length.reshape(1).to(torch.int64), *strides, *pool_k.stride(),
        *blocks.stride(), *slots.stride(), h, m, BK=block_size, D=d, D_P=triton.next_power_of_2(d), E=ENTRIES,
        PACKED=spec is not None, GS=spec.group_size if spec else 2, BITS=spec.bits if spec else 4)
