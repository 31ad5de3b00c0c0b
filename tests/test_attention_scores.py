"""kernels/attention_scores.py: attention plus per-key accumulated probabilities, against float64.

The Triton launcher runs in Triton's interpreter on CPU (on the GPU where there is one) with
16-wide tiles, so small odd shapes cross several query and key tiles and the diagonal band.
"""
from __future__ import annotations

import pytest
import torch

from offload_engine.kernels.attention import attention, attention_reference, padding_mask
from offload_engine.kernels.attention_scores import (
    attention_with_column_sums,
    attention_with_column_sums_reference,
    attention_with_column_sums_torch,
    attention_with_column_sums_triton,
    decode_attention_with_probs,
)

from conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
COLSUM_TOL = 1e-5  # scores accumulate in fp32 from the same inputs the reference upcasts

# (B, Hq, Hkv, Tq, Tk, D): prefill, Tq < Tk, GQA and MHA, sizes off the 16-wide tiles, D not a power of 2.
SHAPES = [
    (2, 4, 2, 37, 37, 16),
    (2, 3, 3, 21, 50, 24),
    (1, 4, 1, 1, 19, 16),
    (2, 2, 2, 16, 32, 32),
]


def make_inputs(b, hq, hkv, tq, tk, d, dtype, seed, token_major=True, device="cpu"):
    """Random q and k/v; token-major k/v are permuted views of a (Tk, B, H, D) cache."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, tq, d, generator=g) * d ** -0.5 * 2).to(dtype)  # x2: peakier softmax
    if token_major:
        k = torch.randn(tk, b, hkv, d, generator=g).to(dtype).to(device).permute(1, 2, 0, 3)
        v = torch.randn(tk, b, hkv, d, generator=g).to(dtype).to(device).permute(1, 2, 0, 3)
    else:
        k = torch.randn(b, hkv, tk, d, generator=g).to(dtype).to(device)
        v = torch.randn(b, hkv, tk, d, generator=g).to(dtype).to(device)
    return q.to(device), k, v


def left_padding(b, tk, tq, device="cpu"):
    """key_valid with a different amount of left padding per row (row 0 pads into the queries)."""
    key_valid = torch.ones(b, tk, dtype=torch.bool, device=device)
    for row in range(b):
        key_valid[row, : (tk - tq // 2 - 1 if row == 0 else row * 3)] = False
    return key_valid, key_valid[:, tk - tq:]


def check(out, colsum, q, k, v, key_valid, query_valid):
    ref_out, ref_colsum = attention_with_column_sums_reference(q, k, v, key_valid, query_valid)
    assert out.dtype == q.dtype and colsum.dtype == torch.float32
    assert out.shape == q.shape and colsum.shape == (k.shape[0], k.shape[1], k.shape[2])
    assert not out.isnan().any() and not colsum.isnan().any()
    assert rel_err(out.cpu(), ref_out.cpu()) < OUT_TOL[q.dtype]
    assert rel_err(colsum.cpu(), ref_colsum.cpu()) < COLSUM_TOL


def test_reference_matches_dense_attention():
    """The reference's out is kernels.attention's reference with padding_mask (k/v repeated for GQA)."""
    b, hq, hkv, tq, tk, d = 3, 4, 2, 7, 12, 16
    q, k, v = make_inputs(b, hq, hkv, tq, tk, d, torch.float64, seed=1)
    key_valid, query_valid = left_padding(b, tk, tq)
    out, colsum = attention_with_column_sums_reference(q, k, v, key_valid, query_valid)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    assert rel_err(out, attention_reference(q, kr, vr, padding_mask(key_valid, tq))) < 1e-12
    # Column sums written out one query at a time.
    manual = torch.zeros(b, hkv, tk, dtype=torch.float64)
    mask = padding_mask(key_valid, tq)[:, 0]
    for i in range(b):
        for h in range(hq):
            for t in range(tq):
                if query_valid[i, t]:
                    s = (q[i, h, t] @ kr[i, h].T).masked_fill(~mask[i, t], float("-inf"))
                    manual[i, h // 2] += s.softmax(-1)
    assert rel_err(colsum, manual) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_matches_reference(shape, dtype, padded):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter multiplies bf16 bit patterns in tl.dot; bf16 is checked on the GPU")
    q, k, v = make_inputs(*shape, dtype, seed=sum(shape), device=DEVICE)
    key_valid, query_valid = left_padding(shape[0], shape[4], shape[3], DEVICE) if padded else (None, None)
    out = torch.full_like(q, float("nan"))
    colsum = torch.full((shape[0], shape[2], shape[4]), float("nan"), device=DEVICE)
    attention_with_column_sums_triton(q, k, v, key_valid, query_valid, block_m=16, block_n=16, out=out, colsum=colsum)
    check(out, colsum, q, k, v, key_valid, query_valid)


def test_triton_strided_query_and_uneven_tiles():
    """q as a transposed (B, T, H, D) view, contiguous k/v, and different query and key tile widths."""
    b, hq, hkv, tq, tk, d = 2, 4, 2, 29, 29, 16
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(b, tq, hq, d, generator=g) * 0.5).to(DEVICE).transpose(1, 2)
    _, k, v = make_inputs(b, hq, hkv, tq, tk, d, torch.float32, seed=6, token_major=False, device=DEVICE)
    key_valid, query_valid = left_padding(b, tk, tq, DEVICE)
    out = torch.full((b, hq, tq, d), float("nan"), device=DEVICE)
    colsum = torch.full((b, hkv, tk), float("nan"), device=DEVICE)
    attention_with_column_sums_triton(q, k, v, key_valid, query_valid, block_m=32, block_n=16, out=out, colsum=colsum)
    check(out, colsum, q, k, v, key_valid, query_valid)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk", [None, 5])
def test_cpu_path_matches_reference(shape, dtype, chunk):
    q, k, v = make_inputs(*shape, dtype, seed=sum(shape) + 1)
    key_valid, query_valid = left_padding(shape[0], shape[4], shape[3])
    if chunk is None:
        out, colsum = attention_with_column_sums(q, k, v, key_valid, query_valid)  # the public CPU entry
    else:
        out, colsum = attention_with_column_sums_torch(q, k, v, key_valid, query_valid, chunk=chunk)
    check(out, colsum, q, k, v, key_valid, query_valid)
    out, colsum = attention_with_column_sums_torch(q, k, v, chunk=chunk)
    check(out, colsum, q, k, v, None, None)


def triton_16(*args):
    return attention_with_column_sums_triton(*args, block_m=16, block_n=16)


@pytest.mark.parametrize("impl", [attention_with_column_sums_torch, triton_16], ids=["torch", "triton"])
def test_colsum_invariants(impl):
    """Each valid query head's probabilities sum to 1; padded keys and padded queries add nothing."""
    b, hq, hkv, tq, tk, d = 3, 6, 2, 25, 40, 16  # offset 15: a query tile starts on a key tile's last key
    device = DEVICE if impl is triton_16 else "cpu"
    q, k, v = make_inputs(b, hq, hkv, tq, tk, d, torch.float32, seed=9, device=device)
    key_valid, query_valid = left_padding(b, tk, tq, device)
    key_valid[2] = False  # a sequence that is all padding: every query sees only itself
    query_valid = key_valid[:, tk - tq:]
    out, colsum = impl(q, k, v, key_valid, query_valid)
    group = hq // hkv
    expected = (query_valid.sum(1) * group).double()[:, None].expand(b, hkv)
    assert torch.allclose(colsum.sum(-1).double().cpu(), expected.cpu(), rtol=1e-5, atol=0)
    assert (colsum[~key_valid[:, None, :].expand_as(colsum)] == 0).all()
    assert (colsum[key_valid[:, None, :].expand_as(colsum)] > 0).all()
    # The all-padding row attends only itself: out is its own value, no NaN.
    assert torch.allclose(out[2], v[2, :, tk - tq:].repeat_interleave(group, 0), atol=1e-6)
    # Without query_valid the padded queries count: each adds exactly 1 to its own (padded) key.
    _, counted = impl(q, k, v, key_valid, None)
    assert torch.allclose(counted.sum(-1).cpu(), torch.full((b, hkv), float(tq * group)), rtol=1e-5)
    assert torch.allclose(counted[2, :, tk - tq:].cpu(), torch.full((hkv, tq), float(group)), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_matches_reference_and_attention(dtype, hq, hkv, padded):
    b, tk, d = 3, 37, 16
    q, k, v = make_inputs(b, hq, hkv, 1, tk, d, dtype, seed=hq + tk)
    key_valid = left_padding(b, tk, 1)[0] if padded else None
    out, probs = decode_attention_with_probs(q, k, v, key_valid)
    ref_out, ref_probs = attention_with_column_sums_reference(q, k, v, key_valid)
    assert out.shape == q.shape and out.dtype == dtype and probs.dtype == torch.float32
    # Scores are rounded to the input dtype (as in HF OPT), hence the looser fp16 bounds.
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_err(out, ref_out) < tol
    assert rel_err(probs, ref_probs) < tol
    assert torch.allclose(probs.sum(-1), torch.full((b, hkv), float(hq // hkv)), rtol=1e-5)
    mask = padding_mask(key_valid, 1) if padded else None
    group = hq // hkv
    dense = attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), mask)
    assert rel_err(out, dense) < tol
    if padded:
        assert (probs[~key_valid[:, None, :].expand_as(probs)] == 0).all()


def test_decode_sees_itself_when_all_keys_are_padding():
    q, k, v = make_inputs(2, 4, 2, 1, 9, 16, torch.float32, seed=3)
    key_valid = torch.zeros(2, 9, dtype=torch.bool)
    out, probs = decode_attention_with_probs(q, k, v, key_valid)
    assert torch.equal(probs[..., -1], torch.full((2, 2), 2.0)) and (probs[..., :-1] == 0).all()
    assert torch.allclose(out, v[:, :, -1:].repeat_interleave(2, 1))


@pytest.mark.parametrize("fn", [attention_with_column_sums, attention_with_column_sums_reference,
                                triton_16, decode_attention_with_probs])
@pytest.mark.parametrize("case", ["heads", "tq_gt_tk", "head_dim", "key_valid_shape", "key_valid_dtype", "dtype"])
def test_bad_input_raises(fn, case):
    b, hq, hkv, tq, tk, d = 2, 4, 2, 1, 6, 16
    q, k, v = make_inputs(b, hq, hkv, tq, tk, d, torch.float32, seed=0)
    key_valid = torch.ones(b, tk, dtype=torch.bool)
    if case == "heads":
        q = torch.randn(b, 3, tq, d)
    elif case == "tq_gt_tk":
        q, k, v = make_inputs(b, hq, hkv, tk + 1, tk, d, torch.float32, seed=0)
        if fn is decode_attention_with_probs:
            q = q[:, :, :2]  # decode refuses more than one query
    elif case == "head_dim":
        q = torch.randn(b, hq, tq, d + 1)
    elif case == "key_valid_shape":
        key_valid = key_valid[:, 1:]
    elif case == "key_valid_dtype":
        key_valid = key_valid.long()
    elif case == "dtype":
        q = q.half()
    with pytest.raises(ValueError):
        fn(q, k, v, key_valid)
