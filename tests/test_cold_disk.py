"""`--cold-disk`: the disk tier's files evicted from the page cache before every step
(io/page_cache.py), without changing a single result."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.io import page_cache
from offload_engine.sampling import GenerationConfig
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_opt

PROMPT, GEN = 10, 5


def test_evicting_a_written_mapping_keeps_its_bytes_and_leaves_the_page_cache(tmp_path):
    path = tmp_path / "tensor.bin"
    data = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8)
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=data.shape)
    mm[:] = data                                              # dirty pages, mapped by this process
    before = page_cache.resident_fraction(path)
    after = page_cache.evict([path], [mm.base])
    if before is None or after is None:
        pytest.skip("mincore is not available here")
    if after > 0.5:
        pytest.skip("this file system keeps its pages in memory (tmpfs)")
    assert before > 0.9 and after < 0.1
    assert np.array_equal(np.asarray(mm), data)               # the mapping reads the file again
    assert np.array_equal(np.fromfile(path, dtype=np.uint8), data)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_hf_opt(seed=5), tmp_path_factory.mktemp("opt"), "safetensors")


def run(folder, tmp_path, cold: bool):
    # weights, KV cache and activations partly on disk
    policy = Policy.from_percent((30, 30, 30, 30, 50, 20), gpu_batch_size=2, num_gpu_batches=2)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32, cold_disk=cold)
    with Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts) as engine:
        ids, mask = random_prompts(4, PROMPT, seed=3)
        result = engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)
        return result, list(engine.cold_disk_resident)


def test_cold_steps_give_the_same_tokens_and_logits(checkpoint, tmp_path):
    warm, none = run(checkpoint, tmp_path, cold=False)
    cold, resident = run(checkpoint, tmp_path, cold=True)
    assert none == []
    assert len(resident) == GEN                               # before the prefill and before each later step
    assert all(r is None or 0.0 <= r <= 1.0 for r in resident)
    assert torch.equal(warm.tokens, cold.tokens)
    for a, b in zip(warm.step_logits, cold.step_logits):
        assert rel_err(a, b) < 1e-6


def test_the_eviction_itself_is_left_out_of_the_timings(checkpoint, tmp_path, monkeypatch):
    from offload_engine.io.tiers import DiskStorage

    pause = 0.4

    def slow_evict(self):
        time.sleep(pause)
        return 0.0

    monkeypatch.setattr(DiskStorage, "evict_page_cache", slow_evict)
    result, resident = run(checkpoint, tmp_path, cold=True)
    assert resident == [0.0] * GEN
    assert result.prefill_s < pause and result.decode_s < (GEN - 1) * pause
