"""The graph-capturable decode step. Without a GPU nothing is captured (the switch is a no-op on
CPU, checked below); the same static step runs eagerly here and must equal transformers, and on
the GPU the suite runs it captured."""
from __future__ import annotations

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.sampling import GenerationConfig
from policies import H2OConfig, KVSettings
from policies.memory import Workload
from policies.placement import Policy

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_llama, tiny_hf_opt
from test_llama_vs_hf import reference as llama_reference

PROMPT, GEN = 9, 6
ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, model in (("opt", tiny_hf_opt(seed=8)), ("opt-post-ln", tiny_hf_opt(pre_ln=False, seed=9)),
                        ("llama", tiny_hf_llama(seed=10))):
        out[name] = (model, save_checkpoint(model, tmp_path_factory.mktemp(name), "safetensors"))
    return out


def engine(folder, tmp_path, batches=1, **policy_kw):
    policy = Policy(gpu_batch_size=2, num_gpu_batches=batches, **policy_kw)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32,
                         eager_static_decode=not ON_GPU)
    return Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts)


@pytest.mark.parametrize("name", ["opt", "opt-post-ln", "llama"])
@pytest.mark.parametrize("batches", [1, 3])
def test_static_decode_equals_transformers(models, tmp_path, name, batches):
    model, folder = models[name]
    ids, mask = random_prompts(2 * batches, PROMPT, seed=batches + 2)
    tokens, step_logits, _ = llama_reference(model, ids, mask, GEN)  # generic: generate + logits
    with engine(folder, tmp_path, batches) as e:
        assert e.decode_graph is not None
        for _ in range(2):  # the second call replays what the first captured
            out = e.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)
            assert torch.equal(out.tokens, tokens)
            for ours, theirs in zip(out.step_logits, step_logits):
                assert rel_err(ours, theirs) < 1e-5


def test_a_new_batch_reuses_the_graph(models, tmp_path):
    _, folder = models["opt"]
    with engine(folder, tmp_path) as e:
        first = e.generate(*random_prompts(2, PROMPT, seed=20), GenerationConfig(max_new_tokens=GEN))
        second = e.generate(*random_prompts(2, PROMPT, seed=21), GenerationConfig(max_new_tokens=GEN))
    with engine(folder, tmp_path, cuda_graphs=False) as e:
        assert e.decode_graph is None and e.graph_refusal == "--no-cuda-graphs"
        assert torch.equal(e.generate(*random_prompts(2, PROMPT, seed=21),
                                      GenerationConfig(max_new_tokens=GEN)).tokens, second.tokens)
    assert not torch.equal(first.tokens, second.tokens)


@pytest.mark.parametrize("percent,kv,reason", [
    ((50, 50, 100, 0, 100, 0), KVSettings(), "weights are streamed"),
    ((100, 0, 50, 50, 100, 0), KVSettings(), "leave the GPU"),
    ((100, 0, 100, 0, 100, 0), KVSettings("h2o", H2OConfig(simulate=True)), "masked simulation"),
    ((100, 0, 100, 0, 100, 0), KVSettings("hip"), "hip KV policy"),
])
def test_where_graphs_do_not_apply(models, tmp_path, percent, kv, reason):
    _, folder = models["opt"]
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    policy = Policy.from_percent(percent, gpu_batch_size=2, kv=kv)
    with Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts) as e:
        assert reason in e.graph_refusal and e.decode_graph is None


@pytest.mark.skipif(ON_GPU, reason="checks the CPU behaviour")
def test_no_capture_without_a_gpu(models, tmp_path):
    _, folder = models["opt"]
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False)
    with Engine(from_hf_config(folder), Policy(gpu_batch_size=2), Workload(PROMPT, GEN), opts) as e:
        assert e.graph_refusal is None and e.decode_graph is None  # applies, but there is nothing to capture
