"""kernels/attention.py against the float64 reference, including strided cache views and padding."""
from __future__ import annotations

import pytest
import torch

from offload_engine.kernels.attention import attention, attention_reference, padding_mask

from conftest import rel_err


def cache_views(b, h, t, d, dtype, seed):
    """Keys/values as the engine sees them: permuted views of a token-major (t, B, H, D) cache."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(t, b, h, d, generator=g).to(dtype)
    v = torch.randn(t, b, h, d, generator=g).to(dtype)
    return k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("s,t", [(1, 1), (1, 37), (9, 9), (5, 20)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_matches_reference(dtype, tol, s, t, padded, hq, hkv):
    b, d = 3, 16
    k, v = cache_views(b, hkv, t, d, dtype, seed=s * 100 + t)
    q = (torch.randn(b, hq, s, d, generator=torch.Generator().manual_seed(t)) * d ** -0.5).to(dtype)
    mask = None  # plain causal attention of the last s of t tokens
    if padded:
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[0, : t // 2] = False
        valid[2, :1] = False
        mask = padding_mask(valid, s)
    out = attention(q, k, v, mask)
    ref = attention_reference(q.double(), k.double(), v.double(), mask)
    assert not out.isnan().any()
    assert rel_err(out, ref) < tol


def test_padding_mask_never_leaves_a_row_empty():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = padding_mask(valid, 4)
    assert mask.any(-1).all()
    assert not mask[0, 0, 2:, :2].any()  # real queries never see left padding
    assert mask[1, 0].equal(torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel choice is a GPU matter")
@pytest.mark.parametrize("padded", [False, True])
def test_prompt_chunk_after_a_cache_never_materialises_scores(padded):
    """A prefill chunk of 2048 queries over 32768 keys with grouped heads: the scores alone would
    take 4 GiB; the kernels that stream them need well under one."""
    b, hq, hkv, s, t, d = 1, 32, 8, 2048, 32768, 128
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, hq, s, d, generator=g, device=dev, dtype=torch.float16) * d ** -0.5
    k = torch.randn(b, hkv, t, d, generator=g, device=dev, dtype=torch.float16)
    v = torch.randn(b, hkv, t, d, generator=g, device=dev, dtype=torch.float16)
    mask = None
    if padded:
        valid = torch.ones(b, t, dtype=torch.bool, device=dev)
        valid[:, :100] = False
        mask = padding_mask(valid, s)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = attention(q, k, v, mask)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 1 << 30
    rows = slice(s - 64, s)  # the reference on the last rows only
    ref = attention_reference(q[:, :, rows].double(), k.double(), v.double(),
                              None if mask is None else mask[:, :, rows])
    assert rel_err(out[:, :, rows], ref) < 2e-3
