"""What a model family gives the engine: an ordered list of layers, each with its weights.

The engine schedules layers without knowing which family they come from. A layer declares
its weight tensors (checkpoint key, shape), whether it keeps a KV cache, and an estimate of
the transient memory its forward needs; `forward` gets its weights already on the compute
device and reaches the KV cache only through `LayerContext.kv`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class WeightSpec:
    name: str  # unique within the layer; the key of the dict `forward` receives
    key: str  # checkpoint key (without a leading "model.")
    shape: tuple[int, ...]
    init: str = "normal"  # dummy init: "normal", "norm_weight" (around 1) or "bias"

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class KVSpec:
    num_heads: int  # key/value heads: what the cache holds
    head_dim: int
    query_heads: int = 0  # attention heads reading them (grouped-query attention); 0: num_heads

    @property
    def group(self) -> int:
        return (self.query_heads or self.num_heads) // self.num_heads


class KVAccess(Protocol):
    """The KV cache of one attention layer for one GPU batch, as the layer sees it."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append this step's k/v (B, s, H, D) to the cache and attend q (B, s, H, D) over it."""
        ...


@dataclass
class BatchView:
    """The rows of one GPU batch during one step."""

    positions: torch.Tensor  # (B, s) position of each new token; -1 at left padding
    prefill: bool
    memo: dict = field(default_factory=dict)  # per-step values layers share (e.g. rotary tables)

    def cached(self, key: str, make):
        """`make()` once per step and GPU batch, then shared by every layer."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


@dataclass
class LayerContext:
    batch: BatchView
    kv: KVAccess | None = None
    all_logits: bool = False  # return logits for every position, not only the last


class Layer(ABC):
    name: str
    kv_spec: KVSpec | None = None

    @abstractmethod
    def weight_specs(self) -> list[WeightSpec]: ...

    @abstractmethod
    def forward(self, x: torch.Tensor, w: dict[str, torch.Tensor], ctx: LayerContext) -> torch.Tensor: ...

    @abstractmethod
    def working_bytes(self, batch: int, seq: int, itemsize: int) -> int:
        """Transient device memory of one forward on (batch, seq) tokens, beyond input and weights."""


@dataclass
class FusedLayer(Layer):
    """Several layers scheduled as one unit (FlexGen without --sep-layer)."""

    parts: list[Layer]
    name: str = ""
    kv_spec: KVSpec | None = field(default=None)

    def __post_init__(self) -> None:
        self.name = "+".join(p.name for p in self.parts)
        specs = [p.kv_spec for p in self.parts if p.kv_spec is not None]
        assert len(specs) <= 1, "a fused layer may hold at most one KV cache"
        self.kv_spec = specs[0] if specs else None
        names = [s.name for s in self.weight_specs()]
        assert len(names) == len(set(names)), f"weight names collide in {self.name}"

    def weight_specs(self) -> list[WeightSpec]:
        return [s for p in self.parts for s in p.weight_specs()]

    def forward(self, x, w, ctx):
        for p in self.parts:
            x = p.forward(x, w, ctx)
        return x

    def working_bytes(self, batch, seq, itemsize):
        return max(p.working_bytes(batch, seq, itemsize) for p in self.parts)
