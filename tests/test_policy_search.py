"""The cost model and the policy search: memory equal to what the engine allocates, times that move
the right way, and searched policies the engine accepts."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from offload_engine.engine import Engine, EngineOptions
from offload_engine.io.tiers import Tier
from offload_engine.model_zoo import MODEL_CONFIGS
from offload_engine.policies import Compression, H2OConfig, HiPConfig, KVSettings
from offload_engine.policies.cost_model import estimate
from offload_engine.policies.hardware import HardwareProfile
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy
from offload_engine.policies.search import SearchSpace, command_line, search

GB = 1e9
TINY = MODEL_CONFIGS["opt-125m"].__class__(name="tiny", family="opt", num_layers=4, hidden_size=64, num_heads=4,
                                           ffn_dim=256, vocab_size=500, max_positions=128)
H100 = HardwareProfile(name="h100-like", gpu_mem_bytes=16 << 30, cpu_mem_bytes=120 << 30, disk_free_bytes=60 << 30,
                       h2d_bytes_s=54.5 * GB, d2h_bytes_s=54.6 * GB, disk_read_bytes_s=1.3 * GB,
                       disk_write_bytes_s=0.6 * GB, gpu_mem_bytes_s=3000 * GB, gpu_flops=600e12,
                       gpu_attention_bytes_s=1700 * GB, cpu_attention_bytes_s=60 * GB, cpu_mem_bytes_s=74 * GB)


@pytest.mark.parametrize("percent,cpu_attention", [((100, 0, 100, 0, 100, 0), False), ((30, 30, 34, 33, 50, 0), False),
                                                   ((20, 80, 0, 100, 0, 100), True), ((0, 0, 0, 0, 0, 0), False)])
def test_predicted_memory_is_what_the_engine_allocates(tmp_path, percent, cpu_attention):
    policy = Policy.from_percent(percent, gpu_batch_size=3, num_gpu_batches=2, cpu_cache_compute=cpu_attention)
    work = Workload(16, 8)
    with Engine(TINY, policy, work, EngineOptions(offload_dir=tmp_path, progress=False)) as engine:
        allocated = engine.allocated_bytes()
        est = estimate(TINY, policy, work, H100, engine.dtype)  # the default relay ring, as the engine's
        for tier in Tier:
            assert est.persistent[tier] == pytest.approx(allocated[tier], rel=0.02), tier


def opt30b(**kw) -> Policy:
    return Policy(gpu_batch_size=24, num_gpu_batches=2, **kw)


def test_times_move_the_right_way():
    model, work = MODEL_CONFIGS["opt-30b"], Workload(512, 32)

    def parts(percent, **kw):
        return estimate(model, replace(Policy.from_percent(percent, gpu_batch_size=24, num_gpu_batches=2), **kw),
                        work, H100).parts

    # more weights off the GPU, or on disk instead of the CPU, never loads faster
    io = [parts(p)["weight_io"] for p in ((40, 60, 0, 100, 0, 100), (20, 80, 0, 100, 0, 100), (20, 40, 0, 100, 0, 100),
                                          (0, 0, 0, 100, 0, 100))]
    assert io == sorted(io) and io[0] < io[-1]
    # a cache on disk streams slower than one on the CPU; CPU attention moves no cache over PCIe
    assert parts((20, 80, 0, 50, 0, 100))["kv_io"] > parts((20, 80, 0, 100, 0, 100))["kv_io"] > 0
    assert parts((20, 80, 0, 100, 0, 100), cpu_cache_compute=True)["kv_io"] == 0
    # H2O reads less cache; compression moves fewer bytes
    full = estimate(model, opt30b(cpu_cache_compute=True, weight_gpu_percent=20, weight_cpu_percent=80,
                                  cache_gpu_percent=0, cache_cpu_percent=100), work, H100)
    h2o = estimate(model, replace(full.policy, kv=KVSettings("h2o", H2OConfig(0.1, 0.1))), work, H100)
    assert h2o.parts["cpu_attention"] < full.parts["cpu_attention"] and h2o.memory[Tier.CPU] < full.memory[Tier.CPU]
    packed = estimate(model, replace(full.policy, compress_weight=Compression()), work, H100)
    assert packed.parts["weight_io"] < 0.3 * full.parts["weight_io"]
    # a bigger batch takes longer per step but gives more tokens per second here
    small, big = (estimate(model, replace(full.policy, gpu_batch_size=b), work, H100) for b in (8, 24))
    assert big.step_s >= small.step_s and big.throughput > small.throughput


def test_search_returns_policies_the_engine_accepts(tmp_path):
    cap = 72 << 20  # the plan reserves 64 MiB of library workspace on the GPU
    hw = replace(H100, gpu_mem_bytes=cap, cpu_mem_bytes=cap, disk_free_bytes=1 << 30)
    work = Workload(32, 8)
    space = SearchSpace(gpu_batch_sizes=(1, 2, 4, 8, 16), num_gpu_batches=(1, 2, 4))
    found = search(TINY, work, hw, space, top=4, dtype=torch.float32)
    assert found
    for est in found:
        opts = EngineOptions(offload_dir=tmp_path, progress=False, dtype=torch.float32, device="cpu",
                             gpu_mem_bytes=hw.gpu_mem_bytes, cpu_mem_bytes=hw.cpu_mem_bytes)
        with Engine(TINY, est.policy, work, opts):
            pass  # accepted: the plan fits the caps the search was given
        assert command_line("tiny", work, est).startswith("offload-engine run --model tiny --prompt-len 32")
    assert [e.throughput for e in found] == sorted((e.throughput for e in found), reverse=True)


def test_host_memory_term_between_perfect_overlap_and_taking_turns():
    """CPU attention reading A bytes and DMA copying D bytes of host memory at once: with no
    slowdown side by side the step takes the longer of the two; when each runs at a fraction of
    its rate and the fractions sum to one, no better than one after the other; in between, in
    between (each bound by its own rates, whichever finishes first)."""
    model, work = MODEL_CONFIGS["opt-30b"], Workload(512, 32)
    policy = opt30b(cpu_cache_compute=True, weight_gpu_percent=20, weight_cpu_percent=80, cache_gpu_percent=0,
                    cache_cpu_percent=100)
    a, d = H100.cpu_attention_bytes_s, H100.h2d_bytes_s
    alone = estimate(model, policy, work, H100)
    attended, copied = alone.parts["cpu_attention"] * a, alone.parts["weight_io"] * d
    assert attended > 0 and copied > 0

    def host_s(a2, d2):
        return estimate(model, policy, work, replace(H100, cpu_attention_dma_bytes_s=a2,
                                                     h2d_cpu_attention_bytes_s=d2)).parts["host_memory"]

    assert host_s(a, d) == pytest.approx(max(attended / a, copied / d), rel=1e-9)
    assert host_s(0.4 * a, 0.6 * d) == pytest.approx(attended / a + copied / d, rel=1e-9)
    between = host_s(0.6 * a, 0.7 * d)
    assert max(attended / a, copied / d) < between < attended / a + copied / d
    # by hand, the CPU attention side finishing first at 0.6 a while DMA runs at 0.7 d:
    first = attended / (0.6 * a)
    assert first * 0.7 * d < copied
    assert between == pytest.approx(first + (copied - first * 0.7 * d) / d, rel=1e-9)


@pytest.mark.parametrize("hw", [H100, replace(H100, cpu_attention_dma_bytes_s=35 * GB, h2d_cpu_attention_bytes_s=38 * GB)],
                         ids=["one-read-stream", "measured-side-by-side"])
def test_search_is_at_least_as_good_as_any_grid_point(hw):
    """Under its own cost model, the LP-placed best beats every policy of a hand grid."""
    model, work = MODEL_CONFIGS["opt-30b"], Workload(512, 32)
    best = search(model, work, hw, SearchSpace(gpu_batch_sizes=(8, 16, 24, 32, 48), num_gpu_batches=(1, 2, 3)),
                  top=1)[0]
    grid = [Policy.from_percent((g, 100 - g, c, 100 - c, 0, 100), gpu_batch_size=b, num_gpu_batches=k,
                                cpu_cache_compute=att)
            for g in (0, 10, 20) for c in (0, 50) for b in (8, 16, 24, 32, 48) for k in (1, 2, 3) for att in (False, True)]
    feasible = [e for e in (estimate(model, p, work, hw) for p in grid)
                if all(e.memory[t] <= cap for t, cap in ((Tier.GPU, hw.gpu_mem_bytes), (Tier.CPU, hw.cpu_mem_bytes)))]
    assert feasible and best.throughput >= max(e.throughput for e in feasible) * 0.99


def test_latency_objective_prefers_smaller_batches():
    model, work = MODEL_CONFIGS["opt-6.7b"], Workload(512, 32)
    space = SearchSpace(gpu_batch_sizes=(1, 8, 32), num_gpu_batches=(1,))
    fast = search(model, work, H100, space, objective="latency", top=1)[0]
    many = search(model, work, H100, space, objective="throughput", top=1)[0]
    assert fast.total_s <= many.total_s and many.throughput >= fast.throughput
    with pytest.raises(ValueError, match="objective"):
        search(model, work, H100, space, objective="speed")


def test_weights_and_cache_share_the_disk_and_the_link():
    """Streams run side by side but cross the same resources: the disk's time is the weights' and
    the cache's disk bytes together, and the link carries every streamed byte."""
    model, work = MODEL_CONFIGS["opt-30b"], Workload(512, 32)

    def est(percent):
        return estimate(model, Policy.from_percent(percent, gpu_batch_size=24, num_gpu_batches=2), work, H100)

    weights_only, cache_only, both = est((10, 80, 0, 100, 0, 100)), est((10, 90, 0, 80, 0, 100)), \
        est((10, 80, 0, 80, 0, 100))
    assert weights_only.parts["disk"] > 0 and cache_only.parts["disk"] > 0
    assert both.parts["disk"] == pytest.approx(weights_only.parts["disk"] + cache_only.parts["disk"], rel=1e-9)
    assert both.parts["disk"] > max(both.parts["weight_io"], both.parts["kv_io"])
    nothing = est((10, 90, 0, 100, 0, 100))  # the same bytes over PCIe, none from disk
    assert both.parts["link"] == pytest.approx(nothing.parts["link"], rel=1e-9) and nothing.parts["disk"] == 0
    assert both.step_s >= both.parts["disk"] and both.step_s > nothing.step_s


def test_cpu_attention_over_a_packed_cache_costs_its_measured_rate():
    """A 4-bit cache attended on the CPU is read at the profile's packed rate (fp16 bytes/s, so a
    packed byte stands for 2 / (bits/8 + headers) fp16 bytes); unmeasured, an element costs what an
    fp16 element does, whatever the packing saves in bytes."""
    model, work = MODEL_CONFIGS["opt-30b"], Workload(512, 32)
    policy = Policy.from_percent((20, 80, 0, 100, 0, 100), gpu_batch_size=24, num_gpu_batches=2,
                                 cpu_cache_compute=True)
    dense = estimate(model, policy, work, H100).parts["cpu_attention"]
    packed_policy = replace(policy, compress_cache=Compression())
    unmeasured = estimate(model, packed_policy, work, replace(H100, cpu_packed_attention_bytes_s=0.0))
    assert unmeasured.parts["cpu_attention"] == pytest.approx(dense)
    slow = replace(H100, cpu_packed_attention_bytes_s=H100.cpu_attention_bytes_s / 4)
    measured = estimate(model, packed_policy, work, slow)
    assert measured.parts["cpu_attention"] == pytest.approx(4 * dense)
    assert measured.parts["layer_by_layer"] > unmeasured.parts["layer_by_layer"]
    assert measured.throughput < unmeasured.throughput


def test_cpu_attention_round_trips_are_charged_per_attended_item():
    """Each (attention layer, GPU batch) attended on the CPU costs the profile's measured round
    trip once, in the compute term and in the layer-by-layer bound; a cache on the GPU none."""
    model, work = MODEL_CONFIGS["opt-30b"], Workload(512, 32)
    policy = Policy.from_percent((20, 80, 0, 100, 0, 100), gpu_batch_size=12, num_gpu_batches=8,
                                 cpu_cache_compute=True)
    call = 1e-3
    base, charged = (estimate(model, policy, work, replace(H100, cpu_attention_call_s=c)) for c in (0.0, call))
    items = model.num_layers * policy.num_gpu_batches
    assert charged.parts["cpu_attention"] - base.parts["cpu_attention"] == pytest.approx(items * call)
    assert charged.parts["layer_by_layer"] - base.parts["layer_by_layer"] == pytest.approx(items * call)
    on_gpu = replace(policy, cpu_cache_compute=False)
    a, b = (estimate(model, on_gpu, work, replace(H100, cpu_attention_call_s=c)) for c in (0.0, call))
    assert a.parts == b.parts


def test_cpu_attention_follows_the_copies_in_the_step_and_the_cache_leaves_before_prefill_ends():
    """Measured on OPT-30B: a step with CPU attention takes the weight copies plus the attention
    (both read host memory), and a prefill its compute plus the cache's way to head-major homes."""
    model, work = MODEL_CONFIGS["opt-30b"], Workload(512, 32)
    on_cpu = Policy.from_percent((20, 80, 0, 100, 0, 100), gpu_batch_size=24, num_gpu_batches=2,
                                 cpu_cache_compute=True)
    e = estimate(model, on_cpu, work, H100)
    assert e.parts["layer_by_layer"] >= e.parts["weight_io"] + e.parts["cpu_attention"]
    assert e.step_s >= e.parts["weight_io"] + e.parts["cpu_attention"] > max(e.parts["link"], e.parts["compute"])
    streamed = estimate(model, replace(on_cpu, cpu_cache_compute=False), work, H100)
    kv_prompt = 2 * 512 * 48 * model.num_layers * model.hidden_size * 2  # K and V, fp16, 48 sequences
    out = kv_prompt * (1 / H100.d2h_bytes_s + 1 / H100.cpu_mem_bytes_s)
    assert e.prefill_s == pytest.approx(streamed.prefill_s + out, rel=1e-6)


@pytest.mark.parametrize("kv,captured", [(KVSettings(), True), (KVSettings("h2o"), True),
                                         (KVSettings("h2o", H2OConfig(simulate=True)), False),
                                         (KVSettings("hip"), True),
                                         (KVSettings("hip", hip=HiPConfig(exact=True)), False)])
def test_launch_overhead_only_where_the_engine_runs_the_step_eagerly(tmp_path, kv, captured):
    """The cost model charges per-layer launch overhead exactly where the engine refuses to capture."""
    model, work = MODEL_CONFIGS["opt-6.7b"], Workload(512, 32)
    policy = Policy(gpu_batch_size=8, kv=kv)
    hw = replace(H100, gpu_mem_bytes=80 << 30, layer_overhead_s=2e-4)
    assert (estimate(model, policy, work, hw).parts["launch"] == 0) == captured
    from offload_engine.decode_graph import graphs_apply
    opts = EngineOptions(checkpoint=None, offload_dir=tmp_path, progress=False, device="cpu")
    with Engine(TINY, replace(policy, gpu_batch_size=2), Workload(16, 4), opts) as engine:
        plan = engine.plan
    assert (graphs_apply(policy, plan, torch.device("cuda"), profiling=False) is None) == captured
