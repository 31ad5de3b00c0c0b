"""Choosing the next token: greedy, or sampling with temperature and nucleus (top-p) filtering."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import EngineError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_id: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise EngineError("--temperature and --top-p must be finite numbers.")
        if self.max_new_tokens < 1:
            raise EngineError("--gen-len must be at least 1.")
        if self.do_sample and self.temperature <= 0:
            raise EngineError("--temperature must be > 0 when sampling.", "Drop --do-sample for greedy decoding.")
        if not 0 < self.top_p <= 1:
            raise EngineError("--top-p must be in (0, 1].")


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from float logits (B, V)."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
