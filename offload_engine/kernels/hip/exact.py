"""The exact top-k key blocks: HiP's selection with the tree search replaced by full scores.

Same output as `hip_select` (int32 (B, Hq, NQB, NSEL), sink and window blocks included, rows
ascending, -1 padded) and the same sink / window / search-range rules, but each candidate block
is scored by the true max over the query block's queries and the block's keys of q . k. It reads
every key, so it is not a fast path: it is the upper bound that measures how much the tree
search's estimate loses (the accuracy table's "exact top-k" rows).
"""
from __future__ import annotations

import torch

from .select import HipConfig


def exact_select(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, key_start: torch.Tensor | None,
                 cfg: HipConfig) -> torch.Tensor:
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group, bq, bk, nb = Hq // Hkv, cfg.block_size_q, cfg.block_size_k, cfg.num_chunks
    nqb = -(-Tq // bq)
    out = torch.full((B, Hq, nqb, cfg.max_selected), -1, dtype=torch.int32, device=q.device)
    for b in range(B):
        start = int(key_start[b]) if key_start is not None else 0
        keys = k[b].float().repeat_interleave(group, 0)  # (Hq, Tk, D)
        for j in range(nqb):
            rows = slice(j * bq, min((j + 1) * bq, Tq))
            last = min(int(q_idx[rows].max()), Tk - 1)
            if last < start:
                continue
            sink_end = min(start + cfg.sink, last + 1)
            first = -(-sink_end // bk) if cfg.sink else start // bk
            window_first = max(last - cfg.window + 1, start) // bk
            lo, hi = first, max(window_first, first)
            fixed = list(range(start // bk, first)) + list(range(hi, last // bk + 1))
            if hi - lo <= nb:
                chosen = torch.arange(lo, hi, device=q.device).expand(Hq, -1)
            else:
                span = torch.arange(lo * bk, hi * bk, device=q.device)
                scores = (q[b, :, rows].float() @ keys[:, span].transpose(1, 2)).amax(1)  # (Hq, keys)
                scores = scores.masked_fill(span < start, float("-inf")).view(Hq, hi - lo, bk).amax(-1)
                order = scores.sort(dim=-1, descending=True, stable=True).indices[:, :nb]  # ties: lower block
                chosen = lo + order
            fixed_t = torch.tensor(fixed, dtype=torch.long, device=q.device).expand(Hq, -1)
            row = torch.cat([chosen, fixed_t], dim=-1).sort(-1).values
            out[b, :, j, :row.shape[1]] = row.to(torch.int32)
    return out
