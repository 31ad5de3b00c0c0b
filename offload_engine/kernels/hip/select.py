"""HiP top-k key-block estimation (hierarchically pruned attention, arxiv 2406.09827).

Keys close together get similar scores, so the best key blocks of a query block can be found by
a tree search that scores each candidate chunk by one representative key (its first) instead of
reading every key: O(k log(T/k)) key reads instead of O(T). Per (row, query head, query block):
the sink (first `sink` valid tokens) and the window (`window` tokens ending at the block's last
query) are always kept; the blocks strictly between them start as k/bk even chunks, and every
round splits each chunk in two, scores the halves (max over the block's queries of q . k_rep)
and keeps the k/bk best (ties: lower block index), until all chunks are one block wide.

Three implementations of one definition: `hip_select_reference` (plain loops, readable),
`hip_select_torch` (vectorised over all query blocks: the CPU path of `hip_select`) and
`hip_select_triton` (persistent programs, each walking query blocks; the chunk list and the
candidate scores live in a small per-program scratch buffer). The kernel keeps the best nb of 2nb
candidates by bisecting for a threshold on a unique integer key (score bits, then slot): each step
is one block-wide count, and it stops as soon as exactly nb candidates pass, typically after
~12 steps; a sort or an O(nb^2) rank would cost far more per round. Candidates are laid out as
(first half, second half) of each chunk in order, and survivors are compacted with a prefix sum,
so the chunk list stays sorted by block: "lower block wins" ties are "lower slot wins".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gather import gather_rows


@dataclass(frozen=True)
class HipConfig:
    """Selection sizes in tokens (k, sink, window) and block sizes; defaults of HiP v1.0."""

    k: int = 512
    block_size_q: int = 32
    block_size_k: int = 2
    sink: int = 4
    window: int = 128

    def __post_init__(self) -> None:
        bk = self.block_size_k
        if bk < 1 or bk & (bk - 1):
            raise ValueError(f"block_size_k={bk} must be a power of two (the kernels tile keys by whole blocks).")
        if self.k < bk or self.k % bk:
            raise ValueError(f"k={self.k} must be a positive multiple of block_size_k={bk} (k counts whole blocks).")
        if self.block_size_q < 1:
            raise ValueError(f"block_size_q={self.block_size_q} must be at least 1.")
        if self.sink < 0:
            raise ValueError(f"sink={self.sink} must be >= 0 tokens.")
        if self.window < self.block_size_q:
            raise ValueError(f"window={self.window} must be >= block_size_q={self.block_size_q} so that every "
                             "query of a block sees its own token; raise window.")

    @property
    def num_chunks(self) -> int:
        """nb: blocks kept by the tree search."""
        return self.k // self.block_size_k

    @property
    def max_selected(self) -> int:
        """NSEL: search blocks + sink blocks + window blocks (+1 each for an unaligned edge)."""
        bk = self.block_size_k
        sink_blocks = -(-self.sink // bk) + 1 if self.sink else 0
        return self.num_chunks + sink_blocks + -(-self.window // bk) + 1


def _check_inputs(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, key_start: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, T, D); got {tuple(q.shape)} and {tuple(k.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim.")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}).")
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"q and k must share one floating dtype; got {q.dtype} and {k.dtype}.")
    if q_idx.shape != (q.shape[2],) or q_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"q_idx must be an int32 tensor of shape ({q.shape[2]},); got {q_idx.dtype} {tuple(q_idx.shape)}.")
    if key_start is not None and (key_start.shape != (q.shape[0],) or key_start.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"key_start must be None or an int32 tensor of shape ({q.shape[0]},).")
    if any(t.device != q.device for t in (k, q_idx) + ((key_start,) if key_start is not None else ())):
        raise ValueError("q, k, q_idx and key_start must be on one device.")


def hip_select(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, key_start: torch.Tensor | None,
               cfg: HipConfig) -> torch.Tensor:
    """Selected key blocks, int32 (B, Hq, NQB, NSEL), rows ascending, padded with -1. Triton on CUDA."""
    if q.is_cuda:
        return hip_select_triton(q, k, q_idx, key_start, cfg)
    return hip_select_torch(q, k, q_idx, key_start, cfg)


# ---------------------------------------------------------------- reference (loops)

def hip_select_reference(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, key_start: torch.Tensor | None,
                         cfg: HipConfig) -> torch.Tensor:
    """The definition, one query block at a time; scores in float32 like the kernels."""
    _check_inputs(q, k, q_idx, key_start)
    B, Hq, Tq, _ = q.shape
    group, Tk, bq = Hq // k.shape[1], k.shape[2], cfg.block_size_q
    nqb = -(-Tq // bq)
    out = torch.full((B, Hq, nqb, cfg.max_selected), -1, dtype=torch.int32)
    for b in range(B):
        start = int(key_start[b]) if key_start is not None else 0
        for j in range(nqb):
            rows = slice(j * bq, min((j + 1) * bq, Tq))
            last = min(int(q_idx[rows].max()), Tk - 1)
            if last < start:
                continue  # the whole block is left padding: nothing to attend
            for h in range(Hq):
                blocks = _select_blocks(q[b, h, rows].float(), k[b, h // group].float(), start, last, cfg)
                out[b, h, j, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return out.to(q.device)


def _select_blocks(qs: torch.Tensor, keys: torch.Tensor, start: int, last: int, cfg: HipConfig) -> list[int]:
    bk, nb = cfg.block_size_k, cfg.num_chunks
    sink_end = min(start + cfg.sink, last + 1)
    first = -(-sink_end // bk) if cfg.sink else start // bk  # first block after the sink blocks
    sink_blocks = list(range(start // bk, first))
    window_first = max(last - cfg.window + 1, start) // bk
    window_blocks = list(range(max(window_first, first), last // bk + 1))
    lo, hi = first, max(window_first, first)  # search range: blocks strictly between sink and window
    n = hi - lo
    if n <= nb:
        return sink_blocks + list(range(lo, hi)) + window_blocks
    chunks = [(lo + i * n // nb, lo + (i + 1) * n // nb) for i in range(nb)]
    while any(e - a > 1 for a, e in chunks):
        cands = []
        for a, e in chunks:
            half = (e - a + 1) // 2
            cands += [(a, a + half), (a + half, e)] if e - a > 1 else [(a, e)]
        reps = torch.tensor([max(a * bk, start) for a, _ in cands])
        scores = (qs @ keys[reps].T).amax(0).tolist()
        best = sorted(range(len(cands)), key=lambda i: (-scores[i], cands[i][0]))[:nb]
        chunks = sorted(cands[i] for i in best)
    return sink_blocks + [a for a, _ in chunks] + window_blocks


# ---------------------------------------------------------------- vectorised torch (CPU path)

def hip_select_torch(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, key_start: torch.Tensor | None,
                     cfg: HipConfig) -> torch.Tensor:
    """All query blocks at once: rounds run until the widest chunk of any block is one block."""
    _check_inputs(q, k, q_idx, key_start)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bq, bk, nb, sink = cfg.block_size_q, cfg.block_size_k, cfg.num_chunks, cfg.sink
    nqb, dev = -(-Tq // bq), q.device
    bq = bq if nqb > 1 else Tq  # one query block (decode: one query) is not padded to block_size_q
    qi = torch.full((nqb * bq,), -1, dtype=torch.long, device=dev)
    qi[:Tq] = q_idx
    qi = qi.view(nqb, bq)
    last = qi.amax(1).clamp(max=Tk - 1).expand(B, Hq, nqb).reshape(-1)
    start = (key_start.long() if key_start is not None else torch.zeros(B, dtype=torch.long, device=dev))
    start = start.view(B, 1, 1).expand(B, Hq, nqb).reshape(-1)
    live = last >= start
    first = -(-torch.minimum(start + sink, last + 1) // bk) if sink else start // bk
    win_first = torch.maximum(last - cfg.window + 1, start) // bk
    lo, hi = first, torch.maximum(win_first, first)
    n = (hi - lo) * live
    ns, nw = (first - start // bk) * live, (last // bk + 1 - hi) * live

    i = torch.arange(nb, device=dev)
    big = (n > nb)[:, None]
    a = torch.where(big, lo[:, None] + i * n[:, None] // nb, lo[:, None] + i)
    e = torch.where(big, lo[:, None] + (i + 1) * n[:, None] // nb, a + 1)
    valid = i < n.clamp(max=nb)[:, None]

    w_idx = torch.arange(B * Hq * nqb, device=dev)
    b_of, h_of = w_idx // (Hq * nqb), (w_idx // nqb) % Hq
    qpad = torch.zeros(B, Hq, nqb * bq, D, dtype=torch.float32, device=dev)
    qpad[:, :, :Tq] = q.float()
    qblk = qpad.view(-1, bq, D)
    row_ok = (qi >= 0).expand(B, Hq, nqb, bq).reshape(-1, bq)
    step = max(1, (1 << 25) // (2 * nb * D))  # work items per scoring batch: bounds the gathered keys
    while bool(((e - a) * valid).max() > 1):
        width = (e - a) * valid
        half = (width + 1) // 2
        hs = torch.stack([a, a + half], -1).view(-1, 2 * nb)
        he = torch.stack([a + half, e], -1).view(-1, 2 * nb)
        cvalid = torch.stack([valid, valid & (width > 1)], -1).view(-1, 2 * nb)
        rep = torch.maximum(hs * bk, start[:, None]).clamp(0, Tk - 1)
        scores = torch.empty(hs.shape, dtype=torch.float32, device=dev)
        for s0 in range(0, hs.shape[0], step):
            w = slice(s0, s0 + step)
            keys = gather_rows(k, b_of[w, None], h_of[w, None] // (Hq // Hkv), rep[w]).float()
            sc = torch.einsum("wqd,wcd->wqc", qblk[w], keys).masked_fill(~row_ok[w, :, None], float("-inf"))
            scores[w] = sc.amax(1)
        scores = scores.masked_fill(~cvalid, float("-inf"))
        keep = scores.argsort(dim=1, descending=True, stable=True)[:, :nb].sort(1).values  # ties: lower slot
        a, e, valid = hs.gather(1, keep), he.gather(1, keep), cvalid.gather(1, keep)

    big_int = torch.iinfo(torch.long).max
    s1 = cfg.max_selected - nb - (-(-cfg.window // bk) + 1)
    p1, p2 = torch.arange(s1, device=dev), torch.arange(cfg.max_selected - nb - s1, device=dev)
    parts = [torch.where(p1 < ns[:, None], (start // bk)[:, None] + p1, big_int),
             torch.where(valid & live[:, None], a, big_int),
             torch.where(p2 < nw[:, None], hi[:, None] + p2, big_int)]
    out = torch.cat(parts, 1).sort(1).values
    return out.masked_fill(out == big_int, -1).to(torch.int32).view(B, Hq, nqb, -1)


# ---------------------------------------------------------------- Triton

@triton.jit
def _hip_select_kernel(
    q_ptr, k_ptr, qidx_ptr, start_ptr, out_ptr, chunk_ptr, score_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd,
    Tq, Tk, Hq, NQB, n_work, group, NB, NSEL, SINK, WINDOW,
    BQ: tl.constexpr, BQ_P: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    NB_P: tl.constexpr, TC: tl.constexpr, NSEL_P: tl.constexpr, SHIFT: tl.constexpr,
    HAS_START: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
):
    NC: tl.constexpr = 2 * NB_P  # candidate slots: halves 2i, 2i+1 of chunk i (keeps chunks sorted)
    pid = tl.program_id(0)
    chunk_a = chunk_ptr + pid * NC  # chunk starts; chunk ends follow at + NB_P
    chunk_e = chunk_a + NB_P
    scores_p = score_ptr + pid * NC
    d = tl.arange(0, D_P)
    dmask = d < D
    r = tl.arange(0, BQ_P)
    ci_all = tl.arange(0, NC)
    ic = tl.arange(0, NB_P)
    for w_it in range(pid, n_work, tl.num_programs(0)):  # persistent: scratch is per program, not per work item
        w = tl.cast(w_it, tl.int32)  # the interpreter iterates Python ints
        qb = w % NQB
        h = (w // NQB) % Hq
        b = w // (NQB * Hq)
        rows = qb * BQ + r
        row_ok = (r < BQ) & (rows < Tq)
        last = tl.minimum(tl.max(tl.load(qidx_ptr + rows, mask=row_ok, other=-1), axis=0), Tk - 1)
        start = 0
        if HAS_START:
            start = tl.load(start_ptr + b)
        live = last >= start
        first = tl.where(SINK > 0, (tl.minimum(start + SINK, last + 1) + BK - 1) // BK, start // BK)
        win_first = tl.maximum(last - WINDOW + 1, start) // BK
        lo = first
        hi = tl.maximum(win_first, first)
        n = tl.where(live, hi - lo, 0)
        ns = tl.where(live, first - start // BK, 0)
        nw = tl.where(live, last // BK + 1 - hi, 0)
        nchunks = tl.minimum(n, NB)

        qbase = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        kbase = k_ptr + b.to(tl.int64) * skb + (h // group).to(tl.int64) * skh
        if USE_DOT:
            qt = tl.load(qbase + rows.to(tl.int64)[:, None] * sqt + d[None, :] * sqd,
                         mask=row_ok[:, None] & dmask[None, :], other=0.0)
        else:
            qv = tl.load(qbase + rows.to(tl.int64) * sqt + d * sqd, mask=dmask, other=0.0).to(tl.float32)

        # initial chunks: nb even pieces of the range (or each block alone when it holds <= nb)
        big = n > NB
        n64 = n.to(tl.int64)
        a0 = tl.where(big, lo + (ic.to(tl.int64) * n64 // NB).to(tl.int32), lo + ic)
        e0 = tl.where(big, lo + ((ic.to(tl.int64) + 1) * n64 // NB).to(tl.int32), lo + ic + 1)
        tl.debug_barrier()  # the previous work item's last reads of the scratch are done
        tl.store(chunk_a + ic, a0)
        tl.store(chunk_e + ic, e0)
        widest = (n + NB - 1) // NB  # chunk widths halve (rounding up) every round
        while widest > 1:
            tl.debug_barrier()
            for c0 in range(0, NC, TC):  # score candidates TC at a time
                c = c0 + tl.arange(0, TC)
                a = tl.load(chunk_a + c // 2)
                e = tl.load(chunk_e + c // 2)
                width = e - a
                hs = a + (c % 2) * ((width + 1) // 2)
                cvalid = (c // 2 < nchunks) & ((c % 2 == 0) | (width > 1))
                rep = tl.maximum(hs * BK, start).to(tl.int64)
                if USE_DOT:
                    kt = tl.load(kbase + rep[None, :] * skt + d[:, None] * skd,
                                 mask=cvalid[None, :] & dmask[:, None], other=0.0)
                    s = tl.dot(qt, kt, input_precision=PREC)
                    s = tl.max(tl.where(row_ok[:, None], s, float("-inf")), axis=0)
                else:
                    kk = tl.load(kbase + rep[:, None] * skt + d[None, :] * skd,
                                 mask=cvalid[:, None] & dmask[None, :], other=0.0)
                    s = tl.sum(kk.to(tl.float32) * qv[None, :], axis=1)
                tl.store(scores_p + c, tl.where(cvalid, s, float("-inf")))
            tl.debug_barrier()

            a = tl.load(chunk_a + ci_all // 2)
            e = tl.load(chunk_e + ci_all // 2)
            width = e - a
            half = (width + 1) // 2
            second = ci_all % 2
            hs = a + second * half
            he = tl.where(second == 0, a + half, e)
            cvalid_all = (ci_all // 2 < nchunks) & ((second == 0) | (width > 1))
            s = tl.load(scores_p + ci_all)
            s = tl.where(s == 0.0, 0.0, s)  # -0.0 and +0.0 tie, as in the reference
            bits = s.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # integer order == float order
            # unique composite: score first, then lower slot (== lower block) wins
            comp = key.to(tl.int64) * (1 << SHIFT) + ((1 << SHIFT) - 1 - ci_all)
            # bisect for a threshold t with exactly NB candidates >= t (comp is unique, so one exists);
            # typically ~12 steps: it stops as soon as t falls between the NB-th and NB+1-th
            lo_t = tl.min(tl.where(cvalid_all, comp, tl.max(comp, axis=0)), axis=0)
            hi_t = tl.max(comp, axis=0)
            while lo_t < hi_t:
                mid = lo_t + (hi_t - lo_t) // 2
                cnt = tl.sum((comp >= mid).to(tl.int32), axis=0)
                lo_t = tl.where(cnt > NB, mid + 1, tl.where(cnt == NB, mid, lo_t))
                hi_t = tl.where(cnt < NB, mid - 1, tl.where(cnt == NB, mid, hi_t))
            keep = comp >= lo_t
            pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1  # compaction keeps the chunks sorted
            tl.debug_barrier()
            tl.store(chunk_a + pos, hs, mask=keep)
            tl.store(chunk_e + pos, he, mask=keep)
            widest = (widest + 1) // 2

        tl.debug_barrier()
        obase = out_ptr + w.to(tl.int64) * NSEL
        p = tl.arange(0, NSEL_P)
        vals = tl.where(p < ns, start // BK + p, tl.where(p < ns + nchunks + nw, hi + p - ns - nchunks, -1))
        edge = (p < NSEL) & ((p < ns) | (p >= ns + nchunks))
        tl.store(obase + p, vals, mask=edge)
        tl.store(obase + ns + ic, tl.load(chunk_a + ic), mask=ic < nchunks)


def hip_select_triton(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, key_start: torch.Tensor | None,
                      cfg: HipConfig, *, cand_tile: int = 64, num_warps: int = 4, max_programs: int | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the Triton selection (interpreter on CPU tensors). `out`: optional int32 (B, Hq, NQB, NSEL)."""
    _check_inputs(q, k, q_idx, key_start)
    if cand_tile < 16 or cand_tile & (cand_tile - 1):
        raise ValueError(f"cand_tile={cand_tile} must be a power of two >= 16.")
    B, Hq, Tq, D = q.shape
    nb, nsel, bq = cfg.num_chunks, cfg.max_selected, cfg.block_size_q
    nqb = -(-Tq // bq)
    shape = (B, Hq, nqb, nsel)
    if out is None:
        out = torch.empty(shape, dtype=torch.int32, device=q.device)
    elif out.shape != shape or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int32 tensor of shape {shape}.")
    nb_p = max(8, triton.next_power_of_2(nb))
    n_work = B * Hq * nqb
    if max_programs is None:
        max_programs = torch.cuda.get_device_properties(q.device).multi_processor_count * 8 if q.is_cuda else n_work
    grid = max(1, min(n_work, max_programs))
    chunks = torch.empty(grid * 2 * nb_p, dtype=torch.int32, device=q.device)
    scores = torch.empty(grid * 2 * nb_p, dtype=torch.float32, device=q.device)
    rows = triton.next_power_of_2(min(bq, Tq))
    q_idx = q_idx.to(torch.int32)
    starts = key_start.to(torch.int32) if key_start is not None else q_idx  # dummy pointer when absent
    _hip_select_kernel[(grid,)](
        q, k, q_idx, starts, out, chunks, scores, *q.stride(), *k.stride(),
        Tq, k.shape[2], Hq, nqb, n_work, Hq // k.shape[1], nb, nsel, cfg.sink, cfg.window,
        BQ=bq, BQ_P=max(16, rows) if rows > 1 else 1, BK=cfg.block_size_k, D=D,
        D_P=max(16, triton.next_power_of_2(D)), NB_P=nb_p, TC=min(cand_tile, 2 * nb_p),
        NSEL_P=triton.next_power_of_2(nsel), SHIFT=(2 * nb_p).bit_length() - 1,
        HAS_START=key_start is not None, USE_DOT=rows > 1, num_warps=num_warps,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 scores must not drop to tf32
    )
    return out
