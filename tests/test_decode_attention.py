"""kernels/decode_attention.py: flash-decoding over a token-major cache, against float64.

The Triton launcher runs in Triton's interpreter on CPU (on the GPU where there is one) with
16-key tiles. Caches are strided views into a larger NaN-filled buffer and hold random data only
in each row's [key_start, length): any read outside that range, or an unwritten split, shows up
as NaN in the output.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offload_engine.kernels.decode_attention as da
from offload_engine.kernels.attention import attention_reference
from offload_engine.kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    decode_attention_torch,
    decode_attention_triton,
    default_num_splits,
    split_scratch,
)

from conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (B, Hq, Hkv, D, T_max, length, key_start, num_splits): MHA and GQA groups 1, 3, 4; T_max and
# lengths off the 16-key tile; D not a power of two; left padding per row; several splits, some
# of them entirely beyond length.
CASES = [
    (3, 4, 4, 24, 45, 37, [0, 5, 20], 1),
    (3, 4, 4, 24, 45, 37, [0, 5, 20], 3),
    (2, 6, 2, 16, 45, 45, [7, 0], 2),
    (3, 8, 2, 32, 50, 33, [0, 16, 32], 4),
    (2, 3, 3, 16, 37, 37, None, 1),
    (2, 8, 2, 16, 100, 20, [3, 0], 8),  # 20 keys in 16-key tiles: splits 2..7 are empty
]


def make_case(b, hq, hkv, d, t_max, length, key_start, dtype, seed, device=DEVICE):
    """q (B, Hq, D) and caches (T_max, B, Hkv, D) as strided views of larger NaN-filled buffers;
    random values only where a row's keys are real."""
    g = torch.Generator().manual_seed(seed)
    starts = [0] * b if key_start is None else key_start
    k_buf = torch.full((t_max + 3, b + 1, 2 * hkv + 1, d), float("nan"))
    v_buf = torch.full((t_max + 3, b + 1, 2 * hkv + 1, d), float("nan"))
    k, v = k_buf[2:2 + t_max, 1:, 1:1 + hkv], v_buf[2:2 + t_max, 1:, hkv + 1:]
    for row, lo in enumerate(starts):
        k[lo:length, row] = torch.randn(length - lo, hkv, d, generator=g)
        v[lo:length, row] = torch.randn(length - lo, hkv, d, generator=g)
    q_buf = torch.randn(b, hq + 2, d, generator=g) * d ** -0.5 * 2  # x2: peakier softmax
    k_buf, v_buf, q_buf = k_buf.to(dtype).to(device), v_buf.to(dtype).to(device), q_buf.to(dtype).to(device)
    k, v, q = k_buf[2:2 + t_max, 1:, 1:1 + hkv], v_buf[2:2 + t_max, 1:, hkv + 1:], q_buf[:, 1:1 + hq]
    assert not k.is_contiguous() and not q.is_contiguous()
    length_t = torch.tensor(length, device=device)
    ks = None if key_start is None else torch.tensor(key_start, device=device)
    return q, k, v, length_t, ks


def check(out, q, k, v, length, key_start):
    ref = decode_attention_reference(q, k, v, length, key_start)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref.cpu()) < TOL[q.dtype]


def nan_out(q):
    return torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, dtype):
    b, hq, hkv, d, t_max, length, key_start, splits = case
    q, k, v, length_t, ks = make_case(b, hq, hkv, d, t_max, length, key_start, dtype, seed=t_max + splits)
    scratch = tuple(x.fill_(float("nan")) for x in split_scratch(q, splits))  # every split must write its slot
    out = decode_attention_triton(q, k, v, length_t, ks, num_splits=splits, block_t=16, out=nan_out(q),
                                  scratch=scratch if splits > 1 else None)
    check(out, q, k, v, length_t, ks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_cpu_path_matches_reference(case, dtype):
    b, hq, hkv, d, t_max, length, key_start, _ = case
    q, k, v, length_t, ks = make_case(b, hq, hkv, d, t_max, length, key_start, dtype, seed=t_max, device="cpu")
    check(decode_attention(q, k, v, length_t, ks), q, k, v, length_t, ks)


@pytest.mark.parametrize("hq", [2, 4])
def test_bf16_int32_indices_and_default_splits(hq):
    """bf16, int32 length and key_start, the launcher's own tile and split choice (T_max = 300
    gives several splits for 2 x 2 programs on the 132 SMs the heuristic assumes here)."""
    q, k, v, length_t, ks = make_case(2, hq, 2, 16, 300, 250, [0, 41], torch.bfloat16, seed=3)
    length_t, ks = length_t.int(), ks.int()
    assert default_num_splits(2 * 2, 300, 64, 132) > 1
    check(decode_attention_torch(q.cpu(), k.cpu(), v.cpu(), length_t.cpu(), ks.cpu()), q.cpu(), k.cpu(), v.cpu(),
          length_t.cpu(), ks.cpu())
    if hq > 2 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter multiplies bf16 bit patterns in tl.dot; bf16 GQA is checked on the GPU")
    check(decode_attention_triton(q, k, v, length_t, ks, out=nan_out(q)), q, k, v, length_t, ks)


@pytest.mark.parametrize("hq", [2, 1])
def test_length_one_returns_first_value(hq):
    """One key: the output is that key's value, whatever the (NaN-filled) rest of the cache holds."""
    q, k, v, length_t, _ = make_case(2, hq, 1, 16, 40, 1, None, torch.float32, seed=5)
    for out in (decode_attention_triton(q, k, v, length_t, num_splits=4, block_t=16, out=nan_out(q)),
                decode_attention(q.cpu(), k.cpu(), v.cpu(), length_t.cpu())):
        assert torch.allclose(out.cpu(), v[0].repeat_interleave(hq, 1).cpu(), rtol=1e-6, atol=1e-6)


def test_row_without_keys_gives_zeros():
    """key_start at length (never the engine's case: its new token is real) gives zeros, not NaN."""
    q, k, v, length_t, ks = make_case(2, 4, 2, 16, 40, 30, [30, 4], torch.float32, seed=6)
    ref = decode_attention_reference(q, k, v, length_t, ks)
    for splits in (1, 3):
        out = decode_attention_triton(q, k, v, length_t, ks, num_splits=splits, block_t=16, out=nan_out(q))
        assert torch.equal(out[0].cpu(), torch.zeros(4, 16)) and torch.equal(ref[0].cpu(), torch.zeros(4, 16).double())
        check(out, q, k, v, length_t, ks)
    assert torch.equal(decode_attention(q.cpu(), k.cpu(), v.cpu(), length_t.cpu(), ks.cpu())[0], torch.zeros(4, 16))


def test_reference_is_padded_dense_attention():
    """The reference is kernels.attention's float64 reference over the whole cache with a
    (B, 1, 1, T_max) mask (what the engine's captured step attends with), k/v repeated for GQA."""
    b, hq, hkv, d, t_max, length = 3, 6, 2, 16, 30, 21
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, hq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(t_max, b, hkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    key_start = torch.tensor([0, 4, 13])
    pos = torch.arange(t_max)
    mask = ((pos[None, :] >= key_start[:, None]) & (pos[None, :] < length))[:, None, None, :]
    keys, values = (x.permute(1, 2, 0, 3).repeat_interleave(hq // hkv, 1) for x in (k, v))
    dense = attention_reference(q[:, :, None], keys, values, mask)[:, :, 0]
    assert rel_err(decode_attention_reference(q, k, v, torch.tensor(length), key_start), dense) < 1e-12


def test_launch_depends_on_shapes_only(monkeypatch):
    """The launcher never reads a device value on the host (no .item(), int(), .cpu(), bool()): with
    those made to raise, it launches the same grids and constants for length 1 and length T_max.
    (A graph-capture test needs a GPU; this is the part of capturability checkable here.)"""
    launches = []

    class FakeKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, grid, tuple(a for a in args if not isinstance(a, torch.Tensor)),
                                 tuple(sorted(kwargs.items()))))
            return launch

    monkeypatch.setattr(da, "_split_kernel", FakeKernel("split"))
    monkeypatch.setattr(da, "_merge_kernel", FakeKernel("merge"))

    def host_read(*args, **kwargs):
        raise AssertionError("the launcher read a tensor value on the host")

    q, k, v, length_t, ks = make_case(2, 8, 2, 16, 300, 300, [0, 7], torch.float16, seed=8)
    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    per_length = []
    for value in (1, 300):
        launches.clear()
        length_t.fill_(value)
        decode_attention_triton(q, k, v, length_t, ks)
        per_length.append(list(launches))
    assert per_length[0] == per_length[1] and [x[0] for x in per_length[0]] == ["split", "merge"]


def test_default_num_splits():
    assert default_num_splits(32 * 32, 544, 64, 132) == 1  # OPT-6.7B at B=32 already fills the GPU
    assert default_num_splits(32 * 32, 544, 32, 132, programs_per_sm=16) == 2  # ... unless an SM holds 16
    assert default_num_splits(128 * 32, 544, 32, 132, programs_per_sm=16) == 1
    s = default_num_splits(16 * 8, 8192, 64, 132)  # Llama-8B-like GQA at B=16: splits fill it
    assert 2 <= s <= 64 and 16 * 8 * s >= 0.8 * 132 * 4
    assert default_num_splits(1, 40, 64, 132) == 1  # never more splits than tiles at T_max


def test_bad_input_raises():
    q, k, v, length_t, ks = make_case(2, 4, 2, 16, 20, 10, [0, 1], torch.float32, seed=9, device="cpu")
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :3], k, v, length_t)
    with pytest.raises(ValueError, match="0-dim"):
        decode_attention(q, k, v, length_t.view(1))
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q.half(), k, v, length_t)
    with pytest.raises(ValueError, match="key_start"):
        decode_attention(q, k, v, length_t, ks[:1])
    with pytest.raises(ValueError, match="outside"):
        decode_attention(q, k, v, torch.tensor(21))
    if torch.cuda.is_available():  # the launcher's own checks, on the device it launches on
        q, k, v, length_t = (t.cuda() for t in (q, k, v, length_t))
    with pytest.raises(ValueError, match="block_t"):
        decode_attention_triton(q, k, v, length_t, block_t=24)
    with pytest.raises(ValueError, match="scratch"):
        decode_attention_triton(q, k, v, length_t, num_splits=2, scratch=split_scratch(q, 3))


_COMPILE_SCRIPT = r"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import offload_engine.kernels.decode_attention as da

def build(fn, ptrs, ints, const, aligned, warps, stages):
    sig = dict(ptrs, **{n: "i32" for n in ints}, **{c: "constexpr" for c in const})
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}  # what the JIT sees at run time
    triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps, num_stages=stages))

strides = ["sqb", "sqh", "skt", "skb", "skh", "svt", "svb", "svh", "sob", "soh"]
for dt, group, splits, ks in (("fp16", 1, 1, True), ("fp16", 4, 4, False), ("bf16", 8, 1, True),
                              ("fp32", 3, 2, True)):
    ptrs = {n: "*" + dt for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ptrs.update(length_ptr="*i64", key_start_ptr="*i32", part_ptr="*fp32", lse_ptr="*fp32")
    bt, warps, stages, _ = da._config(getattr(torch, dict(fp16="float16", bf16="bfloat16", fp32="float32")[dt]), 128,
                                      group)
    const = dict(sqd=1, skd=1, svd=1, sod=1, GROUP=group, HAS_KEY_START=ks, HEAD_DIM=128, BLOCK_D=128,
                 BLOCK_G=16, BLOCK_T=bt, NUM_SPLITS=splits, USE_DOT=group >= 2,
                 DOT_PRECISION="ieee" if dt == "fp32" else "tf32")
    build(da._split_kernel, ptrs, strides + ["t_max", "hq"], const, list(ptrs) + strides, warps, stages)
build(da._merge_kernel, dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*fp16"), ["sob", "soh", "hq"],
      dict(sod=1, HEAD_DIM=96, BLOCK_D=128, NUM_SPLITS=5, BLOCK_S=8), ["part_ptr", "lse_ptr", "out_ptr"], 4, 1)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects (loop-carried types, layouts): compile every
    kernel variant for sm_90 with Triton's own ptxas, in a process without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
