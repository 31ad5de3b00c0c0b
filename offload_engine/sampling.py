"""Choosing the next token: greedy, or sampling with temperature and nucleus (top-p) filtering."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import EngineError, require_int, require_number


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_id: int | None = None

    def __post_init__(self) -> None:
        require_number(self.temperature, "--temperature (GenerationConfig.temperature)")
        require_number(self.top_p, "--top-p (GenerationConfig.top_p)")
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise EngineError("--temperature and --top-p must be finite numbers.")
        require_int(self.max_new_tokens, "--gen-len (GenerationConfig.max_new_tokens)", 1)
        require_int(self.seed, "--seed (GenerationConfig.seed)", -(1 << 63))  # what torch's generators take
        if self.stop_token_id is not None:
            require_int(self.stop_token_id, "--stop-token (GenerationConfig.stop_token_id)", 0)
        if self.do_sample and self.temperature <= 0:
            raise EngineError("--temperature must be > 0 when sampling.", "Drop --do-sample for greedy decoding.")
        if not 0 < self.top_p <= 1:
            raise EngineError("--top-p must be in (0, 1].")

    def check_vocab(self, vocab_size: int) -> None:
        """The stop token must be one the model can produce."""
        if self.stop_token_id is not None and self.stop_token_id >= vocab_size:
            raise EngineError(f"--stop-token {self.stop_token_id} is not a token id of this model "
                              f"(0 to {vocab_size - 1}).", "Give an id below the vocabulary size, or drop the flag.")


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
