"""kernels/cpu_attention.py: the C++ decode-attention kernel (when it builds here) and the PyTorch
fallback against the float64 reference.

Tolerances, ||a - b|| / ||b|| against float64 on the same (rounded) cache values: fp32 output
1e-5; fp16 output 2e-3; bf16 output 4e-3 (rounding the output to bf16 alone gives ~1.6e-3). The
C++ kernel's own fp32 result is also checked at 1e-5 for every cache dtype: conversion in
registers is exact, so only fp32 accumulation error remains.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

import offload_engine.kernels.cpu_attention as ca
from offload_engine.kernels.cpu_attention import (cpp_backend, cpu_decode_attention, cpu_decode_attention_cpp,
                                   cpu_decode_attention_reference, cpu_decode_attention_torch)

from conftest import rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3}
HAVE_CPP = cpp_backend() is not None
IMPLS = [pytest.param(cpu_decode_attention_cpp, id="cpp",
                      marks=pytest.mark.skipif(not HAVE_CPP, reason="C++ kernel did not build here")),
         pytest.param(cpu_decode_attention_torch, id="torch")]


def make_case(b: int, hq: int, hkv: int, t: int, d: int, dtype: torch.dtype, seed: int = 0,
              padding: bool = True, t_max: int | None = None, layout: str = "head"):
    """q (B, Hq, D) and (B, Hkv, t, D) views of larger random caches, plus left-padding key_valid.

    layout "head": home[:, :, :t] of a (B, Hkv, T_max, D) buffer (the engine's view);
    "head-perm": a (Hkv + 1, B, T_max, D) buffer sliced and permuted, so the (b, h) strides are
    not in row-major order; "token": a token-major (T_max, B, Hkv, D) buffer permuted.
    """
    g = torch.Generator().manual_seed(seed)
    t_max = t_max or t + 5
    shape = {"head": (b, hkv, t_max, d), "head-perm": (hkv + 1, b, t_max, d), "token": (t_max, b, hkv, d)}[layout]
    homes = [torch.randn(shape, generator=g).to(dtype) for _ in range(2)]
    if layout == "head":
        k, v = (h[:, :, :t] for h in homes)
    elif layout == "head-perm":
        k, v = (h[1:].permute(1, 0, 2, 3)[:, :, :t] for h in homes)
    else:
        k, v = (h[:t].permute(1, 2, 0, 3) for h in homes)
    q = (torch.randn(b, hq, d, generator=g) * d ** -0.5 * 2).to(dtype)
    key_valid = None
    if padding:
        pad = torch.randint(0, t, (b,), generator=g)
        pad[0] = t - 1                                     # a row whose only key is the newest one
        key_valid = torch.arange(t)[None, :] >= pad[:, None]
    return q, k, v, key_valid


CASES = {  # (B, Hq, Hkv, T, D): MHA, GQA, T = 1, odd T, D not a multiple of 16 or 8, MQA
    "mha": (3, 4, 4, 37, 64),
    "gqa": (2, 8, 2, 45, 32),
    "t1": (2, 4, 2, 1, 64),
    "odd": (2, 6, 3, 133, 40),
    "odd-d": (2, 3, 3, 19, 20),
    "mqa-rep7": (2, 7, 1, 50, 48),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["head", "head-perm", "token"])
def test_matches_reference(impl, dtype, case, layout):
    q, k, v, key_valid = make_case(*CASES[case], dtype, seed=list(CASES).index(case) * 3 + len(layout), layout=layout)
    ref = cpu_decode_attention_reference(q, k, v, key_valid)
    out = impl(q, k, v, key_valid)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype]
    if key_valid is not None and not bool(key_valid.all()):      # padding changes the answer here
        assert rel_err(cpu_decode_attention_reference(q, k, v, None), ref) > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_no_padding_and_mixed_dtypes(impl):
    q, k, v, _ = make_case(2, 8, 4, 70, 64, torch.float16, seed=3, padding=False)
    ref = cpu_decode_attention_reference(q, k, v)
    assert rel_err(impl(q, k, v), ref) < TOL[torch.float16]
    q32 = q.float()                                        # fp32 queries over an fp16 cache
    out = impl(q32, k, v)
    assert out.dtype == torch.float32
    assert rel_err(out, cpu_decode_attention_reference(q32, k, v)) < TOL[torch.float16]


@pytest.mark.skipif(not HAVE_CPP, reason="C++ kernel did not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["gqa", "odd", "odd-d"])
def test_cpp_fp32_result(dtype, case):
    """The kernel's fp32 output buffer (NaN before the call) against float64: 1e-5 for every
    cache dtype, since conversion is exact and only fp32 accumulation error remains."""
    q, k, v, key_valid = make_case(*CASES[case], dtype, seed=11)
    q = q.float()
    out = torch.full(q.shape, float("nan"))
    res = cpu_decode_attention_cpp(q, k, v, key_valid, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert rel_err(out, cpu_decode_attention_reference(q, k, v, key_valid)) < 1e-5


@pytest.mark.skipif(not HAVE_CPP, reason="C++ kernel did not build here")
def test_cpp_never_reads_padding():
    """NaN and inf in padded slots (the kernel skips them) leave the result unchanged."""
    q, k, v, key_valid = make_case(3, 4, 2, 40, 64, torch.float16, seed=5)
    ref = cpu_decode_attention_reference(q, k, v, key_valid)
    dead = ~key_valid[:, None, :, None]
    k.masked_fill_(dead, float("nan"))
    v.masked_fill_(dead, float("inf"))
    out = cpu_decode_attention_cpp(q, k, v, key_valid)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("impl", IMPLS)
def test_large_scores_and_large_padding(impl):
    """Scores in the hundreds (softmax needs its max subtracted) and huge finite values in padded
    slots (they would dominate if the mask were ignored)."""
    q, k, v, key_valid = make_case(2, 4, 4, 64, 32, torch.float32, seed=7)
    q = q * 40
    dead = ~key_valid[:, None, :, None]
    k.masked_fill_(dead, 300.0)
    v.masked_fill_(dead, -1e4)
    ref = cpu_decode_attention_reference(q, k, v, key_valid)
    out = impl(q, k, v, key_valid)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.skipif(not HAVE_CPP, reason="C++ kernel did not build here")
def test_cpp_thread_count_does_not_change_result():
    q, k, v, key_valid = make_case(4, 6, 3, 600, 64, torch.float16, seed=9)   # enough work for 3 threads
    one = cpu_decode_attention_cpp(q, k, v, key_valid, num_threads=1)
    many = cpu_decode_attention_cpp(q, k, v, key_valid, num_threads=3)
    assert torch.equal(one, many)                         # one task per (b, kv-head): same arithmetic


def test_dispatch_uses_cpp_then_forced_fallback(monkeypatch):
    q, k, v, key_valid = make_case(2, 4, 2, 30, 64, torch.float16, seed=13)
    ref = cpu_decode_attention_reference(q, k, v, key_valid)
    calls = []
    real_cpp, real_torch = ca.cpu_decode_attention_cpp, ca.cpu_decode_attention_torch
    monkeypatch.setattr(ca, "cpu_decode_attention_cpp", lambda *a: calls.append("cpp") or real_cpp(*a))
    monkeypatch.setattr(ca, "cpu_decode_attention_torch", lambda *a: calls.append("torch") or real_torch(*a))
    assert rel_err(cpu_decode_attention(q, k, v, key_valid), ref) < TOL[torch.float16]
    assert calls == (["cpp"] if HAVE_CPP else ["torch"])
    monkeypatch.setattr(ca, "library", lambda: None)     # as when the build failed
    calls.clear()
    assert rel_err(cpu_decode_attention(q, k, v, key_valid), ref) < TOL[torch.float16]
    assert calls == ["torch"]
    monkeypatch.undo()
    monkeypatch.setattr(ca, "cpu_decode_attention_torch", lambda *a: calls.append("torch") or real_torch(*a))
    monkeypatch.setenv("OFFLOAD_ENGINE_CPU_ATTENTION", "torch")
    calls.clear()
    cpu_decode_attention(q, k, v, key_valid)
    assert calls == ["torch"]


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(ca, "_lib", None)
    monkeypatch.setattr(ca, "_tried", False)

    def fail():
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(ca, "_build_and_load", fail)
    q, k, v, key_valid = make_case(2, 4, 4, 20, 32, torch.float32, seed=17)
    ref = cpu_decode_attention_reference(q, k, v, key_valid)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        out = cpu_decode_attention(q, k, v, key_valid)
    assert rel_err(out, ref) < TOL[torch.float32]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # the second call must not warn again
        cpu_decode_attention(q, k, v, key_valid)
    assert cpp_backend() is None
    with pytest.raises(RuntimeError, match="not available"):
        cpu_decode_attention_cpp(q, k, v, key_valid)


@pytest.mark.skipif(not HAVE_CPP, reason="C++ kernel did not build here")
def test_fresh_build_is_cached(tmp_path, monkeypatch):
    """A build into an empty cache folder works, and a second load reuses the file."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = ca._build_and_load()
    files = list((tmp_path / "offload_engine_cpu_attention").glob("cpu_attention_*.so"))
    assert len(files) == 1 and lib._name == str(files[0])
    mtime = files[0].stat().st_mtime_ns
    ca._build_and_load()
    assert files[0].stat().st_mtime_ns == mtime
    assert len(os.listdir(files[0].parent)) == 1          # no temporary files left behind


@pytest.mark.skipif(not HAVE_CPP or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs the C++ kernel on x86")
@pytest.mark.parametrize("isa,flags", [("avx2", ["-mavx2", "-mf16c", "-mfma"]), ("scalar", [])])
def test_other_isa_builds(isa, flags, tmp_path, monkeypatch):
    """The AVX2 and portable code paths (what other hosts compile to) against the reference."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = ca._build_and_load([["-O3", "-std=c++17", *flags, "-fopenmp"]])
    assert lib.cpu_decode_attention_isa().decode() == isa + "+openmp"
    monkeypatch.setattr(ca, "_lib", lib)
    monkeypatch.setattr(ca, "_tried", True)
    for i, case in enumerate(["gqa", "odd-d", "mqa-rep7"]):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q, k, v, key_valid = make_case(*CASES[case], dtype, seed=20 + i, layout="head-perm")
            q = q.float()
            out = torch.full(q.shape, float("nan"))
            cpu_decode_attention_cpp(q, k, v, key_valid, out=out)
            assert rel_err(out, cpu_decode_attention_reference(q, k, v, key_valid)) < 1e-5, (case, dtype)
    from offload_engine.kernels.cpu_attention import cpu_packed_decode_attention_cpp
    from offload_engine.kernels.quant.attention import quant_decode_attention_reference
    from offload_engine.kernels.quant.pack import quantize
    from offload_engine.kernels.quant.spec import QuantSpec
    for bits, gs, d in [(4, 64, 128), (4, 32, 40), (8, 32, 40)]:  # packed rows, whole and partial groups
        spec, g = QuantSpec(bits, gs), torch.Generator().manual_seed(bits + d)
        k, v = (quantize(torch.randn(3, 2, 24, d, generator=g), spec) for _ in range(2))  # (B, H, T, G, R)
        q = torch.randn(3, 4, d, generator=g) * d ** -0.5
        out = cpu_packed_decode_attention_cpp(q, k, v, bits, gs)
        heads_last = (2, 0, 1, 3, 4)
        ref, _ = quant_decode_attention_reference(q, k.permute(heads_last), v.permute(heads_last), spec, d, 24)
        assert rel_err(out, ref) < 1e-5, (bits, gs, d)


def _bad_inputs():
    q, k, v, kv = make_case(2, 4, 2, 10, 16, torch.float16, seed=0, padding=False)
    ok = torch.ones(2, 10, dtype=torch.bool)
    empty_row = ok.clone()
    empty_row[1] = False
    k_nc = torch.randn(2, 2, 16, 10).half().transpose(-1, -2)     # (2, 2, 10, 16), head_dim strided
    return [
        ("q must be", (q[0], k, v, None)),
        ("q must be", (q.int(), k, v, None)),
        ("k must be", (q, k[:, :, :, :8], v, None)),
        ("k must be", (q, k[:, :, :0], v[:, :, :0], None)),
        ("must have the same", (q, k, v.float(), None)),
        ("contiguous head_dim", (q, k_nc, v, None)),
        ("multiple of Hkv", (q[:, :3], k, v, None)),
        ("float16/bfloat16/float32", (q, k.double(), v.double(), None)),
        ("key_valid must be", (q, k, v, ok.long())),
        ("key_valid must be", (q, k, v, ok[:, :9])),
        ("without any valid key", (q, k, v, empty_row)),
    ]


@pytest.mark.parametrize("fn", [cpu_decode_attention, cpu_decode_attention_torch, cpu_decode_attention_reference])
def test_bad_input(fn):
    for match, args in _bad_inputs():
        with pytest.raises(ValueError, match=match):
            fn(*args)


@pytest.mark.skipif(not HAVE_CPP, reason="C++ kernel did not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gather_attention_matches_float64_reference(dtype):
    """Each (row, query head) over its own token list (-1 = none; GQA; a strided head-major slice
    of a larger buffer); a row with no token gives 0, and unlisted slots (NaN here) are never read."""
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, t, d, length = 3, 6, 2, 50, 24, 17
    buf_k = torch.randn(b, hkv, 64, d, generator=g).to(dtype)
    buf_v = torch.randn(b, hkv, 64, d, generator=g).to(dtype)
    k, v = buf_k[:, :, :t], buf_v[:, :, :t]
    q = (torch.randn(b, hq, d, generator=g) * d ** -0.5).to(dtype)
    tokens = torch.stack([torch.randperm(t, generator=g)[:length] for _ in range(b * hq)]).view(b, hq, length)
    tokens[torch.rand(b, hq, length, generator=g) < 0.3] = -1
    tokens[1, 2] = -1  # no token at all
    unlisted = torch.ones(b, hkv, t, dtype=torch.bool)
    for r in range(b):
        for h in range(hq):
            listed = tokens[r, h][tokens[r, h] >= 0]
            unlisted[r, h // (hq // hkv), listed] = False
    k[unlisted], v[unlisted] = float("nan"), float("nan")  # never read
    out = ca.cpu_gather_attention_cpp(q, k, v, tokens)
    want = torch.zeros(b, hq, d, dtype=torch.float64)
    for r in range(b):
        for h in range(hq):
            listed = tokens[r, h][tokens[r, h] >= 0]
            if len(listed):
                kk, vv = k[r, h // (hq // hkv), listed].double(), v[r, h // (hq // hkv), listed].double()
                want[r, h] = (q[r, h].double() @ kk.T).softmax(-1) @ vv
    assert out.dtype == dtype and not out.isnan().any()
    assert (out[1, 2] == 0).all()
    assert rel_err(out, want) < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
