"""Model hyperparameters: one dataclass for every family the engine runs.

A family's layer definitions (offload_engine/models/) are built from a `ModelConfig`; the
published sizes live in model_zoo.py, and checkpoints are read into this shape by
offload_engine/checkpoints/.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import EngineError

FAMILIES = ("opt", "llama")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-position scaling for contexts beyond the trained length.

    kind "linear": every frequency divided by `factor`; kind "llama3": Llama 3.1's rule, which
    leaves high frequencies, divides low ones by `factor` and blends in between.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    KINDS = ("linear", "llama3")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise EngineError(f"rope scaling '{self.kind}' is not supported.",
                              f"Supported: {', '.join(self.KINDS)}.")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise EngineError(f"rope scaling factor must be a positive number, got {self.factor}.")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters. Fields a family does not use keep their defaults."""

    name: str
    family: str  # one of FAMILIES
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_dim: int
    vocab_size: int = 50272
    max_positions: int = 2048
    num_kv_heads: int | None = None  # grouped-query attention; None: one KV head per query head
    head_dim_override: int | None = None  # Llama configs may set head_dim != hidden / heads
    tie_word_embeddings: bool = True
    # OPT
    word_embed_dim: int | None = None  # OPT-350m projects 512-wide embeddings to the hidden size
    layer_norm_before: bool = True  # False: post-LayerNorm (OPT-350m)
    final_layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    # Llama
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def embed_dim(self) -> int:
        return self.word_embed_dim or self.hidden_size

    def validate(self) -> "ModelConfig":
        fix = "Fix config.json (or the checkpoint's metadata)."
        if self.family not in FAMILIES:
            raise EngineError(f"model {self.name}: family '{self.family}' is not supported.",
                              f"Supported: {', '.join(FAMILIES)}.")
        for field in ("num_layers", "hidden_size", "num_heads", "ffn_dim", "vocab_size", "max_positions"):
            if getattr(self, field) < 1:
                raise EngineError(f"model {self.name}: {field} must be at least 1.", fix)
        if self.head_dim_override is None and self.hidden_size % self.num_heads:
            raise EngineError(f"model {self.name}: hidden size {self.hidden_size} is not divisible by "
                              f"{self.num_heads} heads.", fix)
        if self.num_heads % self.kv_heads:
            raise EngineError(f"model {self.name}: {self.num_heads} attention heads are not a multiple of "
                              f"{self.kv_heads} key/value heads.", fix)
        if self.family == "llama" and self.head_dim % 2:
            raise EngineError(f"model {self.name}: rotary positions need an even head size, got {self.head_dim}.", fix)
        return self


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)
