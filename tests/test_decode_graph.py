"""The graph-capturable decode step. Without a GPU nothing is captured (the switch is a no-op on
CPU, checked below); the same static step runs eagerly here and must equal transformers, and on
the GPU the suite runs it captured."""
from __future__ import annotations

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.sampling import GenerationConfig
from offload_engine.policies import H2OConfig, HiPConfig, KVSettings
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

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


@pytest.mark.parametrize("act_cpu", [100, 50])
def test_hidden_states_homed_off_the_gpu_stay_there_in_a_captured_step(models, tmp_path, act_cpu):
    """Activations homed on the CPU (all or half the batches) hold the prefill's hidden states; the
    captured decode step keeps its own on the GPU, and the tokens and logits stay transformers'."""
    model, folder = models["llama"]
    ids, mask = random_prompts(4, PROMPT, seed=31)
    tokens, step_logits, _ = llama_reference(model, ids, mask, GEN)
    with engine(folder, tmp_path, 2, act_gpu_percent=100 - act_cpu, act_cpu_percent=act_cpu) as e:
        assert e.decode_graph is not None and e.acts.decode_on_gpu
        assert sum(h is not None for h in e.acts.homes) == act_cpu // 50
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
    ((100, 0, 50, 50, 100, 0), KVSettings(), "leaves the GPU"),
    ((100, 0, 100, 0, 100, 0), KVSettings("h2o", H2OConfig(simulate=True)), "masked simulation"),
    ((100, 0, 100, 0, 100, 0), KVSettings("hip", hip=HiPConfig(exact=True)), "exact top-k"),
    ((100, 0, 0, 0, 100, 0), KVSettings("hip"), "leaves the GPU"),  # HiP's cache on disk
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


# --- every KV policy at full budget equals full attention, captured -------------------------------

FULL_PROMPT, FULL_GEN = 20, 17  # 16 decode steps after the prefill
FULL_BUDGET = {
    "full": KVSettings(),
    "h2o": KVSettings("h2o", H2OConfig(hh_size=FULL_PROMPT + FULL_GEN, recent_size=FULL_PROMPT + FULL_GEN)),
    "sink": KVSettings("sink", H2OConfig(hh_size=FULL_PROMPT + FULL_GEN, recent_size=FULL_PROMPT + FULL_GEN)),
    "hip": KVSettings("hip", hip=HiPConfig(k=64, block_size_q=4, block_size_k=2, sink=0, window=4)),  # window < refresh
}


def gqa_llama(heads: int, kv_heads: int, seed: int):
    """A random Llama with llama3 rope scaling and an untied head, `heads` query heads of width 8."""
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=1000.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.25)
    return model


@pytest.fixture(scope="module")
def attention_layouts(tmp_path_factory):
    return {name: save_checkpoint(gqa_llama(heads, kv, seed), tmp_path_factory.mktemp(name), "safetensors")
            for name, heads, kv, seed in (("mha", 4, 4, 30), ("gqa", 6, 2, 31))}


def full_budget_tokens(folder, tmp_path, settings: KVSettings) -> torch.Tensor:
    """Greedy tokens of two generations (the second replays the first one's graph) on prompts
    left-padded by 13, 6 and 0 tokens."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 96, (3, FULL_PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((13, 6, 0)):
        mask[row, :pad] = 0
    ids[mask == 0] = 1
    policy = Policy(gpu_batch_size=3, kv=settings)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32,
                         eager_static_decode=not ON_GPU)
    with Engine(from_hf_config(folder), policy, Workload(FULL_PROMPT, FULL_GEN), opts) as e:
        assert (e.decode_graph is not None) == settings.capturable
        runs = [e.generate(ids, mask, GenerationConfig(max_new_tokens=FULL_GEN)).tokens
                for _ in range(2 if settings.capturable else 1)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    return runs[0]


@pytest.fixture(scope="module")
def full_attention_tokens(attention_layouts, tmp_path_factory):
    return {layout: full_budget_tokens(folder, tmp_path_factory.mktemp("full"), FULL_BUDGET["full"])
            for layout, folder in attention_layouts.items()}


@pytest.mark.parametrize("layout", ["mha", "gqa"])
@pytest.mark.parametrize("kv", ["h2o", "sink", "hip"])
def test_every_kv_policy_at_full_budget_equals_full_attention_captured(attention_layouts, full_attention_tokens,
                                                                       tmp_path, layout, kv):
    """16 decode steps, captured where the policy allows it (the capturing step runs once: a
    replay on top of capture's warm-up run would write the new token into a second free slot)."""
    tokens = full_budget_tokens(attention_layouts[layout], tmp_path, FULL_BUDGET[kv])
    assert torch.equal(tokens, full_attention_tokens[layout])
