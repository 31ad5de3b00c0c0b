"""HiP's hot-block cache: the GPU holds only the key blocks the current selections need, the full
KV cache stays in its home (pinned CPU memory or disk).

Per (layer, GPU batch) item, on the GPU:
- `reps`: the first key of every block of `block_size_k` tokens: the only keys the tree search
  reads (its chunks start on block boundaries; the sink keeps the first search block aligned).
  That is 1/(2 * block_size_k) of the cache.
- a pool of `capacity` block slots per (sequence, KV head) for keys and values, with an LRU map
  between logical blocks and slots.
Each step the needed blocks (the union of the group's query-head selections) are looked up;
misses take the least recently used slots and are copied from the home by one kernel per layer
that reads the pinned home in place through its mapping (kernels/hip/fetch.py): no host
synchronisation, only missed blocks cross PCIe. A home on disk is gathered on the host instead.
Between HiP refreshes the needed blocks are the last selection plus the window, which are
resident: nothing crosses PCIe but the new token. Hits and lookups are counted for the hit rate.
"""
from __future__ import annotations

import torch

from offload_engine.kernels.hip.fetch import fetch_blocks, fetch_blocks_torch

BIG = 2**30


class HotBlockCache:
    """Maps carry one spare ("dummy") column that absorbs the writes of empty entries, so every
    update is a plain scatter with distinct real indices: deterministic, no host sync."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, block_size: int, capacity_blocks: int,
                 dtype: torch.dtype, device: torch.device):
        self.bk, self.capacity = block_size, capacity_blocks
        self.blocks = -(-max_len // block_size)
        shape = (batch, kv_heads)
        # One spare row: rep_keys' strided view of `length` positions ends d - d / bk elements
        # past the last block's key.
        self.reps = torch.zeros(*shape, self.blocks + 1, head_dim, dtype=dtype, device=device)
        self.pool_k = torch.zeros(*shape, (capacity_blocks + 1) * block_size, head_dim, dtype=dtype, device=device)
        self.pool_v = torch.zeros_like(self.pool_k)
        self.slot_of = torch.full((*shape, self.blocks + 1), -1, dtype=torch.int64, device=device)
        self.block_of = torch.full((*shape, capacity_blocks + 1), -1, dtype=torch.int64, device=device)
        self.stamp = torch.full((*shape, capacity_blocks + 1), -1, dtype=torch.int64, device=device)
        self.clock = torch.zeros((), dtype=torch.int64, device=device)  # on the device: a captured step ticks it
        self.block_bytes = 2 * block_size * head_dim * self.pool_k.element_size()  # keys and values of one block
        self.hits = torch.zeros((), dtype=torch.int64, device=device)
        self.lookups = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Empty, in place, for a new prompt (the block-start keys are rewritten by its prefill)."""
        for t in (self.slot_of, self.block_of, self.stamp):
            t.fill_(-1)
        self.clock.zero_()

    def rep_keys(self, length: int) -> torch.Tensor:
        """A (B, Hkv, length, D) view whose position j * bk holds block j's first key: all the tree
        search reads (other positions of the view are not keys and are never read)."""
        b, h, _, d = self.reps.shape
        s = self.reps.stride()
        return self.reps.as_strided((b, h, length, d), (s[0], s[1], d // self.bk, s[3]))

    def write_reps(self, start: int, keys: torch.Tensor) -> None:
        """Record the block-start keys among new tokens at positions start.. (keys (B, Hkv, s, D)).
        Plain slices: no index tensor crosses to the device (a pageable copy would wait for it)."""
        first = -(-start // self.bk) * self.bk
        stop = start + keys.shape[2]
        if first < stop:
            n = -(-(stop - first) // self.bk)
            self.reps[:, :, first // self.bk:first // self.bk + n] = keys[:, :, first - start::self.bk]

    def lookup(self, needed: torch.Tensor):
        """Slots of the needed logical blocks (B, Hkv, N) (distinct, -1 = none); misses take the
        least recently used slots. Returns (slots, miss blocks, their slots), -1 where none.
        The needed blocks must fit the capacity (the plan sizes it for one step's working set)."""
        self.clock += 1
        clock = self.clock.expand(needed.shape)
        nb, cap = self.blocks, self.capacity
        needed = needed.long()
        want = needed >= 0
        index = torch.where(want, needed, nb)
        slots = self.slot_of.gather(-1, index)
        miss = want & (slots < 0)
        self.hits += (want & ~miss).sum()
        self.lookups += want.sum()
        self.stamp.scatter_(-1, torch.where(slots >= 0, slots, cap), clock)  # protect what is needed
        width = min(needed.shape[-1], cap)  # misses never exceed the slots not needed this step
        miss_blocks = torch.where(miss, needed, BIG).sort(-1).values[..., :width]  # the misses first
        take = miss_blocks < BIG
        victims = self.stamp[..., :cap].argsort(dim=-1, stable=True)[..., :width]  # free (-1), then oldest
        victim = torch.where(take, victims, cap)
        evicted = torch.where(take, self.block_of.gather(-1, victim), -1)
        self.slot_of.scatter_(-1, torch.where(evicted >= 0, evicted, nb), -1)
        self.slot_of.scatter_(-1, torch.where(take, miss_blocks, nb), torch.where(take, victims, -1))
        self.block_of.scatter_(-1, victim, torch.where(take, miss_blocks, -1))
        self.stamp.scatter_(-1, victim, clock[..., :victim.shape[-1]])
        return self.slot_of.gather(-1, index), torch.where(take, miss_blocks, -1), torch.where(take, victims, -1)

    def fill(self, miss_blocks: torch.Tensor, victim_slots: torch.Tensor, home_k: torch.Tensor,
             home_v: torch.Tensor, length: int, mapped: tuple[torch.Tensor, torch.Tensor] | None = None,
             spec=None) -> None:
        """Copy missed blocks from the token-major home (T, B, Hkv, D), or its packed records with
        `spec` (dequantized on arrival), into their slots. Tokens at or beyond `length` are not in
        the home yet: they arrive as zeros.

        `mapped`: the home as the pool's device reads it (pinned memory mapped into the GPU, or
        the device's own memory): the fetch kernel then copies only the missed blocks, with no
        host synchronisation. Otherwise (a memory-mapped disk file) the misses' width crosses to
        the host, which gathers their tokens.
        """
        if mapped is not None:
            fetch_blocks(self.pool_k, self.pool_v, mapped[0], mapped[1], miss_blocks, victim_slots, length, self.bk,
                         spec)
            return
        width = int((miss_blocks >= 0).sum(-1).max()) if miss_blocks.numel() else 0
        if width:
            fetch_blocks_torch(self.pool_k, self.pool_v, home_k, home_v, miss_blocks[..., :width].cpu(),
                               victim_slots[..., :width].cpu(), length, self.bk, spec)

    def write_rep_at(self, position: torch.Tensor, key: torch.Tensor) -> None:
        """`write_reps` for one token at a device position (1,): its key (B, Hkv, D) becomes its
        block's representative when it starts the block."""
        block = position // self.bk
        current = self.reps.index_select(2, block)
        first = (position % self.bk == 0).view(1, 1, 1, 1)
        self.reps.index_copy_(2, block, torch.where(first, key[:, :, None], current))

    def write_token_at(self, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write_token` at a device position (1,): no host value, for a captured step."""
        b, h = k.shape[:2]
        slot = self.slot_of.gather(-1, (position // self.bk).view(1, 1, 1).expand(b, h, 1))
        index = (slot * self.bk + position % self.bk)[..., None].expand(-1, -1, 1, k.shape[-1])
        self.pool_k.scatter_(2, index, k[:, :, None])
        self.pool_v.scatter_(2, index, v[:, :, None])

    def write_token(self, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The new token (B, Hkv, D) into its block's slot (resident: the window needs it)."""
        slot = self.slot_of[:, :, position // self.bk]
        index = (slot * self.bk + position % self.bk)[..., None, None].expand(-1, -1, 1, k.shape[-1])
        self.pool_k.scatter_(2, index, k[:, :, None])
        self.pool_v.scatter_(2, index, v[:, :, None])

    def hit_rate(self) -> float:
        lookups = int(self.lookups)
        return int(self.hits) / lookups if lookups else 1.0
