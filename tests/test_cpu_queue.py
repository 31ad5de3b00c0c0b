"""The queued CPU decode item: kernels/cpu_decode_job.py (on the CPU, in CI) and
offload_engine/kv/cpu_queue.py, which runs it as a CUDA host function (GPU only).

A job writes the new token's k/v into the head-major homes and attends positions 0..t: the
homes must equal the inline path's byte for byte and the output must equal the inline C++
kernel's exactly (same kernel, same bytes), and the float64 reference within TOL."""
from __future__ import annotations

import pytest
import torch

import offload_engine.kernels.cpu_attention as ca
from offload_engine.kernels.cpu_attention import cpp_backend, cpu_decode_attention_reference
from offload_engine.kernels.cpu_decode_job import decode_job, run_job

from conftest import rel_err

HAVE_CPP = cpp_backend() is not None
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3}
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason="C++ kernel did not build here")


def make_item(b, hq, hkv, d, cap, t, dtype, seed=0):
    """Random homes (B, Hkv, cap, D), the new token's (B, Hq + 2 Hkv, D) q/k/v, left padding."""
    g = torch.Generator().manual_seed(seed)
    homes = [torch.randn(b, hkv, cap, d, generator=g).to(dtype) for _ in range(2)]
    qkv = torch.randn(b, hq + 2 * hkv, d, generator=g)
    qkv[:, :hq] *= d ** -0.5 * 2
    pad = torch.randint(0, t + 1, (b,), generator=g)
    pad[0] = t  # a row whose only key is the new token
    key_valid = torch.arange(cap)[None, :] >= pad[:, None]
    for h in homes:  # padded slots hold NaN: the kernel must never read them
        h.masked_fill_(~key_valid[:, None, :, None], float("nan"))
    return qkv.to(dtype).contiguous(), homes[0], homes[1], key_valid


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 4, 64, 40, 17), (2, 8, 2, 32, 50, 0), (2, 6, 3, 40, 30, 29)],
                         ids=["mha", "gqa-t0", "last-slot"])
def test_job_writes_home_and_matches_inline_kernel(dtype, shape):
    b, hq, hkv, d, cap, t = shape
    qkv, k_home, v_home, key_valid = make_item(b, hq, hkv, d, cap, t, dtype)
    k_want, v_want = k_home.clone(), v_home.clone()
    k_want[:, :, t], v_want[:, :, t] = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    out = torch.empty(b, hq, d)
    run_job(decode_job(qkv, k_home, v_home, t, key_valid, out))
    assert torch.equal(k_home.nan_to_num(), k_want.nan_to_num())
    assert torch.equal(v_home.nan_to_num(), v_want.nan_to_num())
    valid = key_valid[:, :t + 1]
    inline = ca.cpu_decode_attention_cpp(qkv[:, :hq], k_want[:, :, :t + 1], v_want[:, :, :t + 1], valid)
    assert torch.equal(out.to(dtype), inline)
    ref = cpu_decode_attention_reference(qkv[:, :hq], k_want[:, :, :t + 1].nan_to_num(),
                                         v_want[:, :, :t + 1].nan_to_num(), valid)
    assert rel_err(out.double(), ref) < 1e-5  # fp32 accumulation over the rounded cache values
    assert rel_err(out.to(dtype).double(), ref) < TOL[dtype]


@needs_cpp
def test_job_on_a_strided_home_and_without_mask():
    """Homes as a slice of a larger (Hkv + 1, B, cap, D) buffer, permuted; key_valid None."""
    b, hq, hkv, d, cap, t = 2, 4, 2, 16, 12, 7
    g = torch.Generator().manual_seed(5)
    big = [torch.randn(hkv + 1, b, cap, d, generator=g) for _ in range(2)]
    k_home, v_home = (x[1:].permute(1, 0, 2, 3) for x in big)
    qkv = torch.randn(b, hq + 2 * hkv, d, generator=g)
    want = [x.clone() for x in big]
    want[0][1:, :, t], want[1][1:, :, t] = qkv[:, hq:hq + hkv].transpose(0, 1), qkv[:, hq + hkv:].transpose(0, 1)
    out = torch.empty(b, hq, d)
    run_job(decode_job(qkv, k_home, v_home, t, None, out))
    assert torch.equal(big[0], want[0]) and torch.equal(big[1], want[1])  # position t written, nothing else
    ref = cpu_decode_attention_reference(qkv[:, :hq], k_home[:, :, :t + 1], v_home[:, :, :t + 1])
    assert rel_err(out.double(), ref) < 1e-5


@needs_cpp
def test_job_bad_input():
    qkv, k_home, v_home, key_valid = make_item(2, 4, 2, 8, 10, 3, torch.float16)
    out = torch.empty(2, 4, 8)
    bad = [
        ("qkv must be", dict(qkv=qkv[:, :7])),                            # Hq not a multiple of Hkv
        ("qkv must be", dict(qkv=qkv.long())),
        ("k_home must be", dict(k_home=k_home.float())),                  # dtype differs from qkv
        ("v_home must be", dict(v_home=v_home.transpose(2, 3))),          # head_dim not contiguous
        ("outside the homes' capacity", dict(t=10)),
        ("out must be", dict(out=out.half())),
        ("key_valid must be", dict(key_valid=key_valid[:, :3])),          # does not reach position t
    ]
    for match, change in bad:
        args = dict(qkv=qkv, k_home=k_home, v_home=v_home, t=3, key_valid=key_valid, out=out) | change
        with pytest.raises(ValueError, match=match):
            decode_job(**args)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_CPP, reason="needs CUDA and the C++ kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_queue_equals_inline_on_the_gpu(dtype):
    """Several items queued back to back on one stream (staging reused) give the inline results,
    each its own GPU tensor (the output is read through the staging buffer's mapping)."""
    from offload_engine.kv.cpu_queue import CpuAttentionQueue, queue_supported
    dev = torch.device("cuda")
    assert queue_supported(dev)
    b, hq, hkv, d, cap = 3, 8, 4, 64, 48
    queue, results, want = CpuAttentionQueue(), [], []
    k_home, v_home = (torch.randn(b, hkv, cap, d).to(dtype).pin_memory() for _ in range(2))
    k_ref, v_ref = k_home.clone(), v_home.clone()
    key_valid = torch.ones(b, cap, dtype=torch.bool)
    key_valid[1, :5] = False
    for t in range(20, 26):
        qkv = torch.randn(b, hq + 2 * hkv, d).to(dtype)
        q, k, v = (x.to(dev)[:, None] for x in qkv.split([hq, hkv, hkv], dim=1))
        results.append(queue.attend(q, k, v, k_home, v_home, t, key_valid[:, :t + 1]))
        k_ref[:, :, t], v_ref[:, :, t] = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
        want.append(ca.cpu_decode_attention_cpp(qkv[:, :hq], k_ref[:, :, :t + 1], v_ref[:, :, :t + 1],
                                                key_valid[:, :t + 1]))
    queue.drain()
    assert torch.equal(k_home, k_ref) and torch.equal(v_home, v_ref)
    assert len({r.data_ptr() for r in results}) == len(results)
    for got, exp in zip(results, want):
        assert got.device.type == "cuda" and got.dtype == dtype
        assert torch.equal(got[:, 0].cpu(), exp.to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_view_reads_what_copies_wrote_to_pinned_memory():
    """A kernel through the GPU's mapping of a pinned arena sees each new host-side write (the hidden
    states' path between layers, activations.py), bit for bit; unpinned memory has no mapping."""
    from offload_engine.io.tiers import HostStorage, device_view
    dev = torch.device("cuda")
    host = HostStorage(pin=True, planned_bytes=1 << 20)
    home = host.allocate((4096,), torch.float16, "hidden")
    mapped = device_view(home, dev)
    assert mapped is not None and mapped.device.type == "cuda"
    stream = torch.cuda.Stream()
    for seed in range(3):
        src = torch.randn(4096, generator=torch.Generator().manual_seed(seed)).half().to(dev)
        with torch.cuda.stream(stream):
            home.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        torch.cuda.current_stream().wait_event(done)
        assert torch.equal(torch.mul(mapped, 1), src)
    assert device_view(torch.randn(8), dev) is None
    torch.cuda.synchronize()
    host.release()
