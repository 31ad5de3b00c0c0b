"""kernels/quant*.py: packed 4/8-bit format, Triton kernels (interpreter on CPU) and torch paths
against float64 references.

Tolerances: fp32 results rel. error 1e-5, fp16 2e-3, bf16 1e-2 (||a-b|| / ||b||). The quantizer's
decisions are exact, so its bytes are compared for equality, not within a tolerance.

The Triton launchers get tensors on DEV: CUDA tensors (the compiled kernels) on a GPU machine,
CPU tensors (Triton's interpreter) elsewhere; the references and torch paths stay on the CPU, and
results come back to the CPU to be compared.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from offload_engine.kernels.quant.pack import (QuantSpec, dequantize, dequantize_reference, dequantize_triton, quantize,
                                               quantize_reference, quantize_triton, unpack_codes)
from offload_engine.kernels.quant.attention import (quant_decode_attention, quant_decode_attention_reference,
                                     quant_decode_attention_triton)
from offload_engine.kernels.quant.linear import quant_linear, quant_linear_reference, quant_linear_triton

from conftest import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def dev(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEV)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scales(packed: torch.Tensor, spec: QuantSpec, n: int) -> torch.Tensor:
    """Per-element float64 scale of its group, read from the record bytes."""
    s = packed[..., :2].contiguous().view(torch.float16)[..., 0].double()
    return s.repeat_interleave(spec.group_size, -1)[..., :n]


def check_quantized(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Both fast paths give the reference's bytes; the exact error bound holds; dequantize paths
    equal the float64 values rounded once to float32. Returns the packed tensor."""
    n = x.shape[-1]
    ref = quantize_reference(x, spec)
    torch_path = quantize(x, spec)
    out = dev(torch.randint(0, 256, ref.shape, dtype=torch.uint8, generator=gen(1)))  # garbage, not zeros
    triton_path = quantize_triton(dev(x), spec, out=out)
    assert triton_path is out
    triton_path = triton_path.cpu()
    assert torch.equal(torch_path, ref)
    assert torch.equal(triton_path, ref)
    exact = dequantize_reference(ref, spec, n)
    err = (exact - x.double()).abs()
    assert (err <= scales(ref, spec, n) / 2).all()          # exact: no slack needed in float64
    deq = dequantize(ref, spec, n)
    deq_t = dequantize_triton(dev(ref), spec, n, out=torch.full(deq.shape, float("nan"), device=DEV)).cpu()
    assert torch.equal(deq, exact.float()) and torch.equal(deq_t, exact.float())
    return ref


# ----------------------------------------------------------------------------- format and round trip

def test_spec_sizes():
    spec = QuantSpec()
    assert (spec.bits, spec.group_size, spec.levels, spec.record_bytes) == (4, 64, 15, 36)
    assert QuantSpec(8, 32).record_bytes == 36 and QuantSpec(4, 32).record_bytes == 20
    assert spec.num_groups(100) == 2 and spec.num_groups(128) == 2
    assert spec.packed_shape((3, 5, 100)) == (3, 5, 2, 36)
    assert spec.packed_nbytes((3, 5, 100)) == 3 * 5 * 2 * 36


@pytest.mark.parametrize("bits,gs,n,lead", [
    (4, 32, 64, (3, 5)), (4, 64, 100, (7,)), (4, 64, 200, (2, 1, 3)), (4, 6, 13, (4,)),
    (8, 32, 33, (5,)), (8, 64, 100, (2, 3)), (8, 2, 5, (3,)),
    (2, 32, 64, (3, 5)), (2, 8, 13, (4,)), (2, 4, 6, (3,)), (2, 32, 70, (2, 2)),
])
def test_round_trip_bound_and_identical_bytes(bits, gs, n, lead):
    spec = QuantSpec(bits, gs)
    x = torch.randn(*lead, n, generator=gen(n)) * 3 + 0.7
    check_quantized(x, spec)
    check_quantized(x.half(), spec)                          # half input: converted exactly to float32


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_hard_rounding_cases(bits):
    """Groups far from zero (float32 sums round), exact half-way ties, constants, tiny ranges:
    a naive float32 quantizer diverges from the exact rule here."""
    spec = QuantSpec(bits, 32)
    g = gen(bits)
    offset = 1000 + torch.randn(8, 64, generator=g) * 1e-3
    tiny = torch.randn(8, 64, generator=g) * 1e-6
    const = torch.full((8, 64), 0.1).add_(torch.arange(8.0)[:, None])   # 0.1 is not a float16
    rep = torch.full((8, 64), 0.375)                                     # an exact float16: scale 0
    # Ties: min + (c + 1/2) * scale exactly, each group also holding code 0 and `levels`.
    s = torch.tensor(2.0 ** -5)
    c = torch.randint(0, spec.levels, (8, 64), generator=g).double()
    ties = -0.75 + (c + 0.5) * s
    ties[:, 0::32], ties[:, 1::32] = -0.75, -0.75 + spec.levels * s     # both groups of a row
    c[:, 0::32], c[:, 1::32] = -1.0, spec.levels - 1.0
    signed_zeros = torch.where(torch.rand(8, 64, generator=g) < 0.5, -0.0, 0.0)
    x = torch.cat([offset, tiny, const, rep, ties.float(), signed_zeros])
    packed = check_quantized(x, spec)
    assert (scales(packed, spec, 64)[24:32] == 0).all()
    assert (packed[40:, :, :4] == 0).all()                                # +0 scale and min, never -0
    codes = unpack_codes(packed[32:40, :, 4:].to(torch.int64), bits)
    assert torch.equal(codes.flatten(1), (c + 1).long())                  # ties round half up


def test_padding_is_masked_out_of_min_max():
    spec = QuantSpec(4, 64)
    x = 5 + torch.rand(6, 100, generator=gen(3))                 # all > 5: a zero pad would drag min to 0
    packed = check_quantized(x, spec)
    mins = packed[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    true_min = x[:, 64:].amin(-1)
    assert (mins[:, 1] <= true_min).all() and (mins[:, 1] > 4.99).all()
    hi = packed[:, 1, 4 + (100 - 64 - 32):].to(torch.int32)     # bytes whose high nibble is padding
    assert ((hi >> 4) == 0).all()


def test_out_into_cache_views_and_dim():
    spec = QuantSpec(4, 32)
    t, b, n = 6, 3, 50
    x = torch.randn(3, b, n, generator=gen(4))
    ref = quantize_reference(x, spec)
    for fn, device in ((quantize, "cpu"), (quantize_triton, DEV)):
        before_tm = torch.randint(0, 256, (t, b, 2, spec.record_bytes), dtype=torch.uint8, generator=gen(5))
        before_hm = before_tm.permute(1, 0, 2, 3).contiguous()    # head-major storage (B, T, G, R)
        tm, hm = before_tm.clone().to(device), before_hm.clone().to(device)
        fn(x.to(device), spec, out=tm[2:5])
        fn(x.to(device), spec, out=hm.permute(1, 0, 2, 3)[2:5])
        tm, hm = tm.cpu(), hm.cpu()
        assert torch.equal(tm[2:5], ref) and torch.equal(hm[:, 2:5].permute(1, 0, 2, 3), ref)
        assert torch.equal(tm[:2], before_tm[:2]) and torch.equal(tm[5:], before_tm[5:])
        assert torch.equal(hm[:, :2], before_hm[:, :2]) and torch.equal(hm[:, 5:], before_hm[:, 5:])
        view = hm.permute(1, 0, 2, 3)[2:5]                        # strided read back
        assert torch.equal(dequantize_triton(view.to(DEV), spec, n).cpu(), dequantize_reference(ref, spec, n).float())
        assert torch.equal(dequantize(view, spec, n), dequantize_reference(ref, spec, n).float())
    y = torch.randn(5, 70, 3, generator=gen(6))
    for q, dq, device in ((quantize, dequantize, "cpu"), (quantize_triton, dequantize_triton, DEV)):
        packed = q(y.to(device), spec, dim=1)
        assert torch.equal(packed.cpu(), quantize_reference(y.movedim(1, -1), spec))
        back = dq(packed, spec, 70, torch.float16, dim=1).cpu()
        assert back.shape == y.shape and back.dtype == torch.float16
        assert rel_err(back, y) < 0.1                            # 4-bit: ~4% typical


@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (8, 64), (4, 10), (2, 32), (2, 12)])
def test_exactly_representable_values_round_trip_bit_exact(bits, gs):
    spec = QuantSpec(bits, gs)
    rows, groups, g = 5, 3, gen(7 + bits + gs)
    scale = (torch.rand(rows, groups, generator=g) * 0.5 + 2.0 ** -6).half()
    mn = ((torch.rand(rows, groups, generator=g) - 0.5) * 8).half()
    codes = torch.randint(0, spec.levels + 1, (rows, groups, gs), generator=g)
    perm = torch.rand(rows, groups, gs, generator=g).argsort(-1)
    codes.scatter_(-1, perm[..., :2], torch.tensor([0, spec.levels]).expand(rows, groups, 2).contiguous())
    x64 = (codes.double() * scale.double()[..., None] + mn.double()[..., None]).flatten(1)
    x = x64.float()
    assert torch.equal(x.double(), x64)                          # the construction is exact in float32
    packed = check_quantized(x, spec)
    assert torch.equal(packed[..., :2].contiguous().view(torch.float16)[..., 0], scale)
    assert torch.equal(packed[..., 2:4].contiguous().view(torch.float16)[..., 0], mn)
    assert torch.equal(dequantize(packed, spec, groups * gs), x)


def test_gguf_q4_1_layout():
    spec = QuantSpec(4, 32)
    qs = bytes(range(7, 7 + 16 * 13, 13))[:16]                     # arbitrary nibble pairs
    d, m = 0.5, -3.25
    record = struct.pack("<ee16B", d, m, *qs)                      # GGUF Q4_1 block: d, m, qs
    packed = torch.tensor(list(record), dtype=torch.uint8).view(1, 1, 20)
    want = [(qs[j] & 15) * d + m for j in range(16)] + [(qs[j] >> 4) * d + m for j in range(16)]
    want = torch.tensor(want, dtype=torch.float64).view(1, 32)
    assert torch.equal(dequantize_reference(packed, spec, 32), want)
    assert torch.equal(dequantize(packed, spec, 32).double(), want)
    assert torch.equal(dequantize_triton(dev(packed), spec, 32).cpu().double(), want)
    gguf = pytest.importorskip("gguf")                            # llama.cpp's own Q4_1 reader
    x = torch.randn(4, 96, generator=gen(8)) * 2
    packed = quantize(x, spec)
    theirs = gguf.quants.dequantize(packed.numpy().reshape(-1), gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(np.asarray(theirs, dtype=np.float32).reshape(4, 96), dequantize(packed, spec, 96).numpy())


# ----------------------------------------------------------------------------- quant_linear

@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quant_linear_triton(m, dtype, tol, with_bias):
    spec, k, n = QuantSpec(4, 64), 100, 70                          # K padded, N not a block multiple
    g = gen(m)
    w = quantize(torch.randn(n, k, generator=g) * 0.2, spec)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if with_bias else None
    ref = quant_linear_reference(x, w, spec, k, bias)
    y = quant_linear_triton(dev(x), dev(w), spec, k, dev(bias),
                            out=torch.full((m, n), float("nan"), dtype=dtype, device=DEV))
    assert y.dtype == dtype and rel_err(y.cpu(), ref) < tol


@pytest.mark.parametrize("bits,gs,k", [(8, 32, 77), (4, 34, 90)])  # 8-bit; odd record size (R = 21)
def test_quant_linear_triton_other_formats(bits, gs, k):
    spec, n = QuantSpec(bits, gs), 40
    w = quantize(torch.randn(n, k, generator=gen(k)), spec)
    x = torch.randn(5, k, generator=gen(k + 1))
    y = quant_linear_triton(dev(x), dev(w), spec, k, out=torch.full((5, n), float("nan"), device=DEV))
    assert rel_err(y.cpu(), quant_linear_reference(x, w, spec, k)) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_quant_linear_cpu_path(dtype, tol):
    # bf16 is checked here only: Triton 3.9's interpreter computes bf16 tl.dot wrongly (raw bits).
    spec, k, n = QuantSpec(4, 64), 130, 33
    w = quantize(torch.randn(n, k, generator=gen(9)), spec)
    x = torch.randn(2, 3, k, generator=gen(10)).to(dtype)
    bias = torch.randn(n, generator=gen(11))
    y = quant_linear(x, w, spec, k, bias)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    assert rel_err(y, quant_linear_reference(x, w, spec, k, bias)) < tol


# ----------------------------------------------------------------------------- decode attention

def packed_cache(spec, t_max, b, hkv, d, layout, seed):
    """Packed K and V as (T_max, B, Hkv, G, R) views; head-major ones are permuted storage.
    Slots past `length` hold 0xFF garbage (NaN scales) that must never be read."""
    g = gen(seed)
    caches = []
    for _ in range(2):
        full = quantize(torch.randn(t_max, b, hkv, d, generator=g), spec)
        if layout == "head":
            full = full.permute(1, 2, 0, 3, 4).contiguous().permute(2, 0, 1, 3, 4)
        caches.append(full)
    return caches


CASES = [  # (bits, gs, d, hq, hkv, layout)
    (4, 32, 40, 4, 2, "token"), (4, 32, 40, 4, 2, "head"),
    (8, 64, 64, 3, 3, "token"), (4, 64, 64, 3, 3, "head"),
    (2, 32, 64, 4, 2, "token"), (2, 16, 40, 3, 3, "head"),
]


@pytest.mark.parametrize("bits,gs,d,hq,hkv,layout", CASES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_quant_decode_attention(bits, gs, d, hq, hkv, layout, padded, path):
    spec, b, t_max, length = QuantSpec(bits, gs), 3, 48, 41
    k, v = packed_cache(spec, t_max, b, hkv, d, layout, seed=d + hq)
    k[length:] = 255
    v[length:] = 255
    q = torch.randn(b, hq, d, generator=gen(12)) * d ** -0.5 * 3
    valid = None
    if padded:
        valid = torch.ones(b, length, dtype=torch.bool)
        valid[0, :20] = False                                   # split 0 fully masked for row 0
        valid[2, :1] = False
        k[:20, 0] = 255                                          # garbage under the padding too
        v[:20, 0] = 255
    ref_out, ref_probs = quant_decode_attention_reference(q, k, v, spec, d, length, valid)
    if path == "triton":
        out, probs = quant_decode_attention_triton(dev(q), dev(k), dev(v), spec, d, length, dev(valid),
                                                   return_probs=True, num_splits=3, block_t=16)
        out, probs = out.cpu(), probs.cpu()
    else:
        out, probs = quant_decode_attention(q, k, v, spec, d, length, valid, return_probs=True, block_tokens=7)
    assert out.shape == (b, hq, d) and probs.shape == (b, hq, length) and probs.dtype == torch.float32
    assert rel_err(out, ref_out) < 1e-5
    assert (probs.double() - ref_probs).abs().max() < 1e-6
    assert (probs.sum(-1) - 1).abs().max() < 1e-5
    if padded:
        assert (probs[0, :, :20] == 0).all() and (probs[2, :, 0] == 0).all()


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_quant_decode_attention_fp16_default_splits(path):
    spec, b, hq, hkv, d, length = QuantSpec(4, 64), 2, 8, 2, 128, 100
    k, v = packed_cache(spec, length, b, hkv, d, "token", seed=13)
    q = (torch.randn(b, hq, d, generator=gen(14)) * d ** -0.5).half()
    ref_out, _ = quant_decode_attention_reference(q, k, v, spec, d, length)
    if path == "triton":
        out = quant_decode_attention_triton(dev(q), dev(k), dev(v), spec, d, length).cpu()
    else:
        out = quant_decode_attention(q, k, v, spec, d, length)
    assert out.dtype == torch.float16 and rel_err(out, ref_out) < 2e-3


@pytest.mark.parametrize("bits,gs,d,hq,hkv,layout",  # the C++ kernel reads 4/8-bit; 8-bit partial group
                         [c for c in CASES if c[0] != 2] + [(8, 32, 40, 6, 2, "head")])
@pytest.mark.parametrize("padded", [False, True])
def test_quant_decode_attention_cpp(bits, gs, d, hq, hkv, layout, padded):
    """The C++ kernel over a packed cache (what the CPU path runs when no probabilities are asked
    for): float64 reference within fp32 rounding, never reading slots past `length` or under padding."""
    from offload_engine.kernels.cpu_attention import cpu_packed_decode_attention_cpp, use_cpp
    if not use_cpp():
        pytest.skip("the C++ CPU attention kernel does not build here")
    spec, b, t_max, length = QuantSpec(bits, gs), 3, 48, 41
    k, v = packed_cache(spec, t_max, b, hkv, d, layout, seed=d + hq + bits)
    k[length:] = 255
    v[length:] = 255
    q = torch.randn(b, hq, d, generator=gen(16)) * d ** -0.5 * 3
    valid = None
    if padded:
        valid = torch.ones(b, length, dtype=torch.bool)
        valid[1, :30] = False
        k[:30, 1] = 255
        v[:30, 1] = 255
    ref_out, _ = quant_decode_attention_reference(q, k, v, spec, d, length, valid)
    heads_first = (1, 2, 0, 3, 4)
    out = cpu_packed_decode_attention_cpp(q, k[:length].permute(heads_first), v[:length].permute(heads_first),
                                          bits, gs, valid)
    assert out.shape == (b, hq, d) and out.dtype == q.dtype
    assert rel_err(out, ref_out) < 1e-5
    dispatched = quant_decode_attention(q, k, v, spec, d, length, valid)
    assert torch.equal(dispatched, out)
    torch_path = quant_decode_attention(q, k, v, spec, d, length, valid, block_tokens=7)
    assert rel_err(torch_path, out) < 1e-5


def test_quant_decode_attention_cpp_refuses_what_it_would_read_past():
    from offload_engine.kernels.cpu_attention import cpu_packed_decode_attention_cpp, use_cpp
    if not use_cpp():
        pytest.skip("the C++ CPU attention kernel does not build here")
    spec = QuantSpec(4, 64)
    k, v = (quantize(torch.randn(1, 2, 16, 64, generator=gen(s)), spec) for s in (17, 18))
    q = torch.randn(1, 2, 64, generator=gen(19))
    for bad_q, bits, valid, needle in [(q, 8, None, "packed cache"), (torch.randn(4, 2, 64), 4, None, "packed cache"),
                                       (q, 4, torch.ones(1, 15, dtype=torch.bool), "key_valid"),
                                       (torch.randn(1, 3, 64), 4, None, "multiple of Hkv"), (q, 3, None, "bits 4 or 8")]:
        with pytest.raises(ValueError, match=needle):
            cpu_packed_decode_attention_cpp(bad_q, k, v, bits, 64, valid)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        QuantSpec(bits=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        QuantSpec(2, 6)
    with pytest.raises(ValueError, match="even integer"):
        QuantSpec(4, 33)
    with pytest.raises(ValueError, match="even integer"):
        QuantSpec(8, 0)
    spec = QuantSpec(4, 64)
    packed = quantize(torch.randn(4, 100, generator=gen(15)), spec)
    with pytest.raises(ValueError, match="packed has shape"):
        dequantize(packed, spec, 200)
    with pytest.raises(ValueError, match="packed has shape"):
        dequantize(packed, QuantSpec(8, 64), 100)
    with pytest.raises(ValueError, match="out must be a uint8 tensor"):
        quantize(torch.randn(4, 100), spec, out=torch.empty(4, 3, 36, dtype=torch.uint8))
    for bad in (float("nan"), float("inf"), 7e4):
        x = torch.randn(4, 100)
        x[1, 3] = bad
        with pytest.raises(ValueError, match="NaN, inf or values beyond"):
            quantize(x, spec)
    with pytest.raises(ValueError, match="in_features"):
        quant_linear(torch.randn(2, 99), packed, spec, 100)
    with pytest.raises(ValueError, match="group_size >= 32"):
        small = QuantSpec(4, 16)
        quant_linear_triton(torch.randn(2, 100), quantize(torch.randn(4, 100), small), small, 100)
    k = quantize(torch.randn(8, 2, 3, 64), spec)
    with pytest.raises(ValueError, match="not a multiple of Hkv"):
        quant_decode_attention(torch.randn(2, 4, 64), k, k, spec, 64, 8)
    with pytest.raises(ValueError, match="length=9"):
        quant_decode_attention(torch.randn(2, 3, 64), k, k, spec, 64, 9)
    with pytest.raises(ValueError, match="without any valid key"):
        quant_decode_attention(torch.randn(2, 3, 64), k, k, spec, 64, 8, torch.zeros(2, 8, dtype=torch.bool))
