"""The memory plan against what the engine really allocates, and tier assignment."""
from __future__ import annotations

import pytest
import torch

from offload_engine.model_zoo import OPT_CONFIGS
from offload_engine.engine import Engine, EngineOptions
from offload_engine.models import build_layers
from offload_engine.io.tiers import Tier
from offload_engine.policies.memory import Workload, plan_memory
from offload_engine.policies.placement import Policy, assign_tiers

TINY = OPT_CONFIGS["opt-125m"].__class__(name="tiny", family="opt", num_layers=4, hidden_size=64, num_heads=4,
                                         ffn_dim=256, vocab_size=500, max_positions=128)


def real_bytes(engine: Engine) -> dict[Tier, int]:
    """Bytes of every tensor the engine holds, by tier, read off the tensors themselves."""
    out = {t: 0 for t in Tier}
    seen = set()

    def add(tier, t):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[tier] += t.numel() * t.element_size()

    for tier, home in engine.weights.homes.values():
        add(tier, home)
    for tier, k, v in engine.kv.homes.values():
        add(tier, k), add(tier, v)
    for slot in engine.weights.slots:
        add(Tier.GPU, slot)
    for k, v in engine.kv.slots:
        add(Tier.GPU, k), add(Tier.GPU, v)
    for k, v in engine.kv.staging:
        add(Tier.CPU, k), add(Tier.CPU, v)
    for tier, home in zip(engine.acts.tiers, engine.acts.homes):
        add(tier, home)
    for buffers in engine.kv.scratch:
        for t in buffers:
            add(Tier.CPU, t)
    relay = engine.mover.relay
    if relay is not None:  # the disk relay's pinned ring (plus its alignment slack)
        out[Tier.CPU] += relay._arena.numel()
    return out


@pytest.mark.parametrize("percent,cpu_compute", [
    ((100, 0, 100, 0, 100, 0), False),
    ((30, 30, 34, 33, 50, 0), False),
    ((20, 80, 0, 100, 0, 100), True),
    ((0, 0, 0, 0, 0, 0), False),
])
def test_predicted_bytes_match_allocation(tmp_path, percent, cpu_compute):
    policy = Policy.from_percent(percent, gpu_batch_size=3, num_gpu_batches=2, cpu_cache_compute=cpu_compute)
    engine = Engine(TINY, policy, Workload(16, 8), EngineOptions(offload_dir=tmp_path, progress=False))
    try:
        plan, real, counted = engine.plan, real_bytes(engine), engine.allocated_bytes()
        for tier in Tier:
            predicted = plan.persistent_bytes(tier)
            assert real[tier] == pytest.approx(predicted, rel=0.02), tier
            assert counted[tier] == real[tier], tier
        assert engine.disk.file_bytes() == pytest.approx(plan.persistent_bytes(Tier.DISK), rel=0.02)
    finally:
        engine.close()
    assert engine.disk.file_bytes() == 0  # offload files are removed on close


def test_mixed_policy_uses_every_tier_for_every_kind(tmp_path):
    policy = Policy.from_percent((30, 30, 34, 33, 34, 33), gpu_batch_size=2, num_gpu_batches=3)
    plan = plan_memory(build_layers(TINY), policy, Workload(16, 8), torch.float32, TINY.hidden_size)
    assert all(plan.tiers[t].weights > 0 for t in Tier)
    assert set(plan.kv_tiers.values()) == set(Tier)
    assert set(plan.act_tiers) == set(Tier)


def test_weight_percentages_hold_for_a_real_size():
    cfg = OPT_CONFIGS["opt-30b"]
    policy = Policy.from_percent((20, 80, 0, 100, 0, 100), gpu_batch_size=24, num_gpu_batches=2,
                                 cpu_cache_compute=True)
    plan = plan_memory(build_layers(cfg), policy, Workload(512, 32), torch.float16, cfg.hidden_size)
    share = plan.tiers[Tier.GPU].weights / plan.model_bytes
    assert share == pytest.approx(0.20, abs=0.01)
    # FlexGen prints 55.803 and 33.469 (GiB, labelled GB) for this case; its cache is one token shorter
    assert plan.model_bytes / 2**30 == pytest.approx(55.8, rel=0.002)
    assert plan.cache_bytes / 2**30 == pytest.approx(33.469 * 544 / 543, rel=0.002)


@pytest.mark.parametrize("gpu,cpu", [(100, 0), (0, 100), (0, 0), (20, 80), (33, 33), (50, 25)])
def test_assign_tiers_percentages(gpu, cpu):
    g = torch.Generator().manual_seed(gpu * 100 + cpu)
    sizes = torch.randint(1, 1000, (400,), generator=g).tolist()
    tiers = assign_tiers(sizes, gpu, cpu)
    total, largest = sum(sizes), max(sizes)
    for tier, pct in ((Tier.GPU, gpu), (Tier.CPU, cpu), (Tier.DISK, 100 - gpu - cpu)):
        got = sum(s for s, t in zip(sizes, tiers) if t == tier)
        assert abs(got - total * pct / 100) <= largest
    # in layer order: the GPU's items first; then the disk's share of every prefix of the streamed
    # bytes is its share of all of them, within one item (disk reads spread over the whole step)
    on_gpu = [t == Tier.GPU for t in tiers]
    assert on_gpu == sorted(on_gpu, reverse=True)
    share = (100 - gpu - cpu) / (100 - gpu) if gpu < 100 else 0
    streamed = on_disk = 0
    for size, tier in zip(sizes, tiers):
        if tier != Tier.GPU:
            streamed += size
            on_disk += size if tier == Tier.DISK else 0
            assert abs(on_disk - share * streamed) <= largest


def test_streamed_layers_each_read_part_of_their_weights_from_disk():
    """OPT-6.7B with half its weights on disk, the rest on the CPU: every streamed layer holds
    both (FlexGen's split within each layer), so no stretch of the step leaves the disk idle."""
    layers = build_layers(OPT_CONFIGS["opt-6.7b"])
    policy = Policy.from_percent((0, 50, 100, 0, 100, 0), gpu_batch_size=32)
    plan = plan_memory(layers, policy, Workload(512, 32), torch.float16, 4096)
    # the first block's layers make up the disk's share of the embedding (one 0.4 GB item, on the CPU)
    assert sum(plan.weight_tiers[s.key] == Tier.DISK for s in layers[1].weight_specs()) > 0
    for layer in layers[3:-1]:
        tiers = {s.key: plan.weight_tiers[s.key] for s in layer.weight_specs()}
        big = [tiers[k] for k in tiers if k.endswith(("proj.weight", "fc1.weight", "fc2.weight"))]
        assert Tier.DISK in big and Tier.CPU in big, tiers


def test_policy_validation():
    from offload_engine.errors import EngineError
    with pytest.raises(EngineError, match="6 numbers"):
        Policy.from_percent([100, 0, 100])
    with pytest.raises(EngineError, match="at least 1"):
        Policy(gpu_batch_size=0)
    with pytest.raises(EngineError, match="weight-buffers"):
        Policy(weight_buffers=1)
    assert Policy.from_percent([20, 80, 0, 100, 0, 100]).uses_disk is False
    assert Policy.from_percent([20, 70, 0, 100, 0, 100]).uses_disk is True


def test_disk_writes_in_flight_are_planned_on_the_gpu():
    """A prompt's K and V written to disk wait on the compute device until the disk takes them:
    the plan counts one prompt's worth where any cache lives on disk, one gpu batch's hidden
    states where activations do (what the engine's Mover lets queue), and nothing otherwise."""
    layers = build_layers(TINY)
    work = Workload(16, 8)

    def plan(percent):
        policy = Policy.from_percent(percent, gpu_batch_size=3, num_gpu_batches=2)
        return plan_memory(layers, policy, work, torch.float32, TINY.hidden_size)

    on_cpu, kv_on_disk, act_on_disk = plan((0, 100, 0, 100, 0, 100)), plan((0, 100, 0, 50, 0, 100)), \
        plan((0, 100, 0, 100, 0, 50))
    prompt_kv = 2 * 16 * 3 * TINY.hidden_size * 4  # K and V of 16 tokens, batch 3, fp32
    hidden = 3 * 16 * TINY.hidden_size * 4
    assert on_cpu.disk_store_bytes == 0
    assert kv_on_disk.disk_store_bytes == prompt_kv
    assert act_on_disk.disk_store_bytes == hidden
    assert plan((0, 100, 0, 50, 0, 50)).disk_store_bytes == prompt_kv + hidden  # both wait at once
    assert kv_on_disk.tiers[Tier.GPU].working - on_cpu.tiers[Tier.GPU].working == prompt_kv


def test_engine_bounds_its_disk_writes_by_the_plan(tmp_path):
    policy = Policy.from_percent((0, 100, 0, 50, 0, 100), gpu_batch_size=3, num_gpu_batches=2)
    with Engine(TINY, policy, Workload(16, 8), EngineOptions(offload_dir=tmp_path, progress=False)) as engine:
        assert engine.mover.disk_store_budget == engine.plan.disk_store_bytes > 0
