"""Model configurations: the published OPT family, and configs read from a checkpoint folder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters; the layer definitions of a family are built from this."""

    name: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_dim: int
    vocab_size: int = 50272
    max_positions: int = 2048
    word_embed_dim: int | None = None  # OPT-350m projects 512-wide embeddings to the hidden size
    layer_norm_before: bool = True  # False: post-LayerNorm (OPT-350m)
    final_layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embed_dim(self) -> int:
        return self.word_embed_dim or self.hidden_size

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise EngineError(
                f"model {self.name}: hidden size {self.hidden_size} is not divisible by {self.num_heads} heads.",
                "Fix config.json.",
            )


def _opt(name: str, layers: int, hidden: int, heads: int, **kw) -> ModelConfig:
    return ModelConfig(name=name, family="opt", num_layers=layers, hidden_size=hidden, num_heads=heads,
                       ffn_dim=4 * hidden, **kw)


OPT_CONFIGS: dict[str, ModelConfig] = {
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
    )
}


def from_hf_config(path: Path) -> ModelConfig:
    """Read a Hugging Face `config.json` of an OPT checkpoint."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise EngineError(f"{path} has no config.json.", "Point --model at a Hugging Face checkpoint folder.") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"{path / 'config.json'} is not valid JSON ({e}).", "Fix or re-download it.") from None
    if raw.get("model_type") != "opt":
        raise EngineError(f"{path} holds a '{raw.get('model_type')}' model; only OPT is supported.",
                          f"Use one of: {', '.join(OPT_CONFIGS)}.")
    try:
        hidden = raw["hidden_size"]
        proj = raw.get("word_embed_proj_dim") or hidden
        pre_ln = raw.get("do_layer_norm_before", True)
        cfg = ModelConfig(
            name=path.name, family="opt", num_layers=raw["num_hidden_layers"], hidden_size=hidden,
            num_heads=raw["num_attention_heads"], ffn_dim=raw["ffn_dim"], vocab_size=raw["vocab_size"],
            max_positions=raw.get("max_position_embeddings", 2048),
            word_embed_dim=proj if proj != hidden else None, layer_norm_before=pre_ln,
            final_layer_norm=pre_ln and not raw.get("_remove_final_layer_norm", False),
            pad_token_id=raw.get("pad_token_id", 1), bos_token_id=raw.get("bos_token_id", 2),
            eos_token_id=raw.get("eos_token_id", 2),
        )
    except KeyError as e:
        raise EngineError(f"{path / 'config.json'} lacks the key {e}.", "Fix or re-download config.json.") from None
    if raw.get("enable_bias", True) is False or raw.get("layer_norm_elementwise_affine", True) is False:
        raise EngineError(f"{path}: OPT variants without biases or LayerNorm affine weights are not supported.")
    cfg.validate()
    return cfg


def resolve_model(name_or_path: str) -> tuple[ModelConfig, Path | None]:
    """A published name ('opt-6.7b', 'facebook/opt-6.7b') or a local checkpoint folder."""
    key = name_or_path.split("/")[-1].lower()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return from_hf_config(path), path
    if key in OPT_CONFIGS:
        return OPT_CONFIGS[key], None
    raise EngineError(f"unknown model '{name_or_path}': not a folder and not a known name.",
                      f"Use one of {', '.join(OPT_CONFIGS)} or a checkpoint folder path.")


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)
