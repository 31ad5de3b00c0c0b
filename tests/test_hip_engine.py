"""HiP in the engine: equal to full attention when k covers everything, a real sparse selection
otherwise, on every tier; selections reused between refreshes."""
from __future__ import annotations

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.kv.hip import merge_blocks
from offload_engine.sampling import GenerationConfig
from offload_engine.policies import HiPConfig, KVSettings
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_llama, tiny_hf_opt

PROMPT, GEN = 40, 10
TIERS = {"gpu": ((100, 0, 100, 0, 100, 0), False), "cpu-attention": ((0, 100, 0, 100, 0, 100), True),
         "cpu-streamed": ((0, 100, 0, 100, 0, 100), False), "disk": ((0, 0, 0, 0, 0, 0), False)}
SMALL = dict(block_size_q=8, block_size_k=2, sink=2, window=8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"opt": save_checkpoint(tiny_hf_opt(seed=6), tmp_path_factory.mktemp("opt"), "safetensors"),
            "llama": save_checkpoint(tiny_hf_llama(seed=7), tmp_path_factory.mktemp("llama"), "safetensors")}


def generate(folder, tmp_path, tier, kv, engine_out=None, cuda_graphs=True):
    percent, cpu_compute = TIERS[tier]
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, cpu_cache_compute=cpu_compute, kv=kv,
                                 cuda_graphs=cuda_graphs)
    ids, mask = random_prompts(4, PROMPT, seed=3)
    cfg = from_hf_config(folder)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    with Engine(cfg, policy, Workload(PROMPT, GEN), opts) as engine:
        result = engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)
        if engine_out is not None:
            engine_out.append(engine.kv.policy)
    return result


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_k_covering_everything_equals_full(checkpoints, tmp_path, family, tier):
    full = generate(checkpoints[family], tmp_path, tier, KVSettings())
    hip = generate(checkpoints[family], tmp_path, tier, KVSettings("hip", hip=HiPConfig(k=64, **SMALL)))
    assert torch.equal(full.tokens, hip.tokens)
    valid = random_prompts(4, PROMPT, seed=3)[1].bool()
    assert rel_err(hip.prompt_logits[valid], full.prompt_logits[valid]) < 1e-5
    for a, b in zip(hip.step_logits, full.step_logits):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_sparse_selection_is_the_same_on_every_tier(checkpoints, tmp_path, family):
    """k smaller than the context: a real selection, and every tier computes the same thing."""
    kv = KVSettings("hip", hip=HiPConfig(k=8, refresh=3, **SMALL))
    results = {tier: generate(checkpoints[family], tmp_path, tier, kv) for tier in TIERS}
    full = generate(checkpoints[family], tmp_path, "gpu", KVSettings())
    for tier, result in results.items():
        assert torch.equal(result.tokens, results["gpu"].tokens), tier
        for a, b in zip(result.step_logits, results["gpu"].step_logits):
            assert rel_err(a, b) < 1e-5, tier
    valid = random_prompts(4, PROMPT, seed=3)[1].bool()
    assert rel_err(results["gpu"].prompt_logits[valid], full.prompt_logits[valid]) > 1e-3  # it really is sparse


def test_selection_is_reused_between_refreshes(checkpoints, tmp_path):
    policies = []
    # The eager step's record of its selections (a captured step keeps them in fixed buffers:
    # tests/test_hip_static.py).
    generate(checkpoints["opt"], tmp_path, "gpu", KVSettings("hip", hip=HiPConfig(k=8, refresh=4, **SMALL)), policies,
             cuda_graphs=False)
    lengths = {sel.length for sel in policies[0].selections.values()}
    assert lengths == {PROMPT + 8}  # selected at steps 1, 5 and 9 after the prompt: the last at length 48


def test_dense_layers_and_exact_selection(checkpoints, tmp_path):
    dense_all = generate(checkpoints["opt"], tmp_path, "gpu",
                         KVSettings("hip", hip=HiPConfig(k=8, dense_layers=3, **SMALL)))  # the tiny OPT has 3 layers
    full = generate(checkpoints["opt"], tmp_path, "gpu", KVSettings())
    assert torch.equal(dense_all.tokens, full.tokens)
    exact = generate(checkpoints["opt"], tmp_path, "gpu", KVSettings("hip", hip=HiPConfig(k=64, exact=True, **SMALL)))
    assert torch.equal(exact.tokens, full.tokens)


def test_merge_blocks():
    a = torch.tensor([[[[0, 3, 5, -1, -1]]]], dtype=torch.int32)
    b = torch.tensor([5, 6, 7], dtype=torch.int32)
    assert merge_blocks(a, b).tolist() == [[[[0, 3, 5, 6, 7, -1, -1, -1]]]]


def test_hot_cache_with_evictions_equals_the_gpu_resident_cache(checkpoints, tmp_path):
    """A hot cache at its smallest (one step's working set) evicts and refetches blocks; the
    result is still the one computed with the whole cache on the GPU."""
    base = dict(k=8, refresh=3, **SMALL)
    smallest = HiPConfig(**base).working_set_blocks(group=1) * 2  # tokens; OPT: one query head per KV head
    gpu = generate(checkpoints["opt"], tmp_path, "gpu", KVSettings("hip", hip=HiPConfig(**base)))
    policies = []
    hot = generate(checkpoints["opt"], tmp_path, "cpu-streamed",
                   KVSettings("hip", hip=HiPConfig(**base, gpu_cache_tokens=smallest)), policies)
    assert torch.equal(hot.tokens, gpu.tokens)
    for a, b in zip(hot.step_logits, gpu.step_logits):
        assert rel_err(a, b) < 1e-5
    caches = list(policies[0].hot.values())
    blocks = -(-(PROMPT + GEN) // 2)
    assert caches and all(c.capacity == smallest // 2 < blocks for c in caches)  # a real bound, below the cache
    assert all(int((c.block_of[..., :c.capacity] >= 0).sum(-1).max()) <= c.capacity for c in caches)
    assert 0 < policies[0].hit_rate() < 1  # blocks were missed and fetched, others hit


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("tier", ["cpu-streamed", "disk"])
def test_a_4bit_home_equals_dense_attention_over_the_same_4bit_cache(checkpoints, tmp_path, family, tier):
    """HiP over a 4-bit host or disk cache, k covering everything: the hot cache holds the blocks
    as the home stores them (dequantized on arrival, the new token as stored), so it equals full
    attention over the same 4-bit cache; and the 4-bit cache really differs from 16 bits."""
    from offload_engine.policies import Compression

    def run(kv):
        percent, _ = TIERS[tier]
        policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, kv=kv,
                                     compress_cache=Compression(4, 8))
        ids, mask = random_prompts(4, PROMPT, seed=3)
        opts = EngineOptions(checkpoint=checkpoints[family], offload_dir=tmp_path, progress=False, dtype=torch.float32)
        with Engine(from_hf_config(checkpoints[family]), policy, Workload(PROMPT, GEN), opts) as engine:
            return engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)

    hip, dense = run(KVSettings("hip", hip=HiPConfig(k=64, **SMALL))), run(KVSettings())
    assert torch.equal(hip.tokens, dense.tokens)
    # Compiled, the two sides are different fp32 kernels (the packed-cache kernel against the hot
    # pool's block-sparse one) whose reduction orders differ: 2-4e-5 on an H100, 1e-6 interpreted.
    tolerance = 1e-4 if torch.cuda.is_available() else 1e-5
    for a, b in zip(hip.step_logits[1:], dense.step_logits[1:]):
        assert rel_err(a, b) < tolerance
    plain = generate(checkpoints[family], tmp_path, tier, KVSettings("hip", hip=HiPConfig(k=64, **SMALL)))
    assert rel_err(hip.step_logits[-1], plain.step_logits[-1]) > 1e-3


def test_a_4bit_cache_on_the_gpu_is_refused_with_hip(checkpoints, tmp_path):
    from offload_engine.errors import EngineError
    from offload_engine.policies import Compression

    policy = Policy(gpu_batch_size=2, kv=KVSettings("hip", hip=HiPConfig(k=8, **SMALL)), compress_cache=Compression())
    opts = EngineOptions(checkpoint=checkpoints["opt"], offload_dir=tmp_path, progress=False, dtype=torch.float32)
    with pytest.raises(EngineError, match="3rd --percent value 0"):
        Engine(from_hf_config(checkpoints["opt"]), policy, Workload(PROMPT, GEN), opts)


def test_hot_cache_too_small_is_refused(tmp_path):
    from offload_engine.errors import EngineError

    with pytest.raises(EngineError, match="below one step's working set"):
        HiPConfig(k=8, gpu_cache_tokens=4, **SMALL).hot_blocks(group=1, max_len=1000)


def test_plan_counts_the_hot_cache_not_the_whole_cache():
    from offload_engine.model_zoo import MODEL_CONFIGS
    from offload_engine.models import build_layers
    from offload_engine.io.tiers import Tier
    from offload_engine.policies.memory import plan_memory

    cfg = MODEL_CONFIGS["llama-3.1-8b"]
    layers, work = build_layers(cfg), Workload(32768, 32)
    on_cpu = (100, 0, 0, 100, 100, 0)
    dense = plan_memory(layers, Policy.from_percent((100, 0, 100, 0, 100, 0), gpu_batch_size=1), work,
                        torch.float16, cfg.hidden_size)
    hip = plan_memory(layers, Policy.from_percent(on_cpu, gpu_batch_size=1, kv=KVSettings("hip")), work,
                      torch.float16, cfg.hidden_size)
    cache = dense.tiers[Tier.GPU].kv_cache  # 32 layers x 2 x 32800 tokens x 8 heads x 128 x 2 bytes
    assert cache == 32 * 2 * 32800 * 8 * 128 * 2
    assert hip.tiers[Tier.CPU].kv_cache == cache  # the whole cache at home
    hot = hip.tiers[Tier.GPU].hot_cache
    # block-start keys (1/4) + hot blocks, nothing streamed
    assert hip.tiers[Tier.GPU].kv_cache == 0 and 0 < hot < 0.5 * cache and hip.kv_slots == 0
