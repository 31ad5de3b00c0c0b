"""Copying missed key blocks into HiP's hot pool (kernels/hip/fetch.py): the Triton kernel (in
the interpreter here, compiled on a GPU, also reading pinned host memory through its mapping)
against an explicit loop, on random data with a poisoned pool."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from offload_engine.kernels.hip.fetch import fetch_blocks_torch, fetch_blocks_triton
from offload_engine.kernels.quant.pack import dequantize_reference, quantize
from offload_engine.kernels.quant.spec import QuantSpec


def case(seed: int, device="cpu", dtype=torch.float32, T=37, B=2, H=3, D=24, bk=2, slots=9, m=7):
    g = torch.Generator().manual_seed(seed)
    home_k, home_v = (torch.randn(T + 5, B, H, D, generator=g).to(dtype) for _ in range(2))
    blocks = torch.full((B, H, m), -1, dtype=torch.int64)
    where = torch.full((B, H, m), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            n = int(torch.randint(0, m + 1, (1,), generator=g))
            blocks[b, h, :n] = torch.randperm(-(-(T + 5) // bk), generator=g)[:n]
            where[b, h, :n] = torch.randperm(slots, generator=g)[:n]
    where[0, 0, 0] = -1  # a block with no slot is skipped too
    pool_k, pool_v = (torch.full((B, H, slots * bk, D), float("nan"), dtype=dtype) for _ in range(2))
    return [x.to(device) for x in (pool_k, pool_v, home_k, home_v, blocks, where)], T, bk


def expected(pool_k, pool_v, home_k, home_v, blocks, slots, length, bk):
    out_k, out_v = pool_k.clone(), pool_v.clone()
    for b, h, e in zip(*torch.nonzero((blocks >= 0) & (slots >= 0), as_tuple=True)):
        for i in range(bk):
            tok, dst = int(blocks[b, h, e]) * bk + i, int(slots[b, h, e]) * bk + i
            inside = tok < length
            out_k[b, h, dst] = home_k[tok, b, h] if inside else 0
            out_v[b, h, dst] = home_v[tok, b, h] if inside else 0
    return out_k, out_v


def fetch(impl, pool_k, pool_v, home_k, home_v, blocks, slots, *rest):
    """Run `impl` where it runs (the Triton kernel on the GPU when there is one: device memory
    here, pinned host memory below); returns the pools on the CPU."""
    if impl is fetch_blocks_triton and torch.cuda.is_available():
        tensors = [x.cuda() for x in (pool_k, pool_v, home_k, home_v, blocks, slots)]
        impl(*tensors, *rest)
        return tensors[0].cpu(), tensors[1].cpu()
    impl(pool_k, pool_v, home_k, home_v, blocks, slots, *rest)
    return pool_k, pool_v


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("impl", [fetch_blocks_torch, fetch_blocks_triton])
def test_fetch_copies_the_listed_blocks_and_nothing_else(seed, impl):
    (pool_k, pool_v, home_k, home_v, blocks, slots), length, bk = case(seed)
    want_k, want_v = expected(pool_k, pool_v, home_k, home_v, blocks, slots, length, bk)
    pool_k, pool_v = fetch(impl, pool_k, pool_v, home_k, home_v, blocks, slots, length, bk)
    assert torch.equal(pool_k.nan_to_num(7.0), want_k.nan_to_num(7.0))  # untouched slots stay poisoned
    assert torch.equal(pool_v.nan_to_num(7.0), want_v.nan_to_num(7.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fetch_reads_pinned_host_memory_through_its_mapping():
    from offload_engine.io.tiers import device_view

    (pool_k, pool_v, home_k, home_v, blocks, slots), length, bk = case(5, dtype=torch.float16)
    want_k, want_v = expected(pool_k, pool_v, home_k, home_v, blocks, slots, length, bk)
    dev = torch.device("cuda")
    pinned = [home.pin_memory() for home in (home_k, home_v)]  # alive while the views are used
    mapped = [device_view(x, dev) for x in pinned]
    assert all(m is not None for m in mapped)
    pool_k, pool_v, blocks, slots = (x.to(dev) for x in (pool_k, pool_v, blocks, slots))
    fetch_blocks_triton(pool_k, pool_v, mapped[0], mapped[1], blocks, slots, length, bk)
    assert torch.equal(pool_k.cpu().nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(pool_v.cpu().nan_to_num(7.0), want_v.nan_to_num(7.0))


@pytest.mark.parametrize("bits,group", [(4, 8), (4, 24), (8, 16)])
@pytest.mark.parametrize("impl", [fetch_blocks_torch, fetch_blocks_triton])
def test_a_packed_home_arrives_dequantized(bits, group, impl):
    """Packed records (groups that do and do not divide the head dim) dequantize on their way in:
    each element equals the float64 reading of its record, rounded to the pool's dtype."""
    (pool_k, pool_v, home_k, home_v, blocks, slots), length, bk = case(7, D=40)
    spec = QuantSpec(bits, group)
    packed = [quantize(x, spec) for x in (home_k, home_v)]  # (T, B, H, G, R)
    plain = [dequantize_reference(x, spec, 40).float() for x in packed]
    want_k, want_v = expected(pool_k, pool_v, plain[0], plain[1], blocks, slots, length, bk)
    pool_k, pool_v = fetch(impl, pool_k, pool_v, packed[0], packed[1], blocks, slots, length, bk, spec)
    assert torch.equal(pool_k.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(pool_v.nan_to_num(7.0), want_v.nan_to_num(7.0))
