"""H2O's decode item as one C++ job (kernels/cpu_decode_job.py's H2OJob), on the CPU in CI and
queued on the compute stream on a GPU (offload_engine/kv/cpu_queue.py).

Reference: offload_engine/kv/h2o.py's inline decode over the same CPU slot cache, step after
step with eviction: the same slot kernel on the same bytes, so positions, scores, homes and the
output must match exactly. Free slots hold NaN: nothing may read them."""
from __future__ import annotations

import types

import pytest
import torch

from offload_engine.kernels.cpu_attention import cpp_backend
from offload_engine.kernels.cpu_decode_job import h2o_job, run_job
from offload_engine.kv.codec import PlainCodec
from offload_engine.kv.h2o import H2OAccess, H2OKV, SlotState

pytestmark = pytest.mark.skipif(cpp_backend() is None, reason="C++ kernel did not build here")
HH, RECENT = 5, 3
C = HH + RECENT + 1


def make_cache(b, hkv, d, t, dtype, seed):
    """Homes (B, Hkv, C, D) and slots holding random earlier positions; a few slots free (NaN)."""
    g = torch.Generator().manual_seed(seed)
    homes = [torch.randn(b, hkv, C, d, generator=g).to(dtype) for _ in range(2)]
    position = torch.stack([torch.randperm(t, generator=g)[:C] for _ in range(b * hkv)]).view(b, hkv, C)
    free = torch.rand(b, hkv, C, generator=g) < 0.25
    free[..., -1] = True  # at least one free slot per (sequence, head)
    free[0, 0, :-2] = True  # a left-padded row: two tokens only
    free[0, 0, -2] = False
    position = position.masked_fill(free, -1)
    score = torch.rand(b, hkv, C, generator=g).masked_fill(free, 0.0)
    for h in homes:
        h.masked_fill_(free[..., None], float("nan"))
    return homes, SlotState(position, score)


def inline_access(slots, k_home, v_home, dtype, sinks, hh=HH):
    cfg = types.SimpleNamespace(simulate=False, sizes=lambda n: (hh, RECENT))
    policy = H2OKV(cfg, PlainCodec(dtype, k_home.shape[-1]), None, types.SimpleNamespace(prompt_len=0), sinks=sinks)
    policy.slots[0] = slots
    access = H2OAccess(policy, types.SimpleNamespace(capacity=C), 0, types.SimpleNamespace(static=False, length=0),
                       types.SimpleNamespace(kind="cpu", k=k_home, v=v_home))
    return access


def same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 4, 32), (2, 6, 2, 16)], ids=["mha", "gqa"])
@pytest.mark.parametrize("sinks", [False, True], ids=["h2o", "sinks"])
@pytest.mark.parametrize("hh", [HH, 2 * C], ids=["evicting", "budget-above-slots"])
def test_job_equals_inline_decode_step_after_step(dtype, shape, sinks, hh):
    b, hq, hkv, d = shape
    t0 = 20
    (k_home, v_home), slots = make_cache(b, hkv, d, t0, dtype, seed=hq + d)
    ref_homes, ref_slots = [x.clone() for x in (k_home, v_home)], SlotState(slots.position.clone(), slots.score.clone())
    access = inline_access(ref_slots, *ref_homes, dtype, sinks, hh)
    g = torch.Generator().manual_seed(7)
    evicted = 0
    for t in range(t0, t0 + 6):
        qkv = torch.randn(b, hq + 2 * hkv, d, generator=g)
        qkv[:, :hq] *= 2 * d ** -0.5
        qkv = qkv.to(dtype)
        out = torch.empty(b, hq, d)
        before = int((slots.position >= 0).sum())
        run_job(h2o_job(qkv, k_home, v_home, slots.position, slots.score, t, hh + RECENT, RECENT, sinks, out))
        evicted += before + b * hkv - int((slots.position >= 0).sum())
        access.state.length = t
        exp = access._decode(qkv[:, None, :hq], qkv[:, None, hq:hq + hkv], qkv[:, None, hq + hkv:])
        assert torch.equal(out.to(dtype), exp[:, 0])
        assert torch.equal(slots.position, ref_slots.position) and torch.equal(slots.score, ref_slots.score)
        assert same(k_home, ref_homes[0]) and same(v_home, ref_homes[1])
        assert int((slots.position >= 0).sum(-1).max()) <= hh + RECENT
    if hh + RECENT < C:
        assert evicted > 0  # the budget was reached: the rule ran


def test_job_bad_input():
    (k_home, v_home), slots = make_cache(2, 2, 16, 20, torch.float32, seed=1)
    qkv, out = torch.randn(2, 6, 16), torch.empty(2, 2, 16)
    with pytest.raises(ValueError, match="position must be"):
        h2o_job(qkv, k_home, v_home, slots.position.int(), slots.score, 20, 8, 3, False, out)
    with pytest.raises(ValueError, match="budget"):
        h2o_job(qkv, k_home, v_home, slots.position, slots.score, 20, 2, 3, False, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_queued_job_equals_inline_on_the_gpu(dtype):
    from offload_engine.kv.cpu_queue import CpuAttentionQueue
    b, hq, hkv, d = 3, 4, 2, 32
    (k_home, v_home), slots = make_cache(b, hkv, d, 20, dtype, seed=3)
    k_home, v_home = k_home.pin_memory(), v_home.pin_memory()
    ref_homes, ref_slots = [x.clone() for x in (k_home, v_home)], SlotState(slots.position.clone(), slots.score.clone())
    access = inline_access(ref_slots, *ref_homes, dtype, False)
    queue, g, outs, exps = CpuAttentionQueue(), torch.Generator().manual_seed(5), [], []
    for t in range(20, 26):
        qkv = (torch.randn(b, 1, hq + 2 * hkv, d, generator=g) * 0.3).to(dtype)
        q, k, v = (x.cuda() for x in (qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]))
        torch.cuda._sleep(5_000_000)  # the stream lags: the job must still run in its order
        outs.append(queue.attend_h2o(q, k, v, k_home, v_home, slots.position, slots.score, t, HH + RECENT, RECENT,
                                     False))
        access.state.length = t
        exps.append(access._decode(qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]))
    torch.cuda.synchronize()
    queue.drain()
    for got, exp in zip(outs, exps):
        assert got.device.type == "cuda" and torch.equal(got.cpu(), exp)
    assert torch.equal(slots.position, ref_slots.position) and torch.equal(slots.score, ref_slots.score)
    assert same(k_home, ref_homes[0]) and same(v_home, ref_homes[1])
