"""HiP's captured decode step (kv/hip_static.py): run eagerly here (captured on a GPU), it gives
what the eager HiP step gives, with the cache on the GPU and in host memory (16- and 4-bit),
over several refreshes, for OPT and a grouped-query Llama with left padding."""
from __future__ import annotations

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.policies import Compression, HiPConfig, KVSettings
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy
from offload_engine.sampling import GenerationConfig

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_llama, tiny_hf_opt

PROMPT, GEN = 40, 11  # 10 decode steps: refreshes at the 1st, 4th, 7th and 10th
ON_GPU = torch.cuda.is_available()
HIP = KVSettings("hip", hip=HiPConfig(k=8, refresh=3, block_size_q=8, block_size_k=2, sink=2, window=8))
PLACES = {"gpu": (100, 0, 100, 0, 100, 0), "host": (100, 0, 0, 100, 100, 0)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"opt": save_checkpoint(tiny_hf_opt(seed=31), tmp_path_factory.mktemp("opt"), "safetensors"),
            "llama": save_checkpoint(tiny_hf_llama(seed=32), tmp_path_factory.mktemp("llama"), "safetensors")}


def generate(folder, tmp_path, place: str, static: bool, compress=None, kv=HIP):
    policy = Policy.from_percent(PLACES[place], gpu_batch_size=3, kv=kv, cuda_graphs=static, compress_cache=compress)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32,
                         eager_static_decode=static and not ON_GPU)
    with Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts) as engine:
        assert (engine.decode_graph is not None) == static, engine.graph_refusal
        runs = [engine.generate(*random_prompts(3, PROMPT, seed=seed), GenerationConfig(max_new_tokens=GEN),
                                collect_logits=True) for seed in (5, 6)]  # a second prompt reuses the buffers
    return runs


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("place,compress", [("gpu", None), ("host", None), ("host", Compression(4, 8))])
def test_static_hip_step_equals_the_eager_one(checkpoints, tmp_path, family, place, compress):
    eager = generate(checkpoints[family], tmp_path, place, False, compress)
    static = generate(checkpoints[family], tmp_path, place, True, compress)
    for a, b in zip(static, eager):
        assert torch.equal(a.tokens, b.tokens)
        for x, y in zip(a.step_logits, b.step_logits):
            assert rel_err(x, y) < 1e-5


def test_static_dense_layers_attend_everything(checkpoints, tmp_path):
    """HiP's first layers attending densely (`dense_layers`) do so in a captured step too."""
    from dataclasses import replace

    kv = replace(HIP, hip=replace(HIP.hip, dense_layers=2))
    static, eager = (generate(checkpoints["llama"], tmp_path, "gpu", s, kv=kv) for s in (True, False))
    sparse = generate(checkpoints["llama"], tmp_path, "gpu", True)
    for a, b, c in zip(static, eager, sparse):
        assert torch.equal(a.tokens, b.tokens)
        for x, y in zip(a.step_logits, b.step_logits):
            assert rel_err(x, y) < 1e-5
        assert rel_err(a.step_logits[-1], c.step_logits[-1]) > 1e-4  # the dense layers changed the result


def test_graphs_refused_where_hip_reads_the_cache_on_the_cpu_or_disk(checkpoints, tmp_path):
    for percent, cpu_compute, reason in (((100, 0, 0, 100, 100, 0), True, "leaves the GPU"),
                                         ((100, 0, 0, 0, 100, 0), False, "leaves the GPU")):
        policy = Policy.from_percent(percent, gpu_batch_size=2, kv=HIP, cpu_cache_compute=cpu_compute)
        opts = EngineOptions(checkpoint=checkpoints["opt"], offload_dir=tmp_path, progress=False, dtype=torch.float32)
        with Engine(from_hf_config(checkpoints["opt"]), policy, Workload(PROMPT, GEN), opts) as engine:
            assert reason in engine.graph_refusal


def test_block_start_keys_view_the_whole_length():
    """A captured step searches over the view of every position the cache can hold: it fits the
    allocation when the length is a whole number of blocks."""
    from offload_engine.kv.hot_cache import HotBlockCache

    for max_len, bk in ((64, 2), (63, 2), (96, 4)):
        hot = HotBlockCache(1, 2, 8, max_len, bk, 4, torch.float32, torch.device("cpu"))
        keys = torch.randn(1, 2, max_len, 8)
        hot.write_reps(0, keys)
        view = hot.rep_keys(max_len)
        assert torch.equal(view[:, :, ::bk], keys[:, :, ::bk])
