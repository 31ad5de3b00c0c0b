"""H2O heavy-hitter eviction (`--kv-policy h2o`): per layer, sequence and KV head, keep the tokens
with the largest accumulated attention probability plus the most recent ones, evict the rest.

The cache has `budget + 1` token slots per (sequence, KV head) and a score and a position per
slot, kept beside whatever attends the cache (the GPU, or the CPU with --cpu-cache-compute:
no extra PCIe traffic). Prefill attends densely, sums the attention each prompt token received
(kernels/attention_scores.py, without materialising the T x T probabilities) and keeps the
`recent` last tokens plus the `hh` highest-scoring others. Each decode step writes the new token
into a free slot, attends over all occupied slots, scales the scores by the decay (H2OConfig)
and adds this step's probabilities, and, above the budget, frees the lowest-scoring slot
outside the recent window (ties: the earliest position), so between steps no more than
`budget` tokens are kept.

Slots are independent of positions: tokens keep their positions (OPT adds them before the
layers, Llama rotates keys before caching), so eviction never shifts anything.

With the cache on the CPU, a decode item runs as one C++ job (kernels/cpu_decode_job.py's H2OJob:
slot write, attention, scores and eviction) queued on the compute stream (cpu_queue.py), so the
Python thread runs ahead instead of waiting for the GPU before each item and the GPU for the CPU
after it; the inline path below is its reference. A packed cache's job also writes the new
token's records and reads the exact ring (kv/recent.py) in place; without a GPU it runs inline,
and PyTorch's path (OFFLOAD_ENGINE_CPU_ATTENTION=torch) is its reference.

With `simulate`, the same rule runs over a full cache where slot = position and evicted tokens
are masked instead of freed: the paper's masked simulation, the reference for real eviction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_engine.kernels.attention_scores import attention_with_column_sums
from offload_engine.kernels.cpu_attention import use_cpp
from offload_engine.kernels.cpu_decode_job import PackedSlots, h2o_job, run_job
from offload_engine.kernels.cpu_slot_attention import cpu_slot_attention

from ..batch import BatchState
from ..errors import EngineError
from ..io.host_return import HostReturn
from ..profiler import Profiler
from .codec import PlainCodec
from .cpu_queue import QueuesCpuAttention
from .h2o_scan import ScanState, h2o_scan
from .recent import ExactRing
from .store import CacheLocation, Item, KVCacheStore

NO_POSITION = -1


@dataclass
class SlotState:
    """Per item: which position each slot holds (-1: free) and the attention it has accumulated."""

    position: torch.Tensor  # (B, Hkv, C) int64
    score: torch.Tensor  # (B, Hkv, C) float32


class H2OKV(QueuesCpuAttention):
    def __init__(self, cfg, codec, profiler: Profiler, workload, sinks: bool = False):
        self.codec, self.profiler, self.simulate = codec, profiler, cfg.simulate
        # StreamingLLM's baseline: a token's score is minus its position and never grows, so the
        # "heavy hitters" are the first tokens (the sinks) and the rest leave with the window.
        self.sinks = sinks
        self.hh, self.recent = cfg.sizes(workload.prompt_len)
        self.budget = self.hh + self.recent
        self.decay = cfg.score_decay(workload.prompt_len)
        self.slots: dict[Item, SlotState] = {}
        self.prompt_scores: dict[Item, torch.Tensor] = {}  # a chunked prefill's scores so far
        self.host_return = HostReturn()  # decode outputs back to the GPU
        # Perplexity: each prompt query attends the cache kept when it arrived, as decode steps
        # would (h2o_scan.py); on_scan() is called after each layer's scan (progress).
        self.teacher_forced = False
        self.on_scan = None
        self.scan_states: dict[Item, ScanState] = {}  # a chunked teacher-forced prefill's state so far
        # A packed cache's newest tokens, exact (kv/recent.py): attended instead of their records.
        self.exact: dict[Item, ExactRing] = {}

    streams_cache = True  # an off-GPU cache is copied whole into a GPU slot each step
    chunks_need_buffer = True  # the cache holds the budget, not the prompt the next chunk attends

    def stored_tokens(self, state: BatchState) -> int:
        """Slots a decode step may attend: one per token seen plus the incoming one (capped by the
        cache). Real eviction zero-fills its cache at prefill, so all of them hold finite values."""
        return state.length + 1

    def access(self, store: KVCacheStore, item: Item, state: BatchState, where: CacheLocation):
        return H2OAccess(self, store, item, state, where)

    # --- the eviction rule, shared by real eviction and the masked simulation -------------------

    def initial_scores(self, colsum: torch.Tensor) -> torch.Tensor:
        if not self.sinks:
            return colsum
        return -torch.arange(colsum.shape[-1], device=colsum.device, dtype=colsum.dtype).expand_as(colsum)

    def select_after_prefill(self, colsum: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """Positions to keep (B, Hkv, n) sorted ascending, -1 where fewer valid tokens exist:
        the last `recent` tokens and the `hh` highest-scoring earlier ones."""
        b, h, s = colsum.shape
        if s <= self.budget:
            pos = torch.arange(s, device=colsum.device).expand(b, h, s).clone()
            return pos.masked_fill(~key_valid[:, None, :], NO_POSITION)
        older = s - min(self.recent, s)
        score = colsum[:, :, :older].masked_fill(~key_valid[:, None, :older], float("-inf"))
        # A stable sort makes ties deterministic: the earlier position wins.
        values, order = score.sort(dim=-1, descending=True, stable=True)
        hh = min(self.hh, older)
        keep_heavy = order[..., :hh].masked_fill(values[..., :hh] == float("-inf"), NO_POSITION)
        recent = torch.arange(older, s, device=colsum.device).expand(b, h, s - older)
        kept = torch.cat([keep_heavy, recent], dim=-1)
        ordered = kept.masked_fill(kept < 0, s).sort(-1).values  # ascending, placeholders (-1) last
        return ordered.masked_fill(ordered >= s, NO_POSITION)

    def accumulate(self, score: torch.Tensor, probs: torch.Tensor) -> None:
        """A step's attention into the scores, in place: scaled by the decay first (H2OConfig)."""
        if self.decay != 1:
            score.mul_(self.decay)
        score.add_(probs)

    def evict(self, slots: SlotState, length: "int | torch.Tensor") -> None:
        """Above the budget, free the lowest-scoring occupied slot outside the recent window.
        No host sync (no early exit when nothing is over): `length` may be a device tensor, so a
        captured decode step can run it."""
        occupied = slots.position >= 0
        over = occupied.sum(-1) > self.budget  # (B, Hkv)
        candidate = occupied & (slots.position < length - self.recent)
        score = slots.score.masked_fill(~candidate, float("inf"))
        lowest = score.min(-1, keepdim=True).values
        tied = candidate & (score == lowest)
        big = torch.iinfo(slots.position.dtype).max
        victim = slots.position.masked_fill(~tied, big).argmin(-1, keepdim=True)  # earliest position wins ties
        freed = torch.zeros_like(occupied).scatter_(-1, victim, True) & over[..., None]
        slots.position.masked_fill_(freed, NO_POSITION)
        slots.score.masked_fill_(freed, 0.0)


def attend_slots(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
    """One query per sequence over occupied slots: q (B, Hq, D), keys/values (B, Hkv, C, D) views,
    valid (B, Hkv, C). Returns out (B, Hq, D) and the probabilities summed over each KV head's
    query heads, (B, Hkv, C) float32 (what H2O accumulates)."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    scores = (qg @ keys.transpose(-1, -2)).float()  # (B, Hkv, g, C)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = (probs.to(values.dtype) @ values).reshape(b, hq, d)
    return out, probs.sum(2)


class H2OAccess:
    def __init__(self, policy: H2OKV, store: KVCacheStore, item: Item, state: BatchState, where: CacheLocation):
        self.policy, self.store, self.item, self.state, self.where = policy, store, item, state, where
        self.codec = policy.codec

    def attend(self, q, k, v):
        if self.state.in_prefill:
            return self._prefill(q, k, v)
        if self.where.kind == "cpu":
            queue = self._cpu_queue(q)
            if queue is not None:  # in the compute stream's order, eviction included
                p, slots = self.policy, self.policy.slots[self.item]
                with p.profiler.span("cpu_attention", torch.cuda.current_stream(q.device)):
                    return queue.attend_h2o(q, k, v, self.where.k, self.where.v, slots.position, slots.score,
                                            self.state.length, p.budget, p.recent, p.sinks, self._packed_slots(k, v),
                                            p.decay)
            with self.policy.profiler.span("cpu_attention", None, host=True):
                hq, hkv = q.shape[2], k.shape[2]
                qkv = torch.cat([q, k, v], dim=2).to("cpu")  # one device-to-host copy
                out = self._decode(qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:])
            return self.policy.host_return.to_device(out, q.device)
        return self._decode(q, k, v)

    def _cpu_queue(self, q):
        """The policy's queue where this decode item can run as one C++ job (cpu_queue.py), else None."""
        p = self.policy
        if p.simulate or self.state.static or q.shape[1] != 1 or not self._job_reads_cache(q.dtype):
            return None
        return p.cpu_queue(q.device)

    def _job_reads_cache(self, dtype: torch.dtype) -> bool:
        """Whether the C++ job (kernels/cpu_decode_job.py) reads this cache: plain in the compute
        dtype, or 4/8-bit per-token records with their exact ring."""
        if isinstance(self.codec, PlainCodec):
            return self.where.k.dtype == dtype
        return (not self.codec.blocked and self.codec.spec.bits in (4, 8) and self.codec.compute_dtype == dtype
                and self.item in self.policy.exact)

    def _packed_slots(self, k, v) -> PackedSlots | None:
        """A packed cache's part of the job: the new token's records, encoded where k and v are
        (B, 1, Hkv, D), keys then values, and the item's exact ring."""
        if isinstance(self.codec, PlainCodec):
            return None
        ring = self.policy.exact[self.item]
        records = self.codec.encoded(torch.cat([k, v], dim=1))  # (B, 2, Hkv, G, R): one encode, no stack
        return PackedSlots(records, ring.k, ring.v, self.codec.spec.bits, self.codec.spec.group_size)

    def _prefill(self, q, k, v):
        """Attend the prompt (or one chunk of it after the chunks before, summing the attention
        each key receives across chunks); once the whole prompt is in, keep the budget."""
        if self.policy.teacher_forced:
            return self._scan(q, k, v)
        if self.where.buffer is None:  # the whole prompt at once
            valid = self.state.key_valid[:, :q.shape[1]]
            out, colsum = attention_with_column_sums(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     key_valid=valid, query_valid=valid)
            self._keep(colsum, k, v)
            return out.transpose(1, 2)
        p, t, end = self.policy, self.state.length, self.state.length + q.shape[1]
        buf_k, buf_v = self.where.buffer
        buf_k[t:end] = k.transpose(0, 1)
        buf_v[t:end] = v.transpose(0, 1)
        valid = self.state.key_valid[:, :end]
        out, colsum = attention_with_column_sums(q.transpose(1, 2), buf_k[:end].permute(1, 2, 0, 3),
                                                 buf_v[:end].permute(1, 2, 0, 3), key_valid=valid,
                                                 query_valid=valid[:, t:])
        if t == 0:
            p.prompt_scores[self.item] = colsum.new_zeros(*colsum.shape[:2], self.state.prompt_len)
        scores = p.prompt_scores[self.item]
        scores[..., :end] += colsum
        if end == self.state.prompt_len:
            del p.prompt_scores[self.item]
            self._keep(scores, buf_k[:end].transpose(0, 1), buf_v[:end].transpose(0, 1))
        return out.transpose(1, 2)

    def _scan(self, q, k, v):
        """The prompt teacher-forced (h2o_scan.py): every query over the tokens kept when it
        arrived, chunk after chunk; once the whole prompt is in, the tokens kept after its last
        query go to the cache."""
        p, t, end = self.policy, self.state.length, self.state.length + q.shape[1]
        if self.state.padded:
            raise EngineError("teacher-forced H2O scores unpadded prompts only.", "Pass prompts without padding.")
        keys, values = k, v
        if self.where.buffer is not None:  # one chunk: the ones before it are in the prompt buffer
            buf_k, buf_v = self.where.buffer
            buf_k[t:end] = k.transpose(0, 1)
            buf_v[t:end] = v.transpose(0, 1)
            keys, values = buf_k[:end].transpose(0, 1), buf_v[:end].transpose(0, 1)
        if t == 0:
            p.scan_states[self.item] = ScanState.empty(k.shape[0], k.shape[2], self.state.prompt_len, k.device)
        state = p.scan_states[self.item]
        codec = self.codec
        packed = not isinstance(codec, PlainCodec)
        attended = [codec.decode(codec.encoded(x)) if packed else x for x in (keys, values)]
        out = h2o_scan(q, *attended, v[:, 0], state, p.budget, p.recent, p.sinks,
                       exact=(keys, values) if packed else None, decay=p.decay)
        if end == self.state.prompt_len:
            del p.scan_states[self.item]
            # Evicted tokens at -inf: the selection after prefill keeps exactly the scan's tokens
            # (the sink baseline's rule depends on positions only and picks the same ones).
            self._keep(state.score.masked_fill(~state.kept, float("-inf")), keys, values)
            if p.on_scan is not None:
                p.on_scan()
        return out

    def _keep(self, colsum, k, v):
        """Choose the prompt tokens to keep from the attention they received (colsum (B, Hkv, s))
        and write them to the cache; k, v (B, s, Hkv, D) are the whole prompt's."""
        p, s = self.policy, k.shape[1]
        valid = self.state.key_valid[:, :s]
        colsum = p.initial_scores(colsum)
        if p.simulate:  # slot = position: the whole prompt stays in place, evicted tokens are masked
            keep = p.select_after_prefill(colsum, valid)
            kept = torch.zeros_like(keep[..., :1].expand_as(colsum)).scatter_add_(-1, keep.clamp(min=0),
                                                                                  (keep >= 0).long()) > 0
            position = torch.arange(s, device=k.device).expand_as(colsum).masked_fill(~kept, NO_POSITION)
            k_keep, v_keep, n = k.transpose(0, 1), v.transpose(0, 1), s
            score = colsum.masked_fill(~kept, 0.0)
        else:
            position = p.select_after_prefill(colsum, valid)  # (B, Hkv, n): slot i holds position[i]
            index = position.clamp(min=0)
            score = colsum.gather(-1, index).masked_fill(position < 0, 0.0)
            gather = index.transpose(1, 2)[..., None].expand(-1, -1, -1, k.shape[-1])  # (B, n, Hkv, D)
            k_keep, v_keep = k.gather(1, gather).transpose(0, 1), v.gather(1, gather).transpose(0, 1)
            # Free slots are taken in any order (padding leaves holes), so every slot must hold
            # finite values before it is attended, masked or not: zeros beyond the kept tokens.
            k_keep, v_keep = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 0, 0, self.store.capacity - x.shape[0]))
                              for x in (k_keep, v_keep))
            n = self.store.capacity
        capacity = self.store.capacity
        attended_on_cpu = self.store.attended_on_cpu(self.item)
        home = torch.device("cpu") if attended_on_cpu else k.device
        if not isinstance(self.codec, PlainCodec):
            ring = p.exact[self.item] = ExactRing(k.shape[0], k.shape[2], k.shape[3], self.codec.compute_dtype, home)
            ring.write_prompt(k, v)
        pad = capacity - position.shape[-1]
        slots = SlotState(torch.nn.functional.pad(position, (0, pad), value=NO_POSITION).to(home),
                          torch.nn.functional.pad(score, (0, pad)).to(home))
        earlier = p.slots.get(self.item)
        if earlier is not None and earlier.position.shape == slots.position.shape \
                and earlier.position.device == slots.position.device:
            # Refill in place: a captured decode step holds the addresses of the slot tensors.
            earlier.position.copy_(slots.position)
            earlier.score.copy_(slots.score)
        else:
            p.slots[self.item] = slots
        if self.where.kind == "gpu":
            self.codec.encode(k_keep, self.where.k[:n])
            self.codec.encode(v_keep, self.where.v[:n])
        else:
            self.store.store(self.item, 0, self.codec.encoded(k_keep), self.codec.encoded(v_keep))

    def _decode(self, q, k, v):
        """One new token: into a free slot, attend, accumulate, evict. Runs where the slots live."""
        if self.state.static:
            return self._decode_static(q, k, v)
        p, t = self.policy, self.state.length
        if self.where.kind == "cpu" and not p.simulate and not isinstance(self.codec, PlainCodec) \
                and use_cpp() and self._job_reads_cache(q.dtype):
            return self._decode_job(q, k, v)
        slots = p.slots[self.item]
        k_new, v_new = k[:, 0], v[:, 0]  # (B, Hkv, D)
        b, h = k_new.shape[:2]
        if p.simulate:
            free = torch.full((b, h), t, dtype=torch.int64, device=k_new.device)
        else:
            free = (slots.position < 0).to(torch.int32).argmax(-1)  # the first free slot
        rows = torch.arange(b, device=k_new.device)[:, None].expand(b, h)
        heads = torch.arange(h, device=k_new.device)[None, :].expand(b, h)
        k_enc, v_enc = self.codec.encoded(k_new), self.codec.encoded(v_new)
        cache_k, cache_v = self.where.k, self.where.v
        head_major = self.where.kind == "cpu"
        index = (rows, heads, free) if head_major else (free, rows, heads)
        cache_k[index] = k_enc
        cache_v[index] = v_enc
        slots.position[rows, heads, free] = t
        slots.score[rows, heads, free] = -float(t) if p.sinks else 0.0
        # Slots beyond t + 1 were never written in this generation (and may hold anything).
        used = min(self.store.capacity, t + 1)
        keys, values = self._views(cache_k, cache_v, head_major, used)
        if self.item in p.exact:
            ring = p.exact[self.item]
            ring.write(t, k_new, v_new)
            keys, values = ring.substitute(keys, values, slots.position[..., :used], t)
        valid = slots.position[..., :used] >= 0
        if head_major and isinstance(self.codec, PlainCodec) and use_cpp():  # on the CPU, beside its cache
            out, probs = cpu_slot_attention(q[:, 0], keys, values, valid)
        else:
            out, probs = attend_slots(q[:, 0], keys, values, valid)
        if not p.sinks:
            p.accumulate(slots.score[..., :used], probs)
        p.evict(slots, t + 1)
        if self.where.kind == "slot":
            self.store.scatter(self.item, free, k_enc, v_enc)
        return out[:, None]

    def _decode_job(self, q, k, v):
        """`_decode` of a packed CPU cache as one C++ job on this thread (the job the compute stream
        queues on a GPU machine): the same bytes in, the same slots and output out."""
        p, slots = self.policy, self.policy.slots[self.item]
        hq = q.shape[2]
        out = torch.empty(q.shape[0], hq, q.shape[3], dtype=torch.float32)
        qkv = torch.cat([q, k, v], dim=2)[:, 0].contiguous()
        packed = self._packed_slots(k, v)  # held here: the job holds its tensors' addresses only
        run_job(h2o_job(qkv, self.where.k, self.where.v, slots.position, slots.score, self.state.length, p.budget,
                        p.recent, p.sinks, out, packed=packed, decay=p.decay))
        return out.to(q.dtype)[:, None]

    def _decode_static(self, q, k, v):
        """`_decode` for a captured step (a GPU-resident, uncompressed cache with real eviction):
        the position comes from the device copy of the length and every slot is attended (the
        unused ones hold zeros from the prefill and are masked), so no shape or value depends on
        the host's length and one graph serves every step."""
        p, slots = self.policy, self.policy.slots[self.item]
        k_new, v_new = k[:, 0], v[:, 0]  # (B, Hkv, D)
        b, h = k_new.shape[:2]
        t = self.state.length_t
        free = (slots.position < 0).to(torch.int32).argmax(-1)
        rows = torch.arange(b, device=k_new.device)[:, None].expand(b, h)
        heads = torch.arange(h, device=k_new.device)[None, :].expand(b, h)
        self.where.k[free, rows, heads] = self.codec.encoded(k_new)
        self.where.v[free, rows, heads] = self.codec.encoded(v_new)
        slots.position[rows, heads, free] = t.expand(b, h)
        fresh = -t.to(slots.score.dtype) if p.sinks else t.new_zeros((), dtype=slots.score.dtype)
        slots.score[rows, heads, free] = fresh.expand(b, h)
        keys, values = self._views(self.where.k, self.where.v, False, self.store.capacity)
        out, probs = attend_slots(q[:, 0], keys, values, slots.position >= 0)
        if not p.sinks:
            p.accumulate(slots.score, probs)
        p.evict(slots, t + 1)
        return out[:, None]

    def _views(self, cache_k, cache_v, head_major: bool, used: int):
        """(B, Hkv, used, D) keys and values in the compute dtype (a packed cache is decoded: it
        holds only the budget's worth of tokens)."""
        if head_major:
            views = [c[:, :, :used] for c in (cache_k, cache_v)]
        else:
            views = [c[:used].permute(1, 2, 0, *range(3, c.dim())) for c in (cache_k, cache_v)]
        if isinstance(self.codec, PlainCodec):
            return views
        return [self.codec.decode(c) for c in views]
