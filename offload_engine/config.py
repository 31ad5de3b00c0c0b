"""Model hyperparameters: one dataclass for every family the engine runs.

A family's layer definitions (offload_engine/models/) are built from a `ModelConfig`; the
published sizes live in model_zoo.py, and checkpoints are read into this shape by
offload_engine/checkpoints/.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, replace

from .errors import EngineError

FAMILIES = ("opt", "llama")
# Sizes and layer counts beyond 32-bit indexing are no real model's: a typo or a corrupt file.
MAX_SIZE = 2**31 - 1
SIZE_FIELDS = ("num_layers", "hidden_size", "num_heads", "ffn_dim", "vocab_size", "max_positions")
OPTIONAL_SIZE_FIELDS = ("num_kv_heads", "head_dim_override", "word_embed_dim")
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
REAL_FIELDS = ("layer_norm_eps", "rms_norm_eps", "rope_theta")


def is_whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_size(value, field: str, where: str, fix: str, low: int = 1) -> None:
    """A count or dimension: a whole number from `low` to MAX_SIZE, or one line naming the field."""
    if not is_whole(value) or not low <= value <= MAX_SIZE:
        raise EngineError(f"{where}: {field} must be a whole number from {low} to {MAX_SIZE}, got {value!r}.", fix)


def check_real(value, field: str, where: str, fix: str) -> None:
    """A finite, non-negative number (norm epsilons, the rotary base)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise EngineError(f"{where}: {field} must be a finite non-negative number, got {value!r}.", fix)


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

    def with_max_positions(self, positions: int) -> "ModelConfig":
        """For experiments with random weights: the position limit raised to `positions`, and a
        llama3 or linear rope scaling stretched by the same factor (no claim about quality)."""
        scaling = self.rope_scaling
        if scaling is not None:
            scaling = replace(scaling, factor=scaling.factor * positions / self.max_positions)
        return replace(self, max_positions=positions, rope_scaling=scaling)

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
        where = f"model {self.name}"
        for field in SIZE_FIELDS:
            check_size(getattr(self, field), field, where, fix)
        for field in OPTIONAL_SIZE_FIELDS:
            if getattr(self, field) is not None:
                check_size(getattr(self, field), field, where, fix)
        for field in TOKEN_FIELDS:
            check_size(getattr(self, field), field, where, fix, low=0)
        for field in REAL_FIELDS:
            check_real(getattr(self, field), field, where, fix)
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
