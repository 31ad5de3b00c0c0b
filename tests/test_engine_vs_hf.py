"""The engine against Hugging Face transformers' OPTForCausalLM, for every placement path."""
from __future__ import annotations

import itertools

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.sampling import GenerationConfig
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_opt

PLACEMENTS = {
    "gpu": (100, 0, 100, 0, 100, 0),
    "cpu": (0, 100, 0, 100, 0, 100),
    "disk": (0, 0, 0, 0, 0, 0),
    "mixed": (30, 30, 34, 33, 50, 0),  # every kind spread over all three tiers
}
PROMPT, GEN, GPU_BATCH = 9, 6, 2


def hf_reference(model, ids, mask, gen_len):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=gen_len, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=1)
        prompt_logits = model(ids, attention_mask=mask).logits
    return out.sequences[:, ids.shape[1]:], out.logits, prompt_logits


def run_engine(folder, policy, ids, mask, tmp_path, device=None):
    cfg = from_hf_config(folder)
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path / "offload", progress=False, device=device,
                         dtype=torch.float32)
    engine = Engine(cfg, policy, Workload(PROMPT, GEN), opts)
    try:
        return engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)
    finally:
        engine.close()


def check_against_hf(result, ref, mask):
    tokens, step_logits, prompt_logits = ref
    assert torch.equal(result.tokens, tokens)
    for ours, theirs in zip(result.step_logits, step_logits):
        assert rel_err(ours, theirs) < 1e-5
    valid = mask.bool()  # logits at padded positions are meaningless in both
    assert rel_err(result.prompt_logits[valid], prompt_logits[valid]) < 1e-5


@pytest.mark.parametrize("placement,num_batches,overlap,cpu_compute", list(itertools.product(
    PLACEMENTS, [1, 3], [True, False], [True, False])))
def test_pre_ln_every_placement(opt_checkpoints, tmp_path, placement, num_batches, overlap, cpu_compute):
    model, folder = opt_checkpoints[True]
    ids, mask = random_prompts(GPU_BATCH * num_batches, PROMPT, seed=num_batches)
    policy = Policy.from_percent(PLACEMENTS[placement], gpu_batch_size=GPU_BATCH, num_gpu_batches=num_batches,
                                 overlap=overlap, cpu_cache_compute=cpu_compute)
    result = run_engine(folder, policy, ids, mask, tmp_path)
    check_against_hf(result, hf_reference(model, ids, mask, GEN), mask)


@pytest.mark.parametrize("placement,sep_layer", list(itertools.product(PLACEMENTS, [True, False])))
def test_post_ln_with_projection(opt_checkpoints, tmp_path, placement, sep_layer):
    """OPT-350m's shape: post-LayerNorm, no final LayerNorm, narrower embeddings projected in and out."""
    model, folder = opt_checkpoints[False]
    ids, mask = random_prompts(4, PROMPT, seed=7)
    policy = Policy.from_percent(PLACEMENTS[placement], gpu_batch_size=2, num_gpu_batches=2, sep_layer=sep_layer,
                                 cpu_cache_compute=True)
    result = run_engine(folder, policy, ids, mask, tmp_path)
    check_against_hf(result, hf_reference(model, ids, mask, GEN), mask)


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin", "bin-sharded"])
def test_checkpoint_formats(tmp_path, fmt):
    model = tiny_hf_opt(pre_ln=True, seed=3)
    folder = save_checkpoint(model, tmp_path / fmt, fmt)
    ids, mask = random_prompts(4, PROMPT, seed=3)
    policy = Policy.from_percent(PLACEMENTS["mixed"], gpu_batch_size=2, num_gpu_batches=2)
    result = run_engine(folder, policy, ids, mask, tmp_path)
    check_against_hf(result, hf_reference(model, ids, mask, GEN), mask)


def test_fewer_prompts_than_batch(opt_checkpoints, tmp_path):
    model, folder = opt_checkpoints[True]
    ids, mask = random_prompts(3, PROMPT, seed=11)
    policy = Policy.from_percent(PLACEMENTS["cpu"], gpu_batch_size=2, num_gpu_batches=2)
    result = run_engine(folder, policy, ids, mask, tmp_path)
    check_against_hf(result, hf_reference(model, ids, mask, GEN), mask)


@pytest.mark.parametrize("ids,mask,needle", [
    (torch.randint(3, 90, (9,)), None, "2-D"),
    (torch.rand(2, 4), None, "integer"),
    (torch.randint(3, 90, (2, 4)), torch.ones(2, 3, dtype=torch.long), "attention_mask has shape"),
    (torch.randint(3, 90, (2, 4)), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), "left-padded"),
    (torch.full((2, 4), 500), None, "token ids must be in"),
    (torch.randint(3, 90, (9, 4)), None, "exceed the batch"),
    (torch.randint(3, 90, (2, PROMPT + 1)), None, "exceed the planned workload"),
])
def test_bad_generate_inputs(opt_checkpoints, tmp_path, ids, mask, needle):
    from offload_engine.errors import EngineError

    _, folder = opt_checkpoints[True]
    engine = Engine(from_hf_config(folder), Policy.from_percent(PLACEMENTS["gpu"], gpu_batch_size=2, num_gpu_batches=2),
                    Workload(PROMPT, GEN), EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False))
    try:
        with pytest.raises(EngineError, match=needle):
            engine.generate(ids, mask)
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mapped read of pinned hidden states needs CUDA")
@pytest.mark.parametrize("mapped_bytes", [0, 1 << 30], ids=["copied", "mapped"])
def test_cpu_hidden_states_copied_or_read_through_the_mapping(opt_checkpoints, tmp_path, monkeypatch, mapped_bytes):
    """Hidden states homed on the CPU come back by a copy (prefill-sized) or by a kernel reading the
    GPU's mapping of the pinned home (decode-sized, activations.py); both give HF's logits."""
    import offload_engine.activations as activations
    monkeypatch.setattr(activations, "MAPPED_READ_BYTES", mapped_bytes)
    model, folder = opt_checkpoints[True]
    ids, mask = random_prompts(4, PROMPT, seed=11)
    policy = Policy.from_percent(PLACEMENTS["cpu"], gpu_batch_size=2, num_gpu_batches=2, cpu_cache_compute=True)
    result = run_engine(folder, policy, ids, mask, tmp_path)
    check_against_hf(result, hf_reference(model, ids, mask, GEN), mask)
