"""Chunked prefill: the prompt goes through each layer a chunk at a time, each chunk attending the
cache of the chunks before it. It must give what the whole prompt at once gives: logits, greedy
tokens, the cache's contents and H2O's accumulated scores, for OPT and Llama, every KV policy and
the tiers each policy keeps its cache on, with left padding, for chunks that do and do not divide
the prompt."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.policies import H2OConfig, HiPConfig, KVSettings
from offload_engine.policies.memory import Workload, plan_memory
from offload_engine.policies.placement import Policy
from offload_engine.sampling import GenerationConfig

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_llama, tiny_hf_opt

PROMPT, GEN = 40, 3
POLICIES = {
    "full": KVSettings(),
    "h2o": KVSettings("h2o", H2OConfig(hh_size=10, recent_size=6)),
    "sink": KVSettings("sink", H2OConfig(hh_size=4, recent_size=8)),
    "hip": KVSettings("hip", hip=HiPConfig(k=8, block_size_q=8, block_size_k=2, sink=2, window=8)),
}
# (percent, --cpu-cache-compute): the cache on the GPU, on the CPU attended there, on disk
TIERS = {"gpu": ((100, 0, 100, 0, 100, 0), False), "cpu-attention": ((0, 100, 0, 100, 0, 100), True),
         "disk": ((0, 100, 0, 0, 100, 0), False)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"opt": save_checkpoint(tiny_hf_opt(seed=21), tmp_path_factory.mktemp("opt"), "safetensors"),
            "llama": save_checkpoint(tiny_hf_llama(seed=22), tmp_path_factory.mktemp("llama"), "safetensors")}


def run(folder, tmp_path, kv: KVSettings, tier: str, chunk: int | None):
    """Greedy generation; returns the result, the cache of every item and H2O's slot state."""
    percent, cpu_compute = TIERS[tier]
    policy = Policy.from_percent(percent, gpu_batch_size=3, num_gpu_batches=1, cpu_cache_compute=cpu_compute, kv=kv)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32,
                         prefill_chunk=chunk)
    ids, mask = random_prompts(3, PROMPT, seed=4)
    with Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts) as engine:
        assert engine.scheduler.prefill_chunk == chunk
        result = engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)
        for item in engine.kv.homes:
            engine.kv.wait_stores(item)
        written = PROMPT + GEN - 1  # the last token is never fed back; slots beyond hold anything
        caches = {item: tuple((x[:, :, :written] if engine.kv.head_major[item] else x[:written]).cpu().clone()
                              for x in (k, v)) for item, (_, k, v) in engine.kv.homes.items()}
        slots = {item: (s.position.cpu().clone(), s.score.cpu().clone())
                 for item, s in getattr(engine.kv.policy, "slots", {}).items()}
    return result, caches, slots, mask.bool()


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("tier", list(TIERS))
def test_chunked_prefill_equals_the_whole_prompt(checkpoints, tmp_path, family, policy, tier):
    kv = POLICIES[policy]
    whole, caches, slots, valid = run(checkpoints[family], tmp_path, kv, tier, None)
    for chunk in (16, 24):  # 16 + 16 + 8 and 24 + 16
        part, part_caches, part_slots, _ = run(checkpoints[family], tmp_path, kv, tier, chunk)
        assert torch.equal(part.tokens, whole.tokens)
        assert rel_err(part.prompt_logits[valid], whole.prompt_logits[valid]) < 1e-5
        for a, b in zip(part.step_logits, whole.step_logits):
            assert rel_err(a, b) < 1e-5
        for item, (k, v) in caches.items():
            assert rel_err(part_caches[item][0], k) < 1e-5 and rel_err(part_caches[item][1], v) < 1e-5
        for item, (position, score) in slots.items():  # H2O: the same tokens kept, the same scores
            assert torch.equal(part_slots[item][0], position)
            assert rel_err(part_slots[item][1], score) < 1e-5


def test_the_plan_counts_chunks_and_picks_one_when_the_whole_prompt_does_not_fit(checkpoints, tmp_path):
    """Chunks shrink the prefill's working memory and, with the cache off the GPU, add a GPU
    buffer of the prompt; under a GPU cap that only chunks meet, the engine plans with chunks."""
    from offload_engine.io.tiers import Tier
    from offload_engine.models import build_layers
    cfg = from_hf_config(checkpoints["llama"])
    policy = Policy.from_percent((100, 0, 0, 100, 100, 0), gpu_batch_size=2)
    work = Workload(2048, 4)

    def plan(chunk, prompt=2048):
        return plan_memory(build_layers(cfg), policy, Workload(prompt, 4), torch.float32, cfg.hidden_size,
                           prefill_chunk=chunk)

    whole, chunked = plan(None), plan(256)
    buffer = 2 * 2048 * 2 * cfg.kv_heads * cfg.head_dim * 4
    assert chunked.prefill_chunk == 256 and chunked.prefill_buffer_tokens == 2048 and whole.prefill_buffer_tokens == 0
    assert chunked.tiers[Tier.GPU].buffers - whole.tiers[Tier.GPU].buffers == buffer
    # working memory: chunks grow only by the hidden states of the longer prompt
    growth = {chunk: plan(chunk, 8192).tiers[Tier.GPU].working - plan(chunk).tiers[Tier.GPU].working
              for chunk in (None, 256)}
    assert growth[256] < growth[None] / 10
    cap = (chunked.tiers[Tier.GPU].total + whole.tiers[Tier.GPU].total) // 2
    # The planner's choice is what is tested: on the CPU, where a cap of a few MiB is not also
    # the CUDA allocator's limit for the dummy weights' initialisation.
    opts = EngineOptions(offload_dir=tmp_path, progress=False, dtype=torch.float32, gpu_mem_bytes=cap, device="cpu")
    with Engine(replace(cfg, max_positions=4096), policy, work, opts) as engine:  # dummy weights
        assert engine.scheduler.prefill_chunk is not None and engine.scheduler.prefill_chunk >= 256
        assert engine.plan.tiers[Tier.GPU].total <= cap
