"""How an attention layer reaches its KV cache for one step: the objects behind `LayerContext.kv`."""
from __future__ import annotations

import torch

from kernels.attention import attention

from .batch import BatchState
from .profiler import Profiler


class CacheAccess:
    """Attention on the compute device over a token-major cache there: its home, or a staging slot.

    With `k_cache` None (prefill of an offloaded item) attention runs on the new tokens alone.
    With `store`, the new tokens are also written back to the item's home tier.
    """

    def __init__(self, owner, item, state: BatchState, k_cache, v_cache, store: bool):
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
            self.owner.store(self.item, t, k_new, v_new)
        return out.transpose(1, 2)


class CpuCacheAccess:
    """Decode attention on the CPU over a head-major cache there: only q/k/v of the new tokens and
    the attention output cross PCIe, instead of the whole cache."""

    def __init__(self, profiler: Profiler, state: BatchState, k_home: torch.Tensor, v_home: torch.Tensor):
        self.profiler, self.state, self.k_home, self.v_home = profiler, state, k_home, v_home

    def attend(self, q, k, v):
        t, s = self.state.length, q.shape[1]
        with self.profiler.span("cpu_attention", None, host=True):
            hq, hkv = q.shape[2], k.shape[2]
            qkv = torch.cat([q, k, v], dim=2).transpose(1, 2).to("cpu")  # one device-to-host copy: (B, H, s, D)
            self.k_home[:, :, t:t + s].copy_(qkv[:, hq:hq + hkv])
            self.v_home[:, :, t:t + s].copy_(qkv[:, hq + hkv:])
            out = attention(qkv[:, :hq], self.k_home[:, :, :t + s], self.v_home[:, :, :t + s],
                            self.state.mask(s, torch.device("cpu")))
        return out.transpose(1, 2).to(q.device)
