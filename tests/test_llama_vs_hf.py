"""Llama-family models against Hugging Face transformers' LlamaForCausalLM: grouped-query attention,
rotary scaling, tied and separate heads, on every placement."""
from __future__ import annotations

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.model_zoo import MODEL_CONFIGS
from offload_engine.models import build_layers
from offload_engine.sampling import GenerationConfig
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from conftest import hf_positions, random_prompts, rel_err, save_checkpoint, tiny_hf_llama

PROMPT, GEN = 9, 6
PLACEMENTS = {"gpu": (100, 0, 100, 0, 100, 0), "cpu": (0, 100, 0, 100, 0, 100), "disk": (0, 0, 0, 0, 0, 0),
              "mixed": (30, 30, 34, 33, 50, 0)}
VARIANTS = {
    "gqa": dict(kv_heads=2),
    "mha-tied": dict(kv_heads=4, tied=True),
    "mqa-linear-rope": dict(kv_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3-rope": dict(kv_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.fixture(scope="module")
def llama_checkpoints(tmp_path_factory):
    out = {}
    for name, kw in VARIANTS.items():
        model = tiny_hf_llama(**kw, seed=len(out))
        out[name] = (model, save_checkpoint(model, tmp_path_factory.mktemp(name), "safetensors"))
    return out


def reference(model, ids, mask, gen_len=GEN):
    model.generation_config.eos_token_id = None  # the engine generates past EOS unless told to stop
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=gen_len, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=1)
        prompt = model(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    return gen.sequences[:, ids.shape[1]:], gen.logits, prompt


def run_engine(folder, policy, ids, mask, tmp_path):
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    with Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts) as engine:
        return engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("placement,cpu_compute", [("gpu", False), ("cpu", True), ("disk", False), ("mixed", True)])
def test_llama_matches_transformers(llama_checkpoints, tmp_path, variant, placement, cpu_compute):
    model, folder = llama_checkpoints[variant]
    ids, mask = random_prompts(4, PROMPT, seed=5)
    policy = Policy.from_percent(PLACEMENTS[placement], gpu_batch_size=2, num_gpu_batches=2,
                                 cpu_cache_compute=cpu_compute)
    result = run_engine(folder, policy, ids, mask, tmp_path)
    tokens, step_logits, prompt_logits = reference(model, ids, mask)
    assert torch.equal(result.tokens, tokens)
    for ours, theirs in zip(result.step_logits, step_logits):
        assert rel_err(ours, theirs) < 1e-5
    valid = mask.bool()
    assert rel_err(result.prompt_logits[valid], prompt_logits[valid]) < 1e-5


def test_config_from_folder_matches(llama_checkpoints):
    model, folder = llama_checkpoints["gqa"]
    cfg = from_hf_config(folder)
    assert (cfg.family, cfg.num_heads, cfg.kv_heads, cfg.head_dim) == ("llama", 4, 2, 8)
    ours = {s.key for layer in build_layers(cfg) for s in layer.weight_specs()}
    theirs = {k.removeprefix("model.") for k in model.state_dict()}
    assert ours == theirs


# Parameter counts of the released checkpoints (a tied head counted once).
PUBLISHED_PARAMS = {"smollm2-135m": 134.5e6, "smollm2-360m": 361.8e6, "smollm2-1.7b": 1.711e9,
                    "llama-2-7b": 6.738e9, "llama-2-13b": 13.016e9, "llama-2-70b": 68.977e9,
                    "llama-3.1-8b": 8.030e9, "llama-3.1-70b": 70.554e9}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_published_sizes(name):
    specs = {s.key: s for layer in build_layers(MODEL_CONFIGS[name]) for s in layer.weight_specs()}
    assert sum(s.numel() for s in specs.values()) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005)


def test_kv_cache_holds_the_kv_heads_only():
    from offload_engine.policies.memory import plan_memory

    cfg = MODEL_CONFIGS["llama-3.1-8b"]
    plan = plan_memory(build_layers(cfg), Policy(gpu_batch_size=1), Workload(1024, 1024), torch.float16,
                       cfg.hidden_size)
    # 32 layers x 2 (K, V) x 2048 tokens x 8 KV heads x 128 x 2 bytes = 256 MiB
    assert plan.cache_bytes == 32 * 2 * 2048 * 8 * 128 * 2
