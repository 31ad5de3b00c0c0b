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
from ..profiler import Profiler
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
        if codec.packed:
            raise EngineError("--kv-policy hip with --compress-cache is not supported.",
                              "Drop --compress-cache or use --kv-policy full or h2o.")
        self.cfg, self.kernel_cfg, self.codec, self.profiler = cfg, cfg.kernel_config(), codec, profiler
        attention_layers = [i for i, layer in enumerate(layers) if layer.kv_spec is not None]
        self.dense = set(attention_layers[: max(0, cfg.dense_layers - attention_offset)])
        self.selections: dict[Item, Selection] = {}
        self.host_return = HostReturn()  # CPU decode outputs back to the GPU
        self.hot: dict[Item, HotBlockCache] = {}  # items whose cache is off the GPU and attended there
        self.max_len = workload.max_len
        self.collect_stats = False  # perplexity asks for keys attended per query
        self.stats = {"queries": 0, "keys": 0}

    streams_cache = False  # an off-GPU cache is read block by block through the hot-block cache

    def stored_tokens(self, state: BatchState) -> int:
        return state.length

    def access(self, store: KVCacheStore, item: Item, state: BatchState, where: CacheLocation):
        return HiPAccess(self, store, item, state, where)

    def hit_rate(self) -> float | None:
        """Hits / lookups of the hot-block caches (None without any)."""
        lookups = sum(int(h.lookups) for h in self.hot.values())
        return sum(int(h.hits) for h in self.hot.values()) / lookups if lookups else None

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


class HiPAccess:
    def __init__(self, policy: HiPKV, store: KVCacheStore, item: Item, state: BatchState, where: CacheLocation):
        self.policy, self.store, self.item, self.state, self.where = policy, store, item, state, where

    def attend(self, q, k, v):
        t, s = self.state.length, q.shape[1]
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
        if self.where.kind == "home":
            out = self._attend_hot(q, k[:, 0], v[:, 0], t)
        else:
            if self.where.k is not None:
                self.where.k[t:t + s] = k_new
                self.where.v[t:t + s] = v_new
            if t == 0:
                keys, values = k.transpose(1, 2), v.transpose(1, 2)
            else:
                keys, values = self.where.k[:t + s].permute(1, 2, 0, 3), self.where.v[:t + s].permute(1, 2, 0, 3)
            out = self._attend(q, keys, values, t)
            if t == 0 and self.where.kind == "prefill" and not self.store.attended_on_cpu(self.item):
                hot = self.policy.new_hot_cache(keys, q.shape[2])
                hot.write_reps(0, keys)
                self.policy.hot[self.item] = hot
        if self.where.writes_home:  # from fresh tensors: the slot is reused by the next prefetch
            self.store.store(self.item, t, k_new.contiguous(), v_new.contiguous())
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
        if t == 0:
            block_idx = p.select(qh, keys, q_idx, key_start)
        else:
            block_idx = self._decode_blocks(qh, keys, q_idx, key_start, t)
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
        q_idx = torch.tensor([t], dtype=torch.int32, device=dev)
        key_start = self.state.key_valid[:, :t + 1].to(torch.int32).argmax(-1).to(torch.int32)
        if self.item[0] in p.dense:  # dense layers read the whole cache from home
            self.store.wait_stores(self.item)
            home_k, home_v = self.where.k, self.where.v
            keys = torch.cat([home_k[:t].to(dev), k_new[None]]).permute(1, 2, 0, 3)
            values = torch.cat([home_v[:t].to(dev), v_new[None]]).permute(1, 2, 0, 3)
            return attention(qh, keys, values, self.state.mask(1, dev)).transpose(1, 2)
        block_idx = self._decode_blocks(qh, hot.rep_keys(t + 1), q_idx, key_start, t)  # (B, Hq, 1, N)
        b, hq, _, n = block_idx.shape
        hkv = k_new.shape[1]
        needed = merge_blocks(block_idx.reshape(b, hkv, hq // hkv * n), block_idx.new_empty(0))
        _, miss_blocks, victims = hot.lookup(needed)
        if bool((miss_blocks >= 0).any()):
            self.store.wait_stores(self.item)
            hot.fill(miss_blocks, victims, self.where.k, self.where.v, t)
        hot.write_token(t, k_new, v_new)
        logical = block_idx.reshape(b, hkv, -1)
        slots = hot.slot_of.gather(-1, torch.where(logical >= 0, logical, hot.blocks))
        slots = torch.where(logical >= 0, slots, -1).reshape(block_idx.shape).to(torch.int32)
        p.count(block_idx, q_idx, key_start)
        out = block_sparse_attention(qh, hot.pool_k, hot.pool_v, slots, q_idx, key_start, cfg.block_size_q,
                                     cfg.block_size_k, block_pos=block_idx, key_len=t + 1)
        return out.transpose(1, 2)

    def _decode_blocks(self, qh, keys, q_idx, key_start, t: int) -> torch.Tensor:
        p, cfg = self.policy, self.policy.kernel_cfg
        previous = p.selections.get(self.item)
        if previous is None or t - previous.length >= p.cfg.refresh or previous.block_idx.device != qh.device:
            block_idx = p.select(qh, keys, q_idx, key_start)
            p.selections[self.item] = Selection(block_idx, t)
            return block_idx
        bk = cfg.block_size_k
        # Every token cached since the selection is attended, not only the window's: with a
        # window shorter than the refresh period the tokens in between would be in neither.
        first = max(min(t - cfg.window + 1, previous.length), 0) // bk
        window = torch.arange(first, t // bk + 1, dtype=torch.int32, device=qh.device)
        return merge_blocks(previous.block_idx, window)
