"""Compressed weights and KV cache in the engine: close to the uncompressed engine on every tier,
exact where it must be (memory accounting, GGUF blocks handed over unchanged)."""
from __future__ import annotations

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.model_zoo import MODEL_CONFIGS
from offload_engine.models import build_layers
from offload_engine.sampling import GenerationConfig
from offload_engine.io.tiers import Tier
from offload_engine.policies import Compression, H2OConfig, KVSettings
from offload_engine.policies.memory import Workload, plan_memory
from offload_engine.policies.placement import Policy

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_llama, tiny_hf_opt, transformers
from test_memory_plan import real_bytes

PROMPT, GEN = 12, 8
TIERS = {"gpu": ((100, 0, 100, 0, 100, 0), False), "cpu-attention": ((0, 100, 0, 100, 0, 100), True),
         "cpu-streamed": ((0, 100, 0, 100, 0, 100), False), "disk": ((0, 0, 0, 0, 0, 0), False),
         "mixed": ((30, 30, 34, 33, 50, 0), True)}
Q4 = Compression(4, 64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"opt": save_checkpoint(tiny_hf_opt(seed=4), tmp_path_factory.mktemp("opt"), "safetensors"),
            "llama": save_checkpoint(tiny_hf_llama(seed=5), tmp_path_factory.mktemp("llama"), "safetensors")}


def generate(folder, tmp_path, tier, weight=None, cache=None, kv=KVSettings()):
    percent, cpu_compute = TIERS[tier]
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, cpu_cache_compute=cpu_compute,
                                 compress_weight=weight, compress_cache=cache, kv=kv)
    ids, mask = random_prompts(4, PROMPT, seed=9)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    with Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts) as engine:
        return engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)


def agreement(a, b) -> float:
    return float((a.tokens == b.tokens).double().mean())


def fake_quantized(model):
    """The Hugging Face model with every 2-D weight replaced by dequantize(quantize(w)): the
    independent reference for the engine with compressed weights."""
    from offload_engine.kernels.quant.pack import dequantize_reference, quantize_reference

    spec = Q4.kernel_spec()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(dequantize_reference(quantize_reference(p.float(), spec), spec, p.shape[1]))
    return model


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_compressed_weights_equal_dequantized_reference(checkpoints, tmp_path, family, tier):
    """4-bit weights on any tier compute exactly what transformers computes with the same weights
    dequantized: the fused kernel and the streaming of packed bytes add no error of their own."""
    from test_llama_vs_hf import reference as llama_reference

    folder = checkpoints[family]
    cls = transformers.OPTForCausalLM if family == "opt" else transformers.LlamaForCausalLM
    model = fake_quantized(cls.from_pretrained(folder).eval())
    ids, mask = random_prompts(4, PROMPT, seed=9)
    tokens, step_logits, _ = (llama_reference(model, ids, mask, GEN) if family == "llama"
                              else hf_opt(model, ids, mask))
    packed = generate(folder, tmp_path, tier, weight=Q4)
    assert torch.equal(packed.tokens, tokens)
    for ours, theirs in zip(packed.step_logits, step_logits):
        assert rel_err(ours, theirs) < 1e-5


def hf_opt(model, ids, mask):
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=GEN, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=1)
    return out.sequences[:, ids.shape[1]:], out.logits, None


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_compressed_cache_stays_close(checkpoints, tmp_path, family, tier):
    """4-bit KV against the uncompressed engine, stated tolerance: the first decode step's logits within 35%
    relative norm and at least half the greedy tokens equal. The tiny random models (hidden 32,
    weights of std 0.25) amplify rounding far more than trained ones; the real model's perplexity
    with 4-bit KV is in the accuracy table."""
    folder = checkpoints[family]
    full = generate(folder, tmp_path, tier)
    packed = generate(folder, tmp_path, tier, None, Q4)
    assert torch.equal(packed.tokens[:, 0], full.tokens[:, 0])  # prefill attends in full precision
    assert rel_err(packed.step_logits[1], full.step_logits[1]) < 0.35  # the first step that reads the cache
    assert agreement(packed, full) >= 0.5


@pytest.mark.parametrize("tier", list(TIERS))
def test_compressed_cache_is_the_same_on_every_tier(checkpoints, tmp_path, tier):
    """The packed bytes are what moves between tiers: every placement gives the GPU-resident result."""
    reference = generate(checkpoints["llama"], tmp_path, "gpu", Q4, Q4)
    moved = generate(checkpoints["llama"], tmp_path, tier, Q4, Q4)
    assert torch.equal(moved.tokens, reference.tokens)
    for a, b in zip(moved.step_logits, reference.step_logits):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("tier", ["gpu", "cpu-attention", "disk"])
def test_h2o_with_compressed_cache_equals_its_simulation(checkpoints, tmp_path, tier):
    real = generate(checkpoints["opt"], tmp_path, tier, cache=Q4, kv=KVSettings("h2o", H2OConfig(hh_size=3,
                                                                                                   recent_size=2)))
    sim = generate(checkpoints["opt"], tmp_path, tier, cache=Q4,
                   kv=KVSettings("h2o", H2OConfig(hh_size=3, recent_size=2, simulate=True)))
    assert torch.equal(real.tokens, sim.tokens)
    for a, b in zip(real.step_logits, sim.step_logits):
        assert rel_err(a, b) < 1e-5


def test_eight_bit_is_closer_than_four(checkpoints, tmp_path):
    full = generate(checkpoints["opt"], tmp_path, "gpu")
    errs = [rel_err(generate(checkpoints["opt"], tmp_path, "gpu", c, c).step_logits[0], full.step_logits[0])
            for c in (Compression(4, 64), Compression(8, 64))]
    assert errs[1] < errs[0] / 4


@pytest.mark.parametrize("percent,cpu_compute", [((100, 0, 100, 0, 100, 0), False), ((30, 30, 34, 33, 50, 0), False),
                                                 ((20, 80, 0, 100, 0, 100), True), ((0, 0, 0, 0, 0, 0), False)])
def test_predicted_bytes_match_allocation_compressed(tmp_path, percent, cpu_compute):
    tiny = MODEL_CONFIGS["opt-125m"].__class__(name="tiny", family="opt", num_layers=4, hidden_size=128,
                                               num_heads=4, ffn_dim=256, vocab_size=500, max_positions=128)
    policy = Policy.from_percent(percent, gpu_batch_size=3, num_gpu_batches=2, cpu_cache_compute=cpu_compute,
                                 compress_weight=Q4, compress_cache=Q4)
    with Engine(tiny, policy, Workload(16, 8), EngineOptions(offload_dir=tmp_path, progress=False)) as engine:
        real, plan = real_bytes(engine), engine.plan
        for tier in Tier:
            assert real[tier] == pytest.approx(plan.persistent_bytes(tier), rel=0.02), tier
        assert engine.disk.file_bytes() == pytest.approx(plan.persistent_bytes(Tier.DISK), rel=0.02)


def test_compression_shrinks_the_plan_as_flexgen_says():
    cfg = MODEL_CONFIGS["opt-30b"]
    layers, work = build_layers(cfg), Workload(512, 32)
    plain = plan_memory(layers, Policy(gpu_batch_size=64), work, torch.float16, cfg.hidden_size)
    packed = plan_memory(layers, Policy(gpu_batch_size=64, compress_weight=Q4, compress_cache=Q4), work,
                         torch.float16, cfg.hidden_size)
    assert packed.cache_bytes / plain.cache_bytes == pytest.approx(36 / 128)  # 4-bit codes + fp16 scale/min per 64
    assert packed.model_bytes / plain.model_bytes == pytest.approx(36 / 128, rel=0.01)  # biases and norms stay fp16
