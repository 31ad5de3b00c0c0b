"""The KV cache: one (keys, values) pair per attention layer and GPU batch, on its home tier.

Storage is token-major, (max_len, B, H, D), so the first t tokens are one contiguous block
to copy and one new token is one contiguous row to append. How a layer reaches its cache is
decided here, not in the model: attention runs where the cache is (GPU, or CPU with
--cpu-cache-compute), or the cache is streamed into a GPU staging slot first.
A KV policy (eviction, selection, compression) plugs in by replacing the access objects.
"""
from __future__ import annotations

import torch

from kernels.attention import attention
from policies.memory import MemoryPlan

from .batch import BatchState
from .models.base import KVSpec, Layer
from .profiler import Profiler
from .tiers import Storage, Tier
from .transfer import Mover, Pending


class KVCacheStore:
    def __init__(self, layers: list[Layer], plan: MemoryPlan, storages: dict[Tier, Storage], batch_size: int,
                 max_len: int, dtype: torch.dtype, device: torch.device, mover: Mover, profiler: Profiler,
                 cpu_compute: bool):
        self.device, self.mover, self.profiler, self.cpu_compute = device, mover, profiler, cpu_compute
        self.homes: dict[tuple[int, int], tuple[Tier, torch.Tensor, torch.Tensor]] = {}
        self.last_store: dict[tuple[int, int], list[Pending]] = {}
        spec: KVSpec | None = None
        for (j, k), tier in plan.kv_tiers.items():
            spec = layers[j].kv_spec
            shape = (max_len, batch_size, spec.num_heads, spec.head_dim)
            st = storages[tier]
            self.homes[(j, k)] = (tier, st.allocate(shape, dtype, f"kv_{j}_{k}_k"), st.allocate(shape, dtype, f"kv_{j}_{k}_v"))
            self.last_store[(j, k)] = []
        self.slots = []
        for n in range(plan.kv_slots):
            st = storages[Tier.GPU]
            self.slots.append((st.allocate(shape, dtype, f"kv_slot{n}_k"), st.allocate(shape, dtype, f"kv_slot{n}_v")))
        self._fetched: dict[tuple[int, int], tuple[int, Pending]] = {}
        self._next_slot = 0

    def _streamed(self, item: tuple[int, int]) -> bool:
        tier = self.homes[item][0]
        return tier == Tier.DISK or (tier == Tier.CPU and not self.cpu_compute)

    def prefetch(self, item: tuple[int, int], state: BatchState, prefill: bool) -> None:
        """Start copying an item's cached tokens into a GPU slot (decode steps only)."""
        if prefill or item not in self.homes or not self._streamed(item) or item in self._fetched:
            return
        tier, k_home, v_home = self.homes[item]
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(self.slots)
        t = state.length
        after = self.last_store[item]
        k_buf, v_buf = self.slots[slot]
        disk = tier == Tier.DISK
        pends = [self.mover.load(k_buf[:t], k_home[:t], "kv_io", from_disk=disk, after=after),
                 self.mover.load(v_buf[:t], v_home[:t], "kv_io", from_disk=disk, after=after)]
        self._fetched[item] = (slot, pends)

    def access(self, item: tuple[int, int], state: BatchState, prefill: bool) -> "CacheAccess":
        tier, k_home, v_home = self.homes[item]
        if tier == Tier.GPU:
            return CacheAccess(self, item, state, k_home, v_home, store=False)
        if prefill:
            return CacheAccess(self, item, state, None, None, store=True)
        if not self._streamed(item):
            return CpuCacheAccess(self, item, state)
        self.prefetch(item, state, prefill)
        slot, pends = self._fetched.pop(item)
        for p in pends:
            p.wait()
        k_buf, v_buf = self.slots[slot]
        return CacheAccess(self, item, state, k_buf, v_buf, store=True)

    def store(self, item: tuple[int, int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new tokens (s, B, H, D) back to the item's home."""
        tier, k_home, v_home = self.homes[item]
        disk = tier == Tier.DISK
        s = k.shape[0]
        self.last_store[item] = [self.mover.store(k_home[start:start + s], k, "kv_io", to_disk=disk),
                                 self.mover.store(v_home[start:start + s], v, "kv_io", to_disk=disk)]


class CacheAccess:
    """Attention on the compute device over a cache there: its home, or a staging slot.

    With `k_cache` None (prefill of an offloaded item) attention runs on the new tokens alone.
    With `store`, the new tokens are also written back to the home tier.
    """

    def __init__(self, owner: KVCacheStore, item, state: BatchState, k_cache, v_cache, store: bool):
        self.owner, self.item, self.state = owner, item, state
        self.k_cache, self.v_cache, self.store = k_cache, v_cache, store

    def attend(self, q, k, v):
        t, s = self.state.length, q.shape[1]
        k_new, v_new = k.transpose(0, 1), v.transpose(0, 1)  # (s, B, H, D)
        if self.k_cache is not None:
            self.k_cache[t:t + s].copy_(k_new)
            self.v_cache[t:t + s].copy_(v_new)
        if t == 0:  # prefill: the new tokens are the whole sequence
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        else:
            keys, values = self.k_cache[:t + s].permute(1, 2, 0, 3), self.v_cache[:t + s].permute(1, 2, 0, 3)
        out = attention(q.transpose(1, 2), keys, values, self.state.mask(s, q.device))
        if self.store:
            self.owner.store(self.item, t, k_new.contiguous(), v_new.contiguous())
        return out.transpose(1, 2)


class CpuCacheAccess:
    """Decode attention on the CPU, where the cache lives: only q/k/v of the new token cross PCIe."""

    def __init__(self, owner: KVCacheStore, item, state: BatchState):
        self.owner, self.item, self.state = owner, item, state

    def attend(self, q, k, v):
        owner = self.owner
        _, k_home, v_home = owner.homes[self.item]
        for p in owner.last_store[self.item]:
            p.synchronize()
        owner.last_store[self.item] = []
        t, s = self.state.length, q.shape[1]
        with owner.profiler.span("cpu_attention", None, host=True):
            qkv = torch.stack([q, k, v]).transpose(1, 2).to("cpu")  # one device-to-host copy: (3, s, B, H, D)
            k_home[t:t + s].copy_(qkv[1])
            v_home[t:t + s].copy_(qkv[2])
            qc = qkv[0].permute(1, 2, 0, 3)
            keys, values = k_home[:t + s].permute(1, 2, 0, 3), v_home[:t + s].permute(1, 2, 0, 3)
            out = attention(qc, keys, values, self.state.mask(s, torch.device("cpu")))
        return out.transpose(1, 2).to(q.device)
