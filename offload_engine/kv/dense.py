"""Full attention over the whole cache (`--kv-policy full`): the access objects behind
`LayerContext.kv` when every token is kept."""
from __future__ import annotations

import torch

from ..batch import BatchState
from ..io.host_return import HostReturn
from ..profiler import Profiler
from offload_engine.kernels.decode_attention import decode_attention
from offload_engine.kernels.cpu_attention import cpu_decode_attention

from .codec import token_major_attention
from .cpu_queue import QueuesCpuAttention
from .store import CacheLocation, Item, KVCacheStore


class DenseKV(QueuesCpuAttention):
    """The full-cache policy: every token stays, attention reads all of them."""

    def __init__(self, codec, profiler: Profiler):
        self.codec, self.profiler = codec, profiler
        self.host_return = HostReturn()  # inline decode outputs back to the GPU

    streams_cache = True  # an off-GPU cache is copied whole into a GPU slot each step
    chunks_need_buffer = False  # a GPU-resident, unpacked cache holds the prompt for the next chunk

    def stored_tokens(self, state: BatchState) -> int:
        return state.length

    def access(self, store: KVCacheStore, item: Item, state: BatchState, where: CacheLocation):
        if where.kind == "cpu":
            return CpuCacheAccess(self.codec, self.profiler, state, where.k, where.v, self, store, item)
        return CacheAccess(self.codec, store, item, state, where)


class CacheAccess:
    """Attention on the compute device over a token-major cache there: its home or a staging slot.

    In prefill the new tokens are the whole sequence, so attention runs on them directly (in the
    compute dtype, also when the cache is stored compressed); decode reads the stored cache.
    """

    def __init__(self, codec, store: KVCacheStore, item: Item, state: BatchState, where: CacheLocation):
        self.codec, self.store, self.item, self.state, self.where = codec, store, item, state, where

    def attend(self, q, k, v):
        if self.state.static:
            return self._attend_static(q, k, v)
        if self.codec.blocked:
            return self._attend_blocked(q, k, v)
        t, s = self.state.length, q.shape[1]
        k_new, v_new = k.transpose(0, 1), v.transpose(0, 1)  # (s, B, H, D)
        cache_k, cache_v = self.where.k, self.where.v
        if cache_k is not None:
            self.codec.encode(k_new, cache_k[t:t + s])
            self.codec.encode(v_new, cache_v[t:t + s])
        out = self._attend_prompt(q, k_new, v_new)
        if out is None and self.codec.packed:
            out = self.codec.attend(q, cache_k, cache_v, t + s, None, self.state.key_valid[:, :t + s])
        elif out is None:
            out = self.codec.attend(q, cache_k, cache_v, t + s, self.state.mask(s, q.device))
        if self.where.writes_home:  # from fresh tensors: the slot is reused by the next prefetch
            self.store.store(self.item, t, self.codec.encoded(k_new), self.codec.encoded(v_new),
                             append=self.state.in_prefill)
        return out

    def _attend_prompt(self, q, k_new, v_new):
        """A prefill step's attention, over exact tokens in the compute dtype (also when the cache
        is stored packed); None in a decode step. k_new/v_new (s, B, H, D)."""
        t, s = self.state.length, q.shape[1]
        if self.where.buffer is not None:  # a prefill chunk after the prompt's earlier chunks
            buf_k, buf_v = self.where.buffer
            buf_k[t:t + s] = k_new
            buf_v[t:t + s] = v_new
            return token_major_attention(q, buf_k, buf_v, t + s, self.state.mask(s, q.device))
        if t == 0:  # prefill: the new tokens are the whole sequence
            return token_major_attention(q, k_new, v_new, s, self.state.mask(s, q.device))
        return None

    def _attend_blocked(self, q, k, v):
        """A codec that writes whole blocks (KIVI): the unfinished block's tokens stay exact beside
        the attention (kv/recent.py); a decode step attends the packed blocks and those together."""
        t, s = self.state.length, q.shape[1]
        k_new, v_new = k.transpose(0, 1), v.transpose(0, 1)  # (s, B, H, D)
        recent = self.store.recent(self.item, q.device)
        out = self._attend_prompt(q, k_new, v_new)
        if out is None:
            flushed = recent.block_start(t)
            recent_k, recent_v = recent.with_new(t, k_new, v_new)
            out = self.codec.attend_recent(q, self.where.k, self.where.v, flushed, recent_k, recent_v,
                                           self.state.key_valid[:, :t + s])
        done = self.codec.finished_blocks(recent, t, k_new, v_new, self.state.key_valid if self.state.padded else None)
        if done is not None:
            start, k_enc, v_enc = done
            if self.where.kind == "gpu":
                self.where.k[start:start + k_enc.shape[0]] = k_enc
                self.where.v[start:start + k_enc.shape[0]] = v_enc
            if self.where.writes_home:
                self.store.store(self.item, start, k_enc, v_enc, append=self.state.in_prefill)
        return out

    def _attend_static(self, q, k, v):
        """A decode step with static shapes for CUDA-graph capture: the cache index, the length
        and where each row's padding ends come from device tensors; the flash-decoding kernel
        (kernels/decode_attention.py) reads only the written tokens."""
        st = self.state
        index = st.length_t.view(1)
        self.where.k.index_copy_(0, index, k.transpose(0, 1))
        self.where.v.index_copy_(0, index, v.transpose(0, 1))
        return decode_attention(q[:, 0], self.where.k, self.where.v, st.end_t, st.key_start_t)[:, None]


class CpuCacheAccess:
    """Decode attention on the CPU over a head-major cache there: only q/k/v of the new tokens and
    the attention output cross PCIe, instead of the whole cache. A decode step over an unpacked
    cache is queued on the compute stream (cpu_queue.py) where CUDA allows it, else run inline."""

    def __init__(self, codec, profiler: Profiler, state: BatchState, k_home: torch.Tensor, v_home: torch.Tensor,
                 policy: DenseKV | None = None, store: KVCacheStore | None = None, item: Item | None = None):
        self.codec, self.profiler, self.state, self.k_home, self.v_home = codec, profiler, state, k_home, v_home
        self.policy, self.store, self.item = policy, store, item

    def attend(self, q, k, v):
        t, s = self.state.length, q.shape[1]
        queue = self.policy.cpu_queue(q.device) if self.policy is not None and s == 1 else None
        if queue is not None and not self.codec.packed and self.k_home.dtype == q.dtype:
            with self.profiler.span("cpu_attention", torch.cuda.current_stream(q.device)):
                return queue.attend(q, k, v, self.k_home, self.v_home, t, self.state.valid_on(torch.device("cpu")))
        with self.profiler.span("cpu_attention", None, host=True):
            hq, hkv = q.shape[2], k.shape[2]
            qkv = torch.cat([q, k, v], dim=2).to("cpu")  # one device-to-host copy: (B, s, H, D)
            q_c, k_c, v_c = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
            cpu = torch.device("cpu")
            if self.codec.blocked:
                out = self._attend_blocked(q_c, k_c, v_c)
                return self.policy.host_return.to_device(out, q.device) if self.policy is not None \
                    else out.to(q.device)
            self.codec.encode(k_c.transpose(1, 2), self.k_home[:, :, t:t + s])
            self.codec.encode(v_c.transpose(1, 2), self.v_home[:, :, t:t + s])
            order = (2, 0, 1, *range(3, self.k_home.dim()))  # token-major views of the head-major homes
            keys, values = self.k_home.permute(order), self.v_home.permute(order)
            if self.codec.packed:
                out = self.codec.attend(q_c, keys, values, t + s, None, self.state.valid_on(cpu))
            elif s == 1:  # decode: one pass over the cache at host-memory bandwidth
                out = cpu_decode_attention(q_c[:, 0], self.k_home[:, :, :t + 1], self.v_home[:, :, :t + 1],
                                           self.state.valid_on(cpu))[:, None]
            else:
                out = self.codec.attend(q_c, keys, values, t + s, self.state.mask(s, cpu))
        return self.policy.host_return.to_device(out, q.device) if self.policy is not None else out.to(q.device)

    def _attend_blocked(self, q, k, v):
        """A KIVI decode step on the CPU (q/k/v here already; the prompt was prefilled on the GPU,
        written home as a "prefill" item): as CacheAccess._attend_blocked, over the head-major home."""
        t = self.state.length
        if q.shape[1] != 1:
            raise RuntimeError("a CPU-attended per-channel cache is attended in decode steps only")
        k_new, v_new = k.transpose(0, 1), v.transpose(0, 1)
        recent = self.store.recent(self.item, q.device)
        order = (2, 0, 1, *range(3, self.k_home.dim()))  # token-major views of the head-major homes
        valid = self.state.key_valid[:, :t + 1].to(q.device)
        recent_k, recent_v = recent.with_new(t, k_new, v_new)
        out = self.codec.attend_recent(q, self.k_home.permute(order), self.v_home.permute(order),
                                       recent.block_start(t), recent_k, recent_v, valid)
        done = self.codec.finished_blocks(recent, t, k_new, v_new, valid if self.state.padded else None)
        if done is not None:
            start, k_enc, v_enc = done
            self.k_home[:, :, start:start + k_enc.shape[0]] = k_enc.permute(1, 2, 0, 3, 4)
            self.v_home[:, :, start:start + k_enc.shape[0]] = v_enc.permute(1, 2, 0, 3, 4)
        return out
