"""HiP's hot-block cache: the GPU holds only the key blocks the current selections need, the full
KV cache stays in its home (pinned CPU memory or disk).

Per (layer, GPU batch) item, on the GPU:
- `reps`: the first key of every block of `block_size_k` tokens: the only keys the tree search
  reads (its chunks start on block boundaries; the sink keeps the first search block aligned).
  That is 1/(2 * block_size_k) of the cache.
- a pool of `capacity` block slots per (sequence, KV head) for keys and values, with an LRU map
  between logical blocks and slots.
Each step the needed blocks (the union of the group's query-head selections) are looked up;
misses take the least recently used slots and are gathered from the home in one batched copy
per layer (host gather into pinned staging, one host-to-device copy). Between HiP refreshes the
needed blocks are the last selection plus the window, which are resident: nothing crosses PCIe
but the new token. Hits and lookups are counted for the hit rate.
"""
from __future__ import annotations

import torch

BIG = 2**30


class HotBlockCache:
    """Maps carry one spare ("dummy") column that absorbs the writes of empty entries, so every
    update is a plain scatter with distinct real indices: deterministic, no host sync."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, block_size: int, capacity_blocks: int,
                 dtype: torch.dtype, device: torch.device):
        self.bk, self.capacity = block_size, capacity_blocks
        self.blocks = -(-max_len // block_size)
        shape = (batch, kv_heads)
        self.reps = torch.zeros(*shape, self.blocks, head_dim, dtype=dtype, device=device)
        self.pool_k = torch.zeros(*shape, (capacity_blocks + 1) * block_size, head_dim, dtype=dtype, device=device)
        self.pool_v = torch.zeros_like(self.pool_k)
        self.slot_of = torch.full((*shape, self.blocks + 1), -1, dtype=torch.int64, device=device)
        self.block_of = torch.full((*shape, capacity_blocks + 1), -1, dtype=torch.int64, device=device)
        self.stamp = torch.full((*shape, capacity_blocks + 1), -1, dtype=torch.int64, device=device)
        self.clock = 0
        self.hits = torch.zeros((), dtype=torch.int64, device=device)
        self.lookups = torch.zeros((), dtype=torch.int64, device=device)

    def rep_keys(self, length: int) -> torch.Tensor:
        """A (B, Hkv, length, D) view whose position j * bk holds block j's first key: all the tree
        search reads (other positions of the view are not keys and are never read)."""
        b, h, _, d = self.reps.shape
        s = self.reps.stride()
        return self.reps.as_strided((b, h, length, d), (s[0], s[1], d // self.bk, s[3]))

    def write_reps(self, start: int, keys: torch.Tensor) -> None:
        """Record the block-start keys among new tokens at positions start.. (keys (B, Hkv, s, D))."""
        first = -(-start // self.bk) * self.bk
        pos = torch.arange(first, start + keys.shape[2], self.bk)
        if pos.numel():
            self.reps[:, :, (pos // self.bk).to(self.reps.device)] = keys[:, :, (pos - start).to(keys.device)]

    def lookup(self, needed: torch.Tensor):
        """Slots of the needed logical blocks (B, Hkv, N) (distinct, -1 = none); misses take the
        least recently used slots. Returns (slots, miss blocks, their slots), -1 where none.
        The needed blocks must fit the capacity (the plan sizes it for one step's working set)."""
        self.clock += 1
        nb, cap = self.blocks, self.capacity
        needed = needed.long()
        want = needed >= 0
        index = torch.where(want, needed, nb)
        slots = self.slot_of.gather(-1, index)
        miss = want & (slots < 0)
        self.hits += (want & ~miss).sum()
        self.lookups += want.sum()
        self.stamp.scatter_(-1, torch.where(slots >= 0, slots, cap), self.clock)  # protect what is needed
        width = min(needed.shape[-1], cap)  # misses never exceed the slots not needed this step
        miss_blocks = torch.where(miss, needed, BIG).sort(-1).values[..., :width]  # the misses first
        take = miss_blocks < BIG
        victims = self.stamp[..., :cap].argsort(dim=-1, stable=True)[..., :width]  # free (-1), then oldest
        victim = torch.where(take, victims, cap)
        evicted = torch.where(take, self.block_of.gather(-1, victim), -1)
        self.slot_of.scatter_(-1, torch.where(evicted >= 0, evicted, nb), -1)
        self.slot_of.scatter_(-1, torch.where(take, miss_blocks, nb), torch.where(take, victims, -1))
        self.block_of.scatter_(-1, victim, torch.where(take, miss_blocks, -1))
        self.stamp.scatter_(-1, victim, self.clock)
        return self.slot_of.gather(-1, index), torch.where(take, miss_blocks, -1), torch.where(take, victims, -1)

    def fill(self, miss_blocks: torch.Tensor, victim_slots: torch.Tensor, home_k: torch.Tensor,
             home_v: torch.Tensor, length: int) -> None:
        """Copy missed blocks from the token-major home (T, B, Hkv, D) on the host into their slots.

        The block list crosses to the host (one small copy), the host gathers the tokens into one
        buffer, one copy brings it to the GPU. Tokens at or beyond `length` are not in the home
        yet: they arrive as zeros.
        """
        width = int((miss_blocks >= 0).sum(-1).max()) if miss_blocks.numel() else 0
        if width == 0:
            return
        blocks = miss_blocks[..., :width].cpu()
        b, h = blocks.shape[:2]
        tok = blocks.clamp(min=0)[..., None] * self.bk + torch.arange(self.bk)  # (B, Hkv, M, bk)
        rows = torch.arange(b).view(b, 1, 1, 1).expand_as(tok)
        heads = torch.arange(h).view(1, h, 1, 1).expand_as(tok)
        inside = (tok < length) & (blocks >= 0)[..., None]
        safe = torch.where(inside, tok, 0)
        data = torch.stack([home_k[safe, rows, heads], home_v[safe, rows, heads]])  # (2, B, Hkv, M, bk, D)
        data = data.masked_fill(~inside[None, ..., None], 0).to(self.pool_k.device)
        slots = torch.where(victim_slots[..., :width] >= 0, victim_slots[..., :width], self.capacity)  # dummy
        dst = (slots[..., None] * self.bk + torch.arange(self.bk, device=slots.device)).flatten(2)
        dst = dst[..., None].expand(-1, -1, -1, self.pool_k.shape[-1])
        self.pool_k.scatter_(2, dst, data[0].flatten(2, 3))
        self.pool_v.scatter_(2, dst, data[1].flatten(2, 3))

    def write_token(self, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The new token (B, Hkv, D) into its block's slot (resident: the window needs it)."""
        slot = self.slot_of[:, :, position // self.bk]
        index = (slot * self.bk + position % self.bk)[..., None, None].expand(-1, -1, 1, k.shape[-1])
        self.pool_k.scatter_(2, index, k[:, :, None])
        self.pool_v.scatter_(2, index, v[:, :, None])

    def hit_rate(self) -> float:
        lookups = int(self.lookups)
        return int(self.hits) / lookups if lookups else 1.0
