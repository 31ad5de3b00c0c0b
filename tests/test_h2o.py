"""H2O heavy-hitter eviction in the engine: equal to full attention when the budget holds the
whole sequence, equal to the masked simulation when it does not, on every tier."""
from __future__ import annotations

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.errors import EngineError, format_size
from offload_engine.model_zoo import MODEL_CONFIGS
from offload_engine.sampling import GenerationConfig
from offload_engine.policies import H2OConfig, KVSettings
from offload_engine.policies.memory import Workload, plan_memory
from offload_engine.policies.placement import Policy
from offload_engine.io.tiers import Tier

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_llama, tiny_hf_opt

PROMPT, GEN = 12, 8
TIERS = {"gpu": ((100, 0, 100, 0, 100, 0), False), "cpu-attention": ((0, 100, 0, 100, 0, 100), True),
         "cpu-streamed": ((0, 100, 0, 100, 0, 100), False), "disk": ((0, 0, 0, 0, 0, 0), False),
         "mixed": ((30, 30, 34, 33, 50, 0), True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    opt = save_checkpoint(tiny_hf_opt(seed=2), tmp_path_factory.mktemp("opt"), "safetensors")
    llama = save_checkpoint(tiny_hf_llama(seed=3), tmp_path_factory.mktemp("llama"), "safetensors")
    return {"opt": opt, "llama": llama}


def generate(folder, tmp_path, tier, kv, batches=2, compress=None, collect=True, static=False, runs=1):
    """`static`: the graph-capturable decode step (captured on a GPU, run eagerly on the CPU).
    `runs` > 1 generates again from fresh prompts with the same engine; returns the last run."""
    percent, cpu_compute = TIERS[tier]
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=batches, cpu_cache_compute=cpu_compute,
                                 kv=kv, compress_cache=compress, cuda_graphs=static)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32,
                         eager_static_decode=static and not torch.cuda.is_available())
    engine = Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts)
    with engine:
        assert (engine.decode_graph is not None) == static
        for run in range(runs):
            ids, mask = random_prompts(2 * batches, PROMPT, seed=batches + 10 * run)
            result = engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=collect)
    return result, engine


def assert_same(a, b, tol=1e-5):
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.step_logits, b.step_logits):
        assert rel_err(x, y) < tol


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_budget_holding_everything_equals_full(checkpoints, tmp_path, family, tier):
    full, _ = generate(checkpoints[family], tmp_path, tier, KVSettings())
    h2o, _ = generate(checkpoints[family], tmp_path, tier,
                      KVSettings("h2o", H2OConfig(hh_size=PROMPT + GEN, recent_size=4)))
    assert_same(full, h2o)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("batches", [1, 2])
def test_real_eviction_equals_masked_simulation(checkpoints, tmp_path, family, tier, batches):
    h2o = H2OConfig(hh_size=3, recent_size=2)
    real, engine = generate(checkpoints[family], tmp_path, tier, KVSettings("h2o", h2o), batches)
    sim, _ = generate(checkpoints[family], tmp_path, tier,
                      KVSettings("h2o", H2OConfig(hh_size=3, recent_size=2, simulate=True)), batches)
    assert engine.kv.capacity == 6  # budget 5 + the incoming token's slot
    assert_same(real, sim)
    full, _ = generate(checkpoints[family], tmp_path, tier, KVSettings(), batches)
    assert not torch.equal(full.tokens, real.tokens) or rel_err(full.step_logits[-1], real.step_logits[-1]) > 1e-3


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("kind", ["h2o", "sink"])
@pytest.mark.parametrize("batches", [1, 2])
def test_captured_step_equals_masked_simulation(checkpoints, tmp_path, family, kind, batches):
    """The static decode step (device-side length, every slot attended) evicts as the eager one;
    the second generation refills the same slot tensors the first one's graph holds."""
    sizes = dict(hh_size=3, recent_size=2)
    static, _ = generate(checkpoints[family], tmp_path, "gpu", KVSettings(kind, H2OConfig(**sizes)), batches,
                         static=True, runs=2)
    sim, _ = generate(checkpoints[family], tmp_path, "gpu", KVSettings(kind, H2OConfig(**sizes, simulate=True)),
                      batches, runs=2)
    assert_same(static, sim)


def test_eviction_keeps_budget_and_recent_window(checkpoints, tmp_path):
    """Watch the slots after every eager step: never more than the budget, the recent window always
    kept. (A captured step writes the new token's slot before the host's length advances; it is
    checked against the masked simulation above.)"""
    policy = Policy(gpu_batch_size=2, kv=KVSettings("h2o", H2OConfig(hh_size=3, recent_size=2)), cuda_graphs=False)
    ids, mask = random_prompts(2, PROMPT, seed=1)
    opts = EngineOptions(checkpoint=checkpoints["opt"], offload_dir=tmp_path, progress=False, dtype=torch.float32)
    with Engine(from_hf_config(checkpoints["opt"]), policy, Workload(PROMPT, GEN), opts) as engine:
        slots = engine.kv.policy.slots
        steps = []
        original = engine.scheduler.step

        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            length = engine.kv.policy_states_length = args[1][0].length
            for state in slots.values():
                occupied = state.position >= 0
                assert int(occupied.sum(-1).max()) <= 5
                for r in range(1, 3):
                    assert bool((state.position == length - r).any(-1).all())  # the 2 most recent kept
                assert int(state.position.max()) == length - 1
            steps.append(length)
            return out

        engine.scheduler.step = step
        engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN))
    assert steps == list(range(PROMPT, PROMPT + GEN))


def test_selection_is_heavy_hitters_plus_recent():
    from offload_engine.kv.h2o import H2OKV

    policy = H2OKV(H2OConfig(hh_size=2, recent_size=2), None, None, Workload(8, 1))
    colsum = torch.tensor([[[0.5, 3.0, 0.1, 2.0, 2.0, 1.0, 9.0, 0.0]]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    assert policy.select_after_prefill(colsum, valid).tolist() == [[[1, 3, 6, 7]]]  # tie 3/4: the earlier wins
    valid[0, 1] = False  # padding is never kept
    assert policy.select_after_prefill(colsum, valid).tolist() == [[[3, 4, 6, 7]]]
    valid[0, :6] = False  # fewer valid tokens than the budget: placeholders (-1) at the end
    assert policy.select_after_prefill(colsum, valid).tolist() == [[[6, 7, -1, -1]]]


def test_memory_plan_uses_the_budget(tmp_path):
    cfg = MODEL_CONFIGS["opt-30b"]
    from offload_engine.models import build_layers

    layers, work = build_layers(cfg), Workload(512, 32)
    full = Policy(gpu_batch_size=64)
    h2o = Policy(gpu_batch_size=64, kv=KVSettings("h2o", H2OConfig(0.1, 0.1)))
    full_kv = plan_memory(layers, full, work, torch.float16, cfg.hidden_size).cache_bytes
    h2o_kv = plan_memory(layers, h2o, work, torch.float16, cfg.hidden_size).cache_bytes
    assert full_kv == 48 * 2 * 544 * 64 * 56 * 128 * 2
    slots = 51 + 51 + 1  # 10% heavy + 10% recent of 512, plus the incoming token's slot
    assert h2o_kv == 48 * (2 * slots * 64 * 56 * 128 * 2 + 64 * 56 * slots * 8)  # + float32 score, int32 position


def test_a_policy_that_fits_only_with_h2o(tmp_path):
    cfg = MODEL_CONFIGS["opt-125m"].__class__(name="small", family="opt", num_layers=2, hidden_size=64, num_heads=4,
                                              ffn_dim=128, vocab_size=100, max_positions=1024)
    from offload_engine.models import build_layers

    work, layers = Workload(512, 32), build_layers(cfg)
    full = Policy(gpu_batch_size=64)
    h2o = Policy(gpu_batch_size=64, kv=KVSettings("h2o", H2OConfig(0.1, 0.1)))
    need = [plan_memory(layers, p, work, torch.float32, 64).tiers[Tier.GPU].total for p in (full, h2o)]
    cap = (need[0] + need[1]) // 2
    # On the CPU device: the accounting is the point, and a GPU cap is process-wide (other tests' tensors count).
    # The whole prompt in one prefill chunk, as the plans above count it (smaller chunks would buy
    # room too, which is not what this test is about).
    opts = dict(offload_dir=tmp_path, progress=False, gpu_mem_bytes=cap, cpu_mem_bytes=cap, dtype=torch.float32,
                device="cpu", prefill_chunk=work.prompt_len)
    with pytest.raises(EngineError, match="GPU tier needs") as refused:
        Engine(cfg, full, work, EngineOptions(**opts))
    assert f"needs {format_size(need[0])}" in str(refused.value) and "short" in str(refused.value)
    with Engine(cfg, h2o, work, EngineOptions(**opts)) as engine:
        assert engine.plan.tiers[Tier.GPU].total == need[1] <= cap
