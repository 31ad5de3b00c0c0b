"""Per-GPU-batch state across steps: which cached tokens are real (left padding) and positions."""
from __future__ import annotations

import torch

from kernels.attention import padding_mask

from .models.base import BatchView


class BatchState:
    def __init__(self, prompt_mask: torch.Tensor, max_len: int, device: torch.device):
        b, s = prompt_mask.shape
        self.key_valid = torch.zeros(b, max_len, dtype=torch.bool, device=device)
        self.key_valid[:, :s] = prompt_mask.to(device=device, dtype=torch.bool)
        self.length = 0  # tokens already in the KV cache
        self.padded = not bool(self.key_valid[:, :s].all())
        self._masks: dict[tuple[str, int, int], torch.Tensor | None] = {}

    def view(self, num_new: int, prefill: bool) -> BatchView:
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

    def advance(self, num_new: int) -> None:
        self.length += num_new
        self._masks.clear()
        if self.length < self.key_valid.shape[1]:
            self.key_valid[:, self.length] = True  # generated tokens are always attended
