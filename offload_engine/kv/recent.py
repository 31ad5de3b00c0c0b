"""The newest tokens of each sequence, kept exact beside a packed cache's attention.

- RecentTokens, KIVI's residual: keys are quantized per channel over whole blocks of tokens
  (kernels/quant/kivi.py), so a block is written to the cache's home only once its last token
  has arrived; until then its tokens sit here, in the compute dtype. Blocks are aligned to
  token slots (left padding included), so every sequence of a batch fills its block at once.
- ExactRing, for per-token records (H2O's slots): each token is packed at once, and the newest
  RECENT_EXACT of them are also kept here and attended instead of their records.
"""
from __future__ import annotations

import torch

from offload_engine.kernels.quant.kivi import BLOCK
from offload_engine.policies.kv_policy import RECENT_EXACT_TOKENS


class RecentTokens:
    """The tokens of the current, unfinished block of one cache item: (BLOCK, B, H, D) keys and values."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(BLOCK, batch, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @staticmethod
    def block_start(t: int) -> int:
        """The first slot of the block holding slot t: every slot before it is in the home."""
        return t - t % BLOCK

    def with_new(self, t: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact tokens from block_start(t) up to the new ones (t, t + s), token-major."""
        r = t % BLOCK
        if r == 0:
            return k_new, v_new
        return torch.cat([self.k[:r], k_new]), torch.cat([self.v[:r], v_new])

    def append(self, t: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Take tokens [t, t + s); return (start, keys, values) of the whole blocks they complete,
        exact and token-major, for the caller to encode and write home, or None."""
        r, s = t % BLOCK, k_new.shape[0]
        if r + s < BLOCK:
            self.k[r:r + s] = k_new
            self.v[r:r + s] = v_new
            return None
        k_all, v_all = self.with_new(t, k_new, v_new)
        whole = (r + s) // BLOCK * BLOCK
        rest = r + s - whole
        self.k[:rest] = k_all[whole:]
        self.v[:rest] = v_all[whole:]
        return t - r, k_all[:whole], v_all[:whole]


RECENT_EXACT = RECENT_EXACT_TOKENS  # read at use, so tests can shorten it


class ExactRing:
    """Each sequence's newest RECENT_EXACT tokens, exact, by position mod RECENT_EXACT: a cache
    whose records stand alone (per-token groups, as H2O's slots need) is written packed at once,
    and attention reads these tokens from here instead of their rounded records: KIVI's finding
    that the newest tokens matter most, for a layout without blocks."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 size: int | None = None):
        self.size = size or RECENT_EXACT
        self.k = torch.zeros(batch, heads, self.size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write_prompt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The prompt's last tokens; k/v (B, s, H, D) at positions 0..s-1."""
        s = k.shape[1]
        positions = torch.arange(max(0, s - self.size), s, device=k.device)
        self.k[:, :, positions.to(self.k.device) % self.size] = k[:, positions].transpose(1, 2).to(self.k)
        self.v[:, :, positions.to(self.k.device) % self.size] = v[:, positions].transpose(1, 2).to(self.v)

    def write(self, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A decode step's token (B, H, D)."""
        self.k[:, :, position % self.size] = k
        self.v[:, :, position % self.size] = v

    def substitute(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, newest: int):
        """keys/values (B, H, C, D) read from the records of the tokens at `position` (B, H, C; -1:
        none); those within RECENT_EXACT of `newest` are replaced by their exact values."""
        near = ((position > newest - self.size) & (position >= 0))[..., None]
        index = (position.clamp(min=0) % self.size)[..., None].expand(-1, -1, -1, keys.shape[-1])
        return (torch.where(near, self.k.gather(2, index).to(keys.dtype), keys),
                torch.where(near, self.v.gather(2, index).to(values.dtype), values))
