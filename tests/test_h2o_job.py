"""H2O's decode item as one C++ job (kernels/cpu_decode_job.py's H2OJob), on the CPU in CI and
queued on the compute stream on a GPU (offload_engine/kv/cpu_queue.py).

Reference: offload_engine/kv/h2o.py's inline decode over the same CPU slot cache, step after
step with eviction: the same slot kernel on the same bytes, so positions, scores, homes and the
output must match exactly. Free slots hold NaN: nothing may read them. A packed cache's job is
checked against the PyTorch path (records decoded, the exact ring substituted, attend_slots)."""
from __future__ import annotations

import types

import pytest
import torch

from offload_engine.kernels.cpu_attention import BACKEND_ENV, cpp_backend
from offload_engine.kernels.cpu_decode_job import PackedSlots, h2o_job, run_job
from offload_engine.kernels.quant.spec import QuantSpec
from offload_engine.kv.codec import PackedCodec, PlainCodec
from offload_engine.kv.h2o import H2OAccess, H2OKV, SlotState
from offload_engine.kv.recent import ExactRing

from conftest import rel_err

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


def inline_access(slots, k_home, v_home, dtype, sinks, hh=HH, codec=None, ring=None, decay=1.0):
    cfg = types.SimpleNamespace(simulate=False, sizes=lambda n: (hh, RECENT), score_decay=lambda n: decay)
    codec = codec or PlainCodec(dtype, k_home.shape[-1])
    policy = H2OKV(cfg, codec, None, types.SimpleNamespace(prompt_len=0), sinks=sinks)
    policy.slots[0] = slots
    if ring is not None:
        policy.exact[0] = ring
    access = H2OAccess(policy, types.SimpleNamespace(capacity=C), 0, types.SimpleNamespace(static=False, length=0),
                       types.SimpleNamespace(kind="cpu", k=k_home, v=v_home))
    return access


def same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 4, 32), (2, 6, 2, 16)], ids=["mha", "gqa"])
@pytest.mark.parametrize("sinks", [False, True], ids=["h2o", "sinks"])
@pytest.mark.parametrize("hh", [HH, 2 * C], ids=["evicting", "budget-above-slots"])
@pytest.mark.parametrize("decay", [1.0, 0.99])
def test_job_equals_inline_decode_step_after_step(dtype, shape, sinks, hh, decay):
    b, hq, hkv, d = shape
    t0 = 20
    (k_home, v_home), slots = make_cache(b, hkv, d, t0, dtype, seed=hq + d)
    ref_homes, ref_slots = [x.clone() for x in (k_home, v_home)], SlotState(slots.position.clone(), slots.score.clone())
    access = inline_access(ref_slots, *ref_homes, dtype, sinks, hh, decay=decay)
    g = torch.Generator().manual_seed(7)
    evicted = 0
    for t in range(t0, t0 + 6):
        qkv = torch.randn(b, hq + 2 * hkv, d, generator=g)
        qkv[:, :hq] *= 2 * d ** -0.5
        qkv = qkv.to(dtype)
        out = torch.empty(b, hq, d)
        before = int((slots.position >= 0).sum())
        run_job(h2o_job(qkv, k_home, v_home, slots.position, slots.score, t, hh + RECENT, RECENT, sinks, out,
                        decay=decay))
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


def queue_steps_against_inline(b, hq, hkv, d, dtype, reference: H2OAccess, submit) -> None:
    """Six decode steps queued on a lagging stream (submit(queue, q, k, v, t) -> output) and the same
    steps decoded inline by `reference`: the outputs bit for bit once the stream has run them."""
    from offload_engine.kv.cpu_queue import CpuAttentionQueue
    queue, g, outs, exps = CpuAttentionQueue(), torch.Generator().manual_seed(5), [], []
    for t in range(20, 26):
        qkv = (torch.randn(b, 1, hq + 2 * hkv, d, generator=g) * 0.3).to(dtype)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
        torch.cuda._sleep(5_000_000)  # the stream lags: the job must still run in its order
        outs.append(submit(queue, q.cuda(), k.cuda(), v.cuda(), t))
        reference.state.length = t
        exps.append(reference._decode(q, k, v))
    torch.cuda.synchronize()
    queue.drain()
    for got, exp in zip(outs, exps):
        assert got.device.type == "cuda" and torch.equal(got.cpu(), exp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_queued_job_equals_inline_on_the_gpu(dtype):
    b, hq, hkv, d = 3, 4, 2, 32
    (k_home, v_home), slots = make_cache(b, hkv, d, 20, dtype, seed=3)
    k_home, v_home = k_home.pin_memory(), v_home.pin_memory()
    ref_homes, ref_slots = [x.clone() for x in (k_home, v_home)], SlotState(slots.position.clone(), slots.score.clone())
    access = inline_access(ref_slots, *ref_homes, dtype, False)
    queue_steps_against_inline(b, hq, hkv, d, dtype, access, lambda queue, q, k, v, t: queue.attend_h2o(
        q, k, v, k_home, v_home, slots.position, slots.score, t, HH + RECENT, RECENT, False))
    assert torch.equal(slots.position, ref_slots.position) and torch.equal(slots.score, ref_slots.score)
    assert same(k_home, ref_homes[0]) and same(v_home, ref_homes[1])


def packed_cache(b, hkv, d, t, dtype, spec, seed):
    """make_cache's slots over 4/8-bit records, free slots zero (the engine's prefill zero-fills
    them: the PyTorch path decodes every slot); an exact ring of 4 tokens."""
    (k, v), slots = make_cache(b, hkv, d, t, torch.float32, seed)
    codec = PackedCodec(spec, dtype, d)
    free = (slots.position < 0)[..., None, None]
    homes = [codec.encoded(x.nan_to_num(0.0).to(dtype)).masked_fill(free, 0) for x in (k, v)]
    ring = ExactRing(b, hkv, d, dtype, torch.device("cpu"), size=4)
    g = torch.Generator().manual_seed(seed + 1)
    ring.k.copy_(torch.randn(ring.k.shape, generator=g))
    ring.v.copy_(torch.randn(ring.v.shape, generator=g))
    return codec, homes, slots, ring


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=str)
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 16), (8, 32)])
@pytest.mark.parametrize("shape", [(3, 4, 4, 32), (2, 6, 2, 32)], ids=["mha", "gqa"])
@pytest.mark.parametrize("sinks", [False, True], ids=["h2o", "sinks"])
def test_packed_job_equals_the_torch_path_step_after_step(monkeypatch, dtype, tol, bits, group, shape, sinks):
    """The job writes the new records and ring rows, attends records and ring, scores and evicts
    as h2o.py's PyTorch path does; homes and ring bit for bit, outputs and scores to rounding.
    The job's free slots hold 0xFF bytes (a NaN scale): it must never read them."""
    b, hq, hkv, d = shape
    t0 = 20
    codec, homes, slots, ring = packed_cache(b, hkv, d, t0, dtype, QuantSpec(bits, group), seed=hq + d + bits)
    copies = lambda: ([h.clone() for h in homes], SlotState(slots.position.clone(), slots.score.clone()),
                      ExactRing(b, hkv, d, dtype, torch.device("cpu"), size=4))
    (job_homes, job_slots, job_ring), (ref_homes, ref_slots, ref_ring) = copies(), copies()
    for h in job_homes:
        h.masked_fill_((slots.position < 0)[..., None, None], 255)
    for r in (job_ring, ref_ring):
        r.k.copy_(ring.k)
        r.v.copy_(ring.v)
    job = inline_access(job_slots, *job_homes, dtype, sinks, codec=codec, ring=job_ring)
    ref = inline_access(ref_slots, *ref_homes, dtype, sinks, codec=codec, ring=ref_ring)
    g = torch.Generator().manual_seed(7)
    substituted = 0
    for t in range(t0, t0 + 6):
        qkv = torch.randn(b, 1, hq + 2 * hkv, d, generator=g)
        qkv[..., :hq, :] *= 2 * d ** -0.5
        qkv = qkv.to(dtype)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
        substituted += int(((ref_slots.position > t - 4) & (ref_slots.position >= 0)).sum())
        job.state.length = ref.state.length = t
        monkeypatch.delenv(BACKEND_ENV, raising=False)
        got = job._decode(q, k, v)
        monkeypatch.setenv(BACKEND_ENV, "torch")
        exp = ref._decode(q, k, v)
        assert not got.isnan().any() and rel_err(got, exp) < tol
        assert torch.equal(job_slots.position, ref_slots.position)
        assert torch.allclose(job_slots.score, ref_slots.score, atol=10 * tol)
        held = (ref_slots.position >= 0)[..., None, None].expand_as(ref_homes[0])
        assert all(torch.equal(x[held], y[held]) for x, y in zip(job_homes, ref_homes))
        assert torch.equal(job_ring.k, ref_ring.k) and torch.equal(job_ring.v, ref_ring.v)
    assert substituted > 0  # the ring was read


def test_packed_job_bad_input():
    codec, (k_home, v_home), slots, ring = packed_cache(2, 2, 32, 20, torch.float32, QuantSpec(4, 32), seed=1)
    qkv, out = torch.randn(2, 6, 32), torch.empty(2, 2, 32)
    records = torch.zeros(2, 2, 2, *k_home.shape[3:], dtype=torch.uint8)
    ok = PackedSlots(records, ring.k, ring.v, 4, 32)
    run_job(h2o_job(qkv, k_home, v_home, slots.position, slots.score, 20, 8, 3, False, out, packed=ok))
    for bad, match in ((PackedSlots(records, ring.k, ring.v, 2, 32), "4- or 8-bit"),
                       (PackedSlots(records[:, :1], ring.k, ring.v, 4, 32), "records must be"),
                       (PackedSlots(records, ring.k.half(), ring.v, 4, 32), "ring_k must be")):
        with pytest.raises(ValueError, match=match):
            h2o_job(qkv, k_home, v_home, slots.position, slots.score, 20, 8, 3, False, out, packed=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_queued_packed_job_equals_inline_on_the_gpu():
    """Records encoded on the GPU and staged with q/k/v, the job queued: the inline job's bytes."""
    b, hq, hkv, d, dtype = 3, 4, 2, 32, torch.float16
    codec, homes, slots, ring = packed_cache(b, hkv, d, 20, dtype, QuantSpec(4, 32), seed=3)
    homes = [h.pin_memory() for h in homes]
    ref_homes, ref_slots = [h.clone() for h in homes], SlotState(slots.position.clone(), slots.score.clone())
    ref_ring = ExactRing(b, hkv, d, dtype, torch.device("cpu"), size=4)
    ref_ring.k.copy_(ring.k)
    ref_ring.v.copy_(ring.v)
    queued = inline_access(slots, *homes, dtype, False, codec=codec, ring=ring)
    ref = inline_access(ref_slots, *ref_homes, dtype, False, codec=codec, ring=ref_ring)
    queue_steps_against_inline(b, hq, hkv, d, dtype, ref, lambda queue, q, k, v, t: queue.attend_h2o(
        q, k, v, *homes, slots.position, slots.score, t, HH + RECENT, RECENT, False, queued._packed_slots(k, v)))
    assert torch.equal(slots.position, ref_slots.position) and torch.equal(slots.score, ref_slots.score)
    assert all(torch.equal(x, y) for x, y in zip(homes, ref_homes))
    assert torch.equal(ring.k, ref_ring.k) and torch.equal(ring.v, ref_ring.v)
