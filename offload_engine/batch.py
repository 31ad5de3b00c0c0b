"""Per-GPU-batch state across steps: which cached tokens are real (left padding) and positions.

States live as long as the engine (their tensors are the inputs a captured decode graph reads):
`reset` loads a new batch of prompts into them.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from offload_engine.kernels.attention import padding_mask

from .models.base import BatchView


class BatchState:
    def __init__(self, batch: int, max_len: int, device: torch.device):
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # tokens already in the KV cache
        self.padded = False
        self._masks: dict[tuple, torch.Tensor | None] = {}
        # Device-side copies of what a captured decode step reads (static shapes, no host values).
        self.static = False
        self.length_t = torch.zeros((), dtype=torch.int64, device=device)
        self.end_t = torch.zeros((), dtype=torch.int64, device=device)  # length + the new token
        self.key_start_t = torch.zeros(batch, dtype=torch.int64, device=device)  # where left padding ends
        self.positions_t = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self._prompt_valid = torch.zeros(batch, dtype=torch.int64, device=device)
        self._prompt_len = 0

    def reset(self, prompt_mask: torch.Tensor) -> "BatchState":
        s = prompt_mask.shape[1]
        self.key_valid.zero_()
        self.key_valid[:, :s] = prompt_mask.to(device=self.key_valid.device, dtype=torch.bool)
        self.length, self.static, self._prompt_len = 0, False, s
        self.padded = not bool(self.key_valid[:, :s].all())
        self._prompt_valid.copy_(self.key_valid[:, :s].sum(-1))
        torch.sub(s, self._prompt_valid, out=self.key_start_t)  # padding is on the left, contiguous
        self._masks.clear()
        return self

    @property
    def prompt_len(self) -> int:
        """Tokens of the (left-padded) prompt: steps below it are prefill chunks."""
        return self._prompt_len

    @property
    def in_prefill(self) -> bool:
        """Whether the tokens being added now belong to the prompt (a prefill chunk)."""
        return self.length < self._prompt_len

    @contextmanager
    def at(self, start: int):
        """The state as one chunk of a chunked prefill sees it: `start` prompt tokens cached."""
        saved, self.length = self.length, start
        try:
            yield self
        finally:
            self.length = saved

    def view(self, num_new: int, prefill: bool) -> BatchView:
        if self.static:
            return BatchView(positions=self.positions_t, prefill=False)
        valid = self.key_valid[:, : self.length + num_new].long()
        positions = (valid.cumsum(1) * valid - 1)[:, self.length:]
        return BatchView(positions=positions, prefill=prefill)

    def mask(self, num_new: int, device: torch.device) -> torch.Tensor | None:
        """Attention mask for the new tokens over all tokens so far; None if no row is padded."""
        if not self.padded:
            return None
        key = (str(device), self.length, num_new)
        if key not in self._masks:
            self._masks[key] = padding_mask(self.key_valid[:, : self.length + num_new], num_new).to(device)
        return self._masks[key]

    def valid_on(self, device: torch.device) -> torch.Tensor:
        """key_valid up to and including the current step's new token, on `device` (one copy per
        step, shared by every layer)."""
        key = ("valid", str(device), self.length)
        if key not in self._masks:
            self._masks[key] = self.key_valid[:, : self.length + 1].to(device)
        return self._masks[key]

    def load_static(self) -> None:
        """Before a captured step: the device copies of length and the new token's position."""
        self.length_t.fill_(self.length)
        self.end_t.fill_(self.length + 1)
        torch.add(self._prompt_valid, self.length - self._prompt_len, out=self.positions_t[:, 0])

    def advance(self, num_new: int) -> None:
        self.length += num_new
        self._masks.clear()
        if self.length < self.key_valid.shape[1]:
            self.key_valid[:, self.length] = True  # generated tokens are always attended
