"""The KV cache: one (keys, values) pair per attention layer and GPU batch, on its home tier.

Homes that the GPU reads (GPU-resident, or streamed from CPU/disk into a GPU staging slot)
are token-major, (capacity, B, H, *tail): the first t tokens are one contiguous block to copy.
Homes that the CPU attends over (--cpu-cache-compute) are head-major, (B, H, capacity, *tail):
each head's keys are contiguous, which makes CPU attention about 30% faster; their prompt
is written through a pinned staging buffer, since a strided device-to-host copy would go
through pageable memory. `tail` is (head_dim,) or, compressed, (groups, record bytes).

The store moves bytes; what a layer's attention does with them (dense, H2O eviction, HiP
selection) is the KV policy's access object, handed the cache where it is (`CacheLocation`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_engine.policies.memory import MemoryPlan

from ..batch import BatchState
from ..models.base import Layer
from ..profiler import Profiler
from ..io.tiers import Storage, Tier
from ..io.transfer import Mover, Pending
from .recent import RecentTokens

Item = tuple[int, int]  # (layer index, gpu batch)


def max_kv_heads(layers: list[Layer]) -> int:
    return max((layer.kv_spec.num_heads for layer in layers if layer.kv_spec is not None), default=0)


@dataclass
class CacheLocation:
    """Where an item's cache can be attended this step.

    kind "gpu": the home is on the compute device; "slot": a GPU copy of a CPU/disk home (new
    tokens must also be written home); "prefill": an offloaded item's first step (no cache to
    read; new tokens are written home); "cpu": a head-major CPU home, attended on the CPU;
    "home": a CPU/disk home the policy reads selectively itself (HiP's hot-block cache).
    """

    kind: str
    k: torch.Tensor | None
    v: torch.Tensor | None
    # A chunked prefill's prompt so far, token-major (T, B, H, D) in the compute dtype on the GPU,
    # where the cache itself cannot serve the next chunk (off the GPU, packed, or evicting).
    buffer: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def writes_home(self) -> bool:
        return self.kind in ("slot", "prefill", "home")


class KVCacheStore:
    def __init__(self, layers: list[Layer], plan: MemoryPlan, storages: dict[Tier, Storage], batch_size: int,
                 prompt_len: int, capacity: int, codec, mover: Mover, profiler: Profiler, cpu_compute: bool):
        self.mover, self.profiler, self.cpu_compute, self.codec = mover, profiler, cpu_compute, codec
        self.capacity = capacity
        self.homes: dict[Item, tuple[Tier, torch.Tensor, torch.Tensor]] = {}
        self.head_major: dict[Item, bool] = {}
        self.last_store: dict[Item, list[Pending]] = {}
        token_shape = head_shape = None
        for (j, k), tier in plan.kv_tiers.items():
            spec = layers[j].kv_spec
            token_shape = (capacity, batch_size, spec.num_heads, *codec.tail)
            head_shape = (batch_size, spec.num_heads, capacity, *codec.tail)
            major = tier == Tier.CPU and cpu_compute
            st = storages[tier]
            shape = head_shape if major else token_shape
            self.homes[(j, k)] = (tier, st.allocate(shape, codec.dtype, f"kv_{j}_{k}_k"),
                                  st.allocate(shape, codec.dtype, f"kv_{j}_{k}_v"))
            if tier == Tier.GPU:  # a captured decode step attends unwritten (masked) slots: no NaN there
                self.homes[(j, k)][1].zero_()
                self.homes[(j, k)][2].zero_()
            self.head_major[(j, k)] = major
            self.last_store[(j, k)] = []
        gpu, cpu = storages[Tier.GPU], storages[Tier.CPU]
        self.slots = [(gpu.allocate(token_shape, codec.dtype, f"kv_slot{n}_k"),
                       gpu.allocate(token_shape, codec.dtype, f"kv_slot{n}_v")) for n in range(plan.kv_slots)]
        staging = (head_shape[0], head_shape[1], plan.prefill_tokens, *head_shape[3:]) if head_shape else None
        self.staging = [(cpu.allocate(staging, codec.dtype, f"kv_staging{n}_k"),
                         cpu.allocate(staging, codec.dtype, f"kv_staging{n}_v")) for n in range(plan.kv_staging_slots)]
        self._staging_busy: list[Pending | None] = [None] * len(self.staging)
        # Pinned scratch for per-head scatters (H2O's decode writes to a CPU or disk home).
        tail_shape = (batch_size, token_shape[2], *codec.tail) if token_shape else None
        self.scratch = [(cpu.allocate(tail_shape, codec.dtype, f"kv_scratch{n}_k"),
                         cpu.allocate(tail_shape, codec.dtype, f"kv_scratch{n}_v"),
                         cpu.allocate(tail_shape[:2], torch.int64, f"kv_scratch{n}_slots"))
                        for n in range(plan.kv_scratch_slots)]
        self._scratch_busy: list[Pending | None] = [None] * len(self.scratch)
        self._next_scratch = 0
        self._gpu, self._buffer_shape = gpu, (plan.prefill_buffer_tokens, batch_size, max_kv_heads(layers),
                                               codec.head_dim)
        self._buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fetched: dict[Item, tuple[int, list[Pending]]] = {}
        self._recent: dict[Item, RecentTokens] = {}  # a blocked codec's unfinished blocks (kv/recent.py)
        self._next_slot = 0
        self._next_staging = 0
        self.policy = None  # the KV policy: set by the engine, asked for access objects

    def attended_on_cpu(self, item: Item) -> bool:
        return self.homes[item][0] == Tier.CPU and self.cpu_compute

    def _streamed(self, item: Item) -> bool:
        tier = self.homes[item][0]
        return tier == Tier.DISK or (tier == Tier.CPU and not self.cpu_compute)

    def prefetch(self, item: Item, state: BatchState, prefill: bool) -> None:
        """Start copying an item's cached tokens into a GPU slot (decode steps only)."""
        if prefill or item not in self.homes or not self._streamed(item) or item in self._fetched \
                or not self.policy.streams_cache:
            return
        tier, k_home, v_home = self.homes[item]
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(self.slots)
        t, after, disk = self.policy.stored_tokens(state), self.last_store[item], tier == Tier.DISK
        k_buf, v_buf = self.slots[slot]
        self._fetched[item] = (slot, [self.mover.load(k_buf[:t], k_home[:t], "kv_io", from_disk=disk, after=after),
                                      self.mover.load(v_buf[:t], v_home[:t], "kv_io", from_disk=disk, after=after)])

    def locate(self, item: Item, state: BatchState, prefill: bool) -> CacheLocation:
        tier, k_home, v_home = self.homes[item]
        if tier == Tier.GPU:
            return CacheLocation("gpu", k_home, v_home)
        if prefill:
            return CacheLocation("prefill", None, None)
        if not self._streamed(item):
            self.wait_stores(item)
            return CacheLocation("cpu", k_home, v_home)
        if not self.policy.streams_cache:
            return CacheLocation("home", k_home, v_home)
        self.prefetch(item, state, prefill)
        slot, pends = self._fetched.pop(item)
        for p in pends:
            p.wait()
        k_buf, v_buf = self.slots[slot]
        return CacheLocation("slot", k_buf, v_buf)

    def prompt_buffer(self, item: Item, chunked: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The GPU buffer a chunked prefill of `item` gathers its prompt in, or None where the
        cache itself holds the prompt in the compute dtype on the GPU. Items are prefilled one
        after another on the compute stream, so they share one buffer."""
        if not chunked:
            return None
        tier = self.homes[item][0]
        if tier == Tier.GPU and not self.codec.packed and not self.policy.chunks_need_buffer:
            return None
        if self._buffer is None:
            if self._buffer_shape[0] == 0:
                raise RuntimeError("the memory plan reserved no prefill buffer for a chunked prefill")
            dtype = self.codec.compute_dtype
            self._buffer = (self._gpu.allocate(self._buffer_shape, dtype, "kv_prefill_k"),
                            self._gpu.allocate(self._buffer_shape, dtype, "kv_prefill_v"))
        heads = self.homes[item][1].shape[2 if not self.head_major[item] else 1]
        return self._buffer[0][..., :heads, :], self._buffer[1][..., :heads, :]

    def recent(self, item: Item, device: torch.device) -> RecentTokens:
        """The exact tokens of the item's unfinished block, beside its attention on `device` (a
        CPU-attended item's prefill runs on the GPU: its tokens follow it to the CPU once)."""
        if item not in self._recent:
            home = self.homes[item][1]
            batch, heads = (home.shape[0], home.shape[1]) if self.head_major[item] else (home.shape[1], home.shape[2])
            self._recent[item] = RecentTokens(batch, heads, self.codec.head_dim, self.codec.compute_dtype, device)
        recent = self._recent[item]
        if recent.k.device != device:
            recent.k, recent.v = recent.k.to(device), recent.v.to(device)
        return recent

    def order_after_stores(self) -> None:
        """Order the current stream after every write-back in flight, without blocking the host
        (a captured decode step writes and reads homes in place, after the prefill's copies)."""
        for item, pending in self.last_store.items():
            for p in pending:
                p.wait()

    def wait_stores(self, item: Item) -> None:
        """Block until the item's earlier write-backs have reached its home."""
        for p in self.last_store[item]:
            p.synchronize()
        self.last_store[item] = []

    def access(self, item: Item, state: BatchState, prefill: bool, chunked: bool = False):
        """The object behind `LayerContext.kv` for this item and step (`chunked`: one chunk of a
        chunked prefill)."""
        where = self.locate(item, state, prefill)
        where.buffer = self.prompt_buffer(item, chunked)
        return self.policy.access(self, item, state, where)

    def store(self, item: Item, start: int, k: torch.Tensor, v: torch.Tensor, append: bool = False) -> None:
        """Write encoded tokens (s, B, H, *tail), on the compute device, to the item's home at `start`.

        Each layout gets one contiguous copy on the device, then one transfer. `append`: the
        item's earlier writes are still to be waited for (the chunks of one prefill).
        """
        tier, k_home, v_home = self.homes[item]
        earlier = self.last_store[item] if append else []
        if self.head_major[item]:
            self._store_head_major(item, start, k, v)
        else:
            disk, s = tier == Tier.DISK, k.shape[0]
            self.last_store[item] = [self.mover.store(k_home[start:start + s], k.contiguous(), "kv_io", to_disk=disk),
                                     self.mover.store(v_home[start:start + s], v.contiguous(), "kv_io", to_disk=disk)]
        self.last_store[item] = earlier + self.last_store[item]

    def scatter(self, item: Item, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token per (row, head), k/v (B, H, *tail), into token slot `slots` (B, H) of the home.

        The few bytes cross to a pinned scratch buffer on the store stream; the scatter into the
        home (CPU memory or a memory-mapped file) runs on the host after that copy.
        """
        _, k_home, v_home = self.homes[item]
        n = self._next_scratch
        self._next_scratch = (n + 1) % len(self.scratch)
        if self._scratch_busy[n] is not None:
            self._scratch_busy[n].synchronize()
        k_buf, v_buf, slot_buf = self.scratch[n]
        copies = [self.mover.store(k_buf, k.contiguous(), "kv_io"), self.mover.store(v_buf, v.contiguous(), "kv_io"),
                  self.mover.store(slot_buf, slots.to(torch.int64).contiguous(), "kv_io")]
        b, h = slots.shape
        rows, heads = torch.arange(b)[:, None].expand(b, h), torch.arange(h)[None, :].expand(b, h)
        head_major = self.head_major[item]

        def write() -> None:
            for pending in copies:
                pending.synchronize()
            index = (rows, heads, slot_buf) if head_major else (slot_buf, rows, heads)
            k_home[index] = k_buf
            v_home[index] = v_buf

        done = self.mover.on_host(write)
        self._scratch_busy[n] = done
        self.last_store[item] = [done]

    def _store_head_major(self, item: Item, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        _, k_home, v_home = self.homes[item]
        n = self._next_staging
        self._next_staging = (n + 1) % len(self.staging)
        if self._staging_busy[n] is not None:
            self._staging_busy[n].synchronize()
        s = k.shape[0]
        copies = []
        for new, stage, home in ((k, self.staging[n][0], k_home), (v, self.staging[n][1], v_home)):
            new = new.permute(1, 2, 0, *range(3, new.dim())).contiguous()  # (B, H, s, *tail), one block
            view = stage.view(-1)[: new.numel()].view(new.shape)
            copies.append((self.mover.store(view, new, "kv_io"), view, home[:, :, start:start + s]))

        def scatter() -> None:  # staging -> the strided home region, on the host
            for pending, view, dst in copies:
                pending.synchronize()
                dst.copy_(view)

        done = self.mover.on_host(scatter)
        self._staging_busy[n] = done
        self.last_store[item] = [done]
