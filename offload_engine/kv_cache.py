"""The KV cache: one (keys, values) pair per attention layer and GPU batch, on its home tier.

Homes that the GPU reads (GPU-resident, or streamed from CPU/disk into a GPU staging slot)
are token-major, (max_len, B, H, D): the first t tokens are one contiguous block to copy.
Homes that the CPU attends over (--cpu-cache-compute) are head-major, (B, H, max_len, D):
each head's keys are contiguous, which makes CPU attention about 30% faster; their prompt
is written through a pinned staging buffer, since a strided device-to-host copy would go
through pageable memory.

How a layer reaches its cache is decided here, not in the model (see kv_access.py).
A KV policy (eviction, selection, compression) plugs in by replacing the access objects.
"""
from __future__ import annotations

import torch

from policies.memory import MemoryPlan

from .batch import BatchState
from .kv_access import CacheAccess, CpuCacheAccess
from .models.base import Layer
from .profiler import Profiler
from .tiers import Storage, Tier
from .transfer import Mover, Pending

Item = tuple[int, int]  # (layer index, gpu batch)


class KVCacheStore:
    def __init__(self, layers: list[Layer], plan: MemoryPlan, storages: dict[Tier, Storage], batch_size: int,
                 prompt_len: int, max_len: int, dtype: torch.dtype, mover: Mover, profiler: Profiler,
                 cpu_compute: bool):
        self.mover, self.profiler, self.cpu_compute = mover, profiler, cpu_compute
        self.homes: dict[Item, tuple[Tier, torch.Tensor, torch.Tensor]] = {}
        self.head_major: dict[Item, bool] = {}
        self.last_store: dict[Item, list[Pending]] = {}
        token_shape = head_shape = None
        for (j, k), tier in plan.kv_tiers.items():
            spec = layers[j].kv_spec
            token_shape = (max_len, batch_size, spec.num_heads, spec.head_dim)
            head_shape = (batch_size, spec.num_heads, max_len, spec.head_dim)
            major = tier == Tier.CPU and cpu_compute
            shape = head_shape if major else token_shape
            st = storages[tier]
            self.homes[(j, k)] = (tier, st.allocate(shape, dtype, f"kv_{j}_{k}_k"),
                                  st.allocate(shape, dtype, f"kv_{j}_{k}_v"))
            self.head_major[(j, k)] = major
            self.last_store[(j, k)] = []
        gpu, cpu = storages[Tier.GPU], storages[Tier.CPU]
        self.slots = [(gpu.allocate(token_shape, dtype, f"kv_slot{n}_k"), gpu.allocate(token_shape, dtype, f"kv_slot{n}_v"))
                      for n in range(plan.kv_slots)]
        staging = (head_shape[0], head_shape[1], prompt_len, head_shape[3]) if head_shape else None
        self.staging = [(cpu.allocate(staging, dtype, f"kv_staging{n}_k"), cpu.allocate(staging, dtype, f"kv_staging{n}_v"))
                        for n in range(plan.kv_staging_slots)]
        self._staging_busy: list[Pending | None] = [None] * len(self.staging)
        self._fetched: dict[Item, tuple[int, list[Pending]]] = {}
        self._next_slot = 0
        self._next_staging = 0

    def _streamed(self, item: Item) -> bool:
        tier = self.homes[item][0]
        return tier == Tier.DISK or (tier == Tier.CPU and not self.cpu_compute)

    def prefetch(self, item: Item, state: BatchState, prefill: bool) -> None:
        """Start copying an item's cached tokens into a GPU slot (decode steps only)."""
        if prefill or item not in self.homes or not self._streamed(item) or item in self._fetched:
            return
        tier, k_home, v_home = self.homes[item]
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(self.slots)
        t, after, disk = state.length, self.last_store[item], tier == Tier.DISK
        k_buf, v_buf = self.slots[slot]
        self._fetched[item] = (slot, [self.mover.load(k_buf[:t], k_home[:t], "kv_io", from_disk=disk, after=after),
                                      self.mover.load(v_buf[:t], v_home[:t], "kv_io", from_disk=disk, after=after)])

    def access(self, item: Item, state: BatchState, prefill: bool):
        tier, k_home, v_home = self.homes[item]
        if tier == Tier.GPU:
            return CacheAccess(self, item, state, k_home, v_home, store=False)
        if prefill:
            return CacheAccess(self, item, state, None, None, store=True)
        if not self._streamed(item):
            for p in self.last_store[item]:
                p.synchronize()
            self.last_store[item] = []
            return CpuCacheAccess(self.profiler, state, k_home, v_home)
        self.prefetch(item, state, prefill)
        slot, pends = self._fetched.pop(item)
        for p in pends:
            p.wait()
        k_buf, v_buf = self.slots[slot]
        return CacheAccess(self, item, state, k_buf, v_buf, store=True)

    def store(self, item: Item, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new tokens (s, B, H, D views), on the compute device, back to the item's home.

        Each layout gets one contiguous copy on the device, then one transfer.
        """
        tier, k_home, v_home = self.homes[item]
        if self.head_major[item]:
            self._store_head_major(item, start, k, v)
            return
        disk, s = tier == Tier.DISK, k.shape[0]
        self.last_store[item] = [self.mover.store(k_home[start:start + s], k.contiguous(), "kv_io", to_disk=disk),
                                 self.mover.store(v_home[start:start + s], v.contiguous(), "kv_io", to_disk=disk)]

    def _store_head_major(self, item: Item, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        _, k_home, v_home = self.homes[item]
        n = self._next_staging
        self._next_staging = (n + 1) % len(self.staging)
        if self._staging_busy[n] is not None:
            self._staging_busy[n].synchronize()
        s = k.shape[0]
        copies = []
        for new, stage, home in ((k, self.staging[n][0], k_home), (v, self.staging[n][1], v_home)):
            new = new.permute(1, 2, 0, 3).contiguous()  # (B, H, s, D), one contiguous block
            view = stage.view(-1)[: new.numel()].view(new.shape)
            copies.append((self.mover.store(view, new, "kv_io"), view, home[:, :, start:start + s]))

        def scatter() -> None:  # staging -> the strided home region, on the host
            for pending, view, dst in copies:
                pending.synchronize()
                dst.copy_(view)

        done = self.mover.on_host(scatter)
        self._staging_busy[n] = done
        self.last_store[item] = [done]
