"""HiP in the engine: equal to full attention when k covers everything, a real sparse selection
otherwise, on every tier; selections reused between refreshes."""
from __future__ import annotations

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.kv.hip import merge_blocks
from offload_engine.sampling import GenerationConfig
from policies import HiPConfig, KVSettings
from policies.memory import Workload
from policies.placement import Policy

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_llama, tiny_hf_opt

PROMPT, GEN = 40, 10
TIERS = {"gpu": ((100, 0, 100, 0, 100, 0), False), "cpu-attention": ((0, 100, 0, 100, 0, 100), True),
         "cpu-streamed": ((0, 100, 0, 100, 0, 100), False), "disk": ((0, 0, 0, 0, 0, 0), False)}
SMALL = dict(block_size_q=8, block_size_k=2, sink=2, window=8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"opt": save_checkpoint(tiny_hf_opt(seed=6), tmp_path_factory.mktemp("opt"), "safetensors"),
            "llama": save_checkpoint(tiny_hf_llama(seed=7), tmp_path_factory.mktemp("llama"), "safetensors")}


def generate(folder, tmp_path, tier, kv, engine_out=None):
    percent, cpu_compute = TIERS[tier]
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, cpu_cache_compute=cpu_compute, kv=kv)
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
    generate(checkpoints["opt"], tmp_path, "gpu", KVSettings("hip", hip=HiPConfig(k=8, refresh=4, **SMALL)), policies)
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
