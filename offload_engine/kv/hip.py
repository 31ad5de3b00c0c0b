"""HiP hierarchically pruned attention (`--kv-policy hip`): each query block attends only the
top-k key blocks a tree search estimates (kernels/hip/select.py), plus sink tokens and a sliding
window, with block-sparse flash attention (kernels/hip/attention.py).

Prefill selects per query block. Decode selects for the new token every `refresh` steps and in
between reuses the last selection, widened by the blocks the moving window has reached. The
first `dense_layers` attention layers attend densely. With the cache on the GPU (its home or a
streamed slot) the kernels run there; with --cpu-cache-compute they run on the CPU beside the
cache. Keys are cached after rotation (Llama) or without positions at all (OPT), so attending a
subset never shifts anything.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_engine.kernels.attention import attention
from offload_engine.kernels.hip.attention import block_sparse_attention
from offload_engine.kernels.hip.exact import exact_select
from offload_engine.kernels.hip.select import hip_select

from ..batch import BatchState
from ..errors import EngineError
from ..io.host_return import HostReturn
from ..io.tiers import device_view
from ..profiler import Profiler
from .hip_static import StaticDecode
from .hot_cache import HotBlockCache
from .store import CacheLocation, Item, KVCacheStore

BIG = 2**30


@dataclass
class Selection:
    block_idx: torch.Tensor  # (B, Hq, 1, NSEL) int32
    length: int  # cache length when it was selected


def merge_blocks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted union of two block lists along the last dim (-1 = empty), -1 padded at the end."""
    x = torch.cat([a, b.expand(*a.shape[:-1], b.shape[-1]).to(a.dtype)], dim=-1)
    x = torch.where(x < 0, BIG, x).sort(-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(dup, BIG, x).sort(-1).values
    return torch.where(x >= BIG, -1, x)


class HiPKV:
    def __init__(self, cfg, codec, profiler: Profiler, layers, workload, device: torch.device,
                 attention_offset: int = 0):
        self.cfg, self.kernel_cfg, self.codec, self.profiler = cfg, cfg.kernel_config(), codec, profiler
        self.spec = codec.spec if codec.packed else None  # a 4/8-bit home, dequantized into the hot cache
        attention_layers = [i for i, layer in enumerate(layers) if layer.kv_spec is not None]
        self.dense = set(attention_layers[: max(0, cfg.dense_layers - attention_offset)])
        self.selections: dict[Item, Selection] = {}
        self.host_return = HostReturn()  # CPU decode outputs back to the GPU
        self.hot: dict[Item, HotBlockCache] = {}  # items whose cache is off the GPU and attended there
        self.mapped: dict[Item, tuple[torch.Tensor, torch.Tensor] | None] = {}  # their homes as the GPU reads them
        self.resolved: dict[Item, torch.Tensor] = {}  # pool slots of the current selection's blocks
        self.max_len = workload.max_len
        # The captured decode step (hip_static.py): its phase, and per item the selection and its
        # hot-cache slots in buffers whose addresses the graphs hold.
        self.static_refresh = False
        self.static_blocks: dict[Item, torch.Tensor] = {}
        self.static_slots: dict[Item, torch.Tensor] = {}
        self.collect_stats = False  # perplexity asks for keys attended per query
        self.stats = {"queries": 0, "keys": 0}

    streams_cache = False  # an off-GPU cache is read block by block through the hot-block cache
    chunks_need_buffer = False  # a GPU-resident, unpacked cache holds the prompt for the next chunk

    def stored_tokens(self, state: BatchState) -> int:
        return state.length

    def access(self, store: KVCacheStore, item: Item, state: BatchState, where: CacheLocation):
        return HiPAccess(self, store, item, state, where)

    def begin_static_step(self, state: BatchState) -> bool:
        """The phase of the captured step about to run (its own graph): whether it refreshes the
        selection, every `refresh` steps from the first decode step."""
        self.static_refresh = (state.length - state.prompt_len) % self.cfg.refresh == 0
        return self.static_refresh

    def fetched_bytes(self) -> int:
        """Key and value bytes the hot-block caches have brought from the homes so far (misses)."""
        return sum((int(h.lookups) - int(h.hits)) * h.block_bytes for h in self.hot.values())

    def hit_rate(self) -> float | None:
        """Hits / lookups of the hot-block caches (None without any)."""
        lookups = sum(int(h.lookups) for h in self.hot.values())
        return sum(int(h.hits) for h in self.hot.values()) / lookups if lookups else None

    def mapped_home(self, item: Item, where: CacheLocation, device: torch.device):
        """The item's home as `device` reads it in place (its own memory, or pinned host memory
        mapped into it), or None (a memory-mapped disk file). Asked once per item."""
        if item not in self.mapped:
            views = None
            if where.k.device == device:
                views = (where.k, where.v)
            else:
                k, v = device_view(where.k, device), device_view(where.v, device)
                views = (k, v) if k is not None and v is not None else None
            self.mapped[item] = views
        return self.mapped[item]

    def hot_cache_for(self, item: Item, keys: torch.Tensor, query_heads: int) -> HotBlockCache:
        """The item's hot cache for a new prompt: the one it had, emptied in place (a captured
        decode step holds its tensors' addresses), or a new one."""
        hot = self.hot.get(item)
        if hot is not None and hot.reps.shape[:2] == keys.shape[:2] and hot.reps.device == keys.device:
            hot.reset()
            return hot
        return self.new_hot_cache(keys, query_heads)

    def new_hot_cache(self, keys: torch.Tensor, query_heads: int) -> HotBlockCache:
        if self.cfg.exact:
            raise EngineError("--kv-policy hip with the exact top-k reads every key: not with the KV cache off the GPU.",
                              "Keep the KV cache on the GPU (3rd --percent value 100) or drop the exact selection.")
        if self.cfg.sink < 1:
            raise EngineError("HiP's hot-block cache needs --hip-sink >= 1 (it keeps the search blocks aligned).")
        b, hkv, _, d = keys.shape
        capacity = self.cfg.hot_blocks(query_heads // hkv, self.max_len)
        return HotBlockCache(b, hkv, d, self.max_len, self.cfg.block_size_k, capacity, keys.dtype, keys.device)

    def select(self, q, keys, q_idx, key_start):
        choose = exact_select if self.cfg.exact else hip_select
        return choose(q, keys, q_idx, key_start, self.kernel_cfg)

    def count(self, block_idx: torch.Tensor, q_idx: torch.Tensor, key_start: torch.Tensor) -> None:
        """Keys each query attends (selected tokens that are valid and not in its future)."""
        if not self.collect_stats:
            return
        bq, bk = self.kernel_cfg.block_size_q, self.kernel_cfg.block_size_k
        b, hq, nqb, _ = block_idx.shape
        pos = (block_idx.long()[..., None] * bk + torch.arange(bk, device=block_idx.device)).flatten(-2)
        live = (block_idx >= 0).repeat_interleave(bk, -1) & (pos >= key_start.long().view(b, 1, 1, 1))
        per_query = pos[:, :, torch.arange(q_idx.numel(), device=pos.device) // bq]  # (B, Hq, Tq, K)
        ok = live[:, :, torch.arange(q_idx.numel(), device=pos.device) // bq] & (per_query <= q_idx.long()[:, None])
        self.stats["keys"] += int(ok.sum()) / hq
        self.stats["queries"] += b * q_idx.numel()


class HiPAccess(StaticDecode):
    def __init__(self, policy: HiPKV, store: KVCacheStore, item: Item, state: BatchState, where: CacheLocation):
        self.policy, self.store, self.item, self.state, self.where = policy, store, item, state, where

    def attend(self, q, k, v):
        if self.state.static:
            return self._attend_static(q, k, v)
        t, s = self.state.length, q.shape[1]
        if t == 0:  # a new prompt: nothing selected for it yet
            self.policy.selections.pop(self.item, None)
            self.policy.resolved.pop(self.item, None)
        k_new, v_new = k.transpose(0, 1), v.transpose(0, 1)  # (s, B, H, D)
        if self.where.kind == "cpu":
            with self.policy.profiler.span("cpu_attention", None, host=True):
                hq, hkv = q.shape[2], k.shape[2]
                qkv = torch.cat([q, k, v], dim=2).to("cpu")
                home_k, home_v = self.where.k, self.where.v
                home_k[:, :, t:t + s] = qkv[:, :, hq:hq + hkv].transpose(1, 2)
                home_v[:, :, t:t + s] = qkv[:, :, hq + hkv:].transpose(1, 2)
                out = self._attend(qkv[:, :, :hq], home_k[:, :, :t + s], home_v[:, :, :t + s], t)
            return self.policy.host_return.to_device(out, q.device)
        if self.where.kind == "home" and not self.state.in_prefill:
            out = self._attend_hot(q, k[:, 0], v[:, 0], t)
        else:
            cache = self.where.buffer or (self.where.k, self.where.v)  # a chunked prefill's prompt so far
            if cache[0] is not None:
                cache[0][t:t + s] = k_new
                cache[1][t:t + s] = v_new
            if t == 0:  # the prompt's first (or only) chunk attends itself
                keys, values = k.transpose(1, 2), v.transpose(1, 2)
            else:
                keys, values = cache[0][:t + s].permute(1, 2, 0, 3), cache[1][:t + s].permute(1, 2, 0, 3)
            out = self._attend(q, keys, values, t)
            if self.state.in_prefill and self.where.kind == "prefill" and not self.store.attended_on_cpu(self.item):
                if t == 0:
                    self.policy.hot[self.item] = self.policy.hot_cache_for(self.item, keys, q.shape[2])
                self.policy.hot[self.item].write_reps(t, keys[:, :, t:])
        if self.where.writes_home:  # from fresh tensors: the slot is reused by the next prefetch
            codec = self.policy.codec
            self.store.store(self.item, t, codec.encoded(k_new), codec.encoded(v_new), append=self.state.in_prefill)
        return out

    def _attend(self, q, keys, values, t: int):
        """q (B, s, Hq, D) over keys/values (B, Hkv, t + s, D) on their device."""
        p, s, dev = self.policy, q.shape[1], q.device
        valid = self.state.key_valid[:, :t + s].to(dev)
        if self.item[0] in p.dense:
            mask = self.state.mask(s, dev)
            return attention(q.transpose(1, 2), keys, values, mask).transpose(1, 2)
        qh = q.transpose(1, 2)  # (B, Hq, s, D)
        q_idx = torch.arange(t, t + s, dtype=torch.int32, device=dev)
        key_start = valid.to(torch.int32).argmax(-1).to(torch.int32)  # left padding ends here
        if self.state.in_prefill:  # the prompt, or one chunk of it: every query block selects
            block_idx = p.select(qh, keys, q_idx, key_start)
        else:
            block_idx, _ = self._decode_blocks(qh, keys, q_idx, key_start, t)
        p.count(block_idx, q_idx, key_start)
        out = block_sparse_attention(qh, keys, values, block_idx, q_idx, key_start,
                                     p.kernel_cfg.block_size_q, p.kernel_cfg.block_size_k)
        return out.transpose(1, 2)

    def _attend_hot(self, q, k_new, v_new, t: int):
        """One decode step with the cache at home: select over the block-start keys on the GPU,
        bring missing blocks into the hot cache, attend the pool. k_new/v_new (B, Hkv, D)."""
        p, cfg, dev = self.policy, self.policy.kernel_cfg, q.device
        hot = p.hot[self.item]
        hot.write_reps(t, k_new[:, :, None])
        qh = q.transpose(1, 2)
        q_idx = torch.full((1,), t, dtype=torch.int32, device=dev)  # a fill: no host-to-device copy
        key_start = self.state.key_start_t.to(torch.int32)
        if self.item[0] in p.dense:  # dense layers read the whole cache from home
            self.store.wait_stores(self.item)
            home_k, home_v, decode = self.where.k, self.where.v, p.codec.decode
            keys = torch.cat([decode(home_k[:t].to(dev)), k_new[None]]).permute(1, 2, 0, 3)
            values = torch.cat([decode(home_v[:t].to(dev)), v_new[None]]).permute(1, 2, 0, 3)
            return attention(qh, keys, values, self.state.mask(1, dev)).transpose(1, 2)
        stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
        with p.profiler.span("hip_select", stream):
            block_idx, refreshed = self._decode_blocks(qh, hot.rep_keys(t + 1), q_idx, key_start, t)  # (B, Hq, 1, N)
        if refreshed or self.item not in p.resolved:  # between refreshes the same blocks stay resident
            with p.profiler.span("hip_fetch", stream):
                p.resolved[self.item] = self._bring(hot, block_idx, t, dev)
        if p.codec.packed:  # the pool holds what the home holds: the token as stored
            k_new, v_new = (p.codec.decode(p.codec.encoded(x)) for x in (k_new, v_new))
        hot.write_token(t, k_new, v_new)  # its block is resident: the selection covers the tokens to come
        with p.profiler.span("hip_attention", stream):
            p.count(block_idx, q_idx, key_start)
            out = block_sparse_attention(qh, hot.pool_k, hot.pool_v, p.resolved[self.item], q_idx, key_start,
                                         cfg.block_size_q, cfg.block_size_k, block_pos=block_idx, key_len=t + 1)
        return out.transpose(1, 2)

    def _bring(self, hot: HotBlockCache, block_idx: torch.Tensor, t: int, dev: torch.device) -> torch.Tensor:
        """Make the selected blocks resident in the hot cache (misses copied from the home) and
        return where they are: pool slots shaped like block_idx, -1 where none."""
        p = self.policy
        b, hq, _, n = block_idx.shape
        hkv = hot.pool_k.shape[1]
        needed = merge_blocks(block_idx.reshape(b, hkv, hq // hkv * n), block_idx.new_empty(0))
        _, miss_blocks, victims = hot.lookup(needed)
        mapped = p.mapped_home(self.item, self.where, dev)
        if mapped is not None:  # the fetch kernel reads the home in place, after its last write-back
            for pending in self.store.last_store[self.item]:
                pending.wait()
            hot.fill(miss_blocks, victims, self.where.k, self.where.v, t, mapped, p.spec)
        else:
            self.store.wait_stores(self.item)
            hot.fill(miss_blocks, victims, self.where.k, self.where.v, t, spec=p.spec)
        logical = block_idx.reshape(b, hkv, -1)
        slots = hot.slot_of.gather(-1, torch.where(logical >= 0, logical, hot.blocks))
        return torch.where(logical >= 0, slots, -1).reshape(block_idx.shape).to(torch.int32)

    def _decode_blocks(self, qh, keys, q_idx, key_start, t: int) -> tuple[torch.Tensor, bool]:
        """The blocks a decode step attends, and whether they were selected now: every `refresh`
        steps the tree search's selection plus the blocks of the tokens to come until the next
        refresh; in between that same list (the paper's mask reuse), so every token cached since
        the selection is attended and nothing about the list changes until the next refresh."""
        p, bk = self.policy, self.policy.kernel_cfg.block_size_k
        previous = p.selections.get(self.item)
        if previous is not None and t - previous.length < p.cfg.refresh and previous.block_idx.device == qh.device:
            return previous.block_idx, False
        block_idx = p.select(qh, keys, q_idx, key_start)
        last = min(t + p.cfg.refresh - 1, p.max_len - 1) // bk  # the block of the last token before the next refresh
        ahead = torch.arange(t // bk + 1, last + 1, dtype=torch.int32, device=qh.device)
        if ahead.numel():
            block_idx = merge_blocks(block_idx, ahead)
        p.selections[self.item] = Selection(block_idx, t)
        return block_idx, True
