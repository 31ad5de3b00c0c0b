"""H2O (and the sink baseline) over a whole prompt, teacher-forced: every query attends the
cache the policy kept when it arrived, exactly as if the prompt had been fed one decode step
per token (how perplexity scores an evicting policy), but in one prefill.

Within an attention layer, which tokens are kept at step t depends only on that layer's
queries and keys at steps <= t; so a layer can run over every position before the next layer
starts, and the projections, the MLP and the LM head run once over the whole window as in any
prefill. Only the softmax and the eviction are sequential. Queries go in blocks: a block may
attend only the tokens kept before it (the budget) and its own, so those columns are gathered,
one matmul gives the block's logits, kernels/h2o_scan_block.py steps through the block
(softmax over the kept columns, scores, eviction), and one more matmul gives the outputs.

The rule is H2OKV's (kv/h2o.py), so outputs equal the decode loop's to float rounding
(tests/test_h2o_scan.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_engine.kernels.h2o_scan_block import intra_op_threads, scan_block

from . import recent as recent_tokens

_BLOCK_ELEMS = 1 << 22  # logits per block of queries (16 MiB in fp32)
_MIN_BLOCK = 16  # queries per block at least: fewer, and the per-block work dominates
_MACS_PER_THREAD = 1 << 33  # a layer's scan matmuls per intra-op thread on the CPU (about 0.3 s a core)


@dataclass
class ScanState:
    """Per sequence and KV head, over the prompt's positions: which tokens are kept so far and
    their accumulated scores (0 where evicted). Carried from one prefill chunk to the next."""

    kept: torch.Tensor  # (B, Hkv, prompt length) bool
    score: torch.Tensor  # (B, Hkv, prompt length) float32

    @classmethod
    def empty(cls, batch: int, kv_heads: int, length: int, device: torch.device) -> "ScanState":
        return cls(torch.zeros(batch, kv_heads, length, dtype=torch.bool, device=device),
                   torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=device))


def h2o_scan(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_value: torch.Tensor | None,
             state: ScanState, budget: int, recent: int, sinks: bool,
             exact: tuple[torch.Tensor, torch.Tensor] | None = None, decay: float = 1.0) -> torch.Tensor:
    """Queries q (B, s, Hq, D), already scaled, of positions start..start + s - 1, where start =
    keys.shape[1] - s, over keys and values (B, start + s, Hkv, D) as the cache returns them (a
    packed cache's rounding included). `first_value` (B, Hkv, D): position 0's value as the
    one-token prefill attends it (unrounded), used when start == 0. Updates `state`; returns
    the outputs (B, s, Hq, D) in q's dtype. No padding. `exact`: the unrounded keys and values of a
    packed cache, attended instead of the rounded ones within RECENT_EXACT tokens of each query
    (as the decode step reads them: kv/recent.py's ExactRing)."""
    b, s, hq, d = q.shape
    end, hkv = keys.shape[1], keys.shape[2]
    start, rep = end - s, hq // hkv
    # Head-major rows (B * Hkv * T, D): a block's columns are then whole rows to index_select.
    keys, values = (x.permute(0, 2, 1, 3).reshape(b * hkv * end, d) for x in (keys, values))
    if exact is not None:
        exact = tuple(x.permute(0, 2, 1, 3).reshape(b * hkv * end, d) for x in exact)
    row0 = torch.arange(b * hkv, device=q.device).view(b, hkv, 1) * end  # each (sequence, KV head)'s first row
    queries = q.view(b, s, hkv, rep, d).permute(0, 2, 1, 3, 4).contiguous()  # (B, Hkv, s, rep, D)
    blocks, i0 = [], 0
    with intra_op_threads(_threads(q.device, b * hq, s, d, budget)):
        while i0 < s:
            k0 = min(start + i0, budget)  # tokens kept before the block, in every row
            n = min(s - i0, _block(b * hq, k0))
            blocks.append(_scan_block(queries[:, :, i0:i0 + n], keys, values, row0, state, start + i0, k0, budget,
                                      recent, sinks, exact, decay))
            i0 += n
    out = torch.cat(blocks, 2).view(b, hkv, s, rep, d)
    if start == 0 and first_value is not None:  # the one-token prefill's output is its own value, exactly
        out[:, :, 0] = first_value[:, :, None, :].to(out.dtype)
    return out.permute(0, 2, 1, 3, 4).reshape(b, s, hq, d)


def _threads(device: torch.device, rows: int, s: int, d: int, budget: int) -> int:
    """Intra-op threads for a layer's blocks: on the CPU one per _MACS_PER_THREAD of the layer's
    matmuls (the blocks' ops are a few MB; on a busy host waking the pool for each cost
    milliseconds: SmolLM2-135M, 3 windows of 2048, budget 409, 3.8e9 multiply-adds: 0.34 s a
    layer on one thread against 1.2 s on two on a shared 2-core host)."""
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return threads
    macs = 2 * rows * s * (budget + _block(rows, budget)) * d
    return max(1, min(threads, macs // _MACS_PER_THREAD))


def _block(rows: int, k0: int) -> int:
    """Queries per block: the block's logits (rows x n x (k0 + n)) within _BLOCK_ELEMS."""
    n = _MIN_BLOCK
    while rows * (2 * n) * (k0 + 2 * n) <= _BLOCK_ELEMS:
        n *= 2
    return n


def _scan_block(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row0: torch.Tensor,
                state: ScanState, first: int, k0: int, budget: int, recent: int, sinks: bool,
                exact: tuple[torch.Tensor, torch.Tensor] | None = None, decay: float = 1.0) -> torch.Tensor:
    """Queries (B, Hkv, n, rep, D) of positions first..first + n - 1 over head-major key and
    value rows; returns their outputs (B, Hkv, n * rep, D)."""
    b, hkv, n, rep, d = queries.shape
    columns = _columns(state.kept, first, k0, n)  # (B, Hkv, K) ascending positions
    rows = (columns + row0).view(-1)
    k_cols, v_cols = (x.index_select(0, rows).view(b, hkv, -1, d) for x in (keys, values))
    flat = queries.reshape(b, hkv, n * rep, d)
    logits = (flat @ k_cols.transpose(-1, -2)).float()
    if exact is not None:  # the last columns hold every token within RECENT_EXACT of a query here
        near_tokens = recent_tokens.RECENT_EXACT
        w = min(k0, near_tokens - 1) + n
        tail = columns[..., -w:]
        k_tail, v_tail = (x.index_select(0, (tail + row0).view(-1)).view(b, hkv, w, d) for x in exact)
        position = first + torch.arange(n, device=queries.device).repeat_interleave(rep)
        near = position[:, None] - tail[..., None, :] < near_tokens  # (B, Hkv, n * rep, w)
        logits[..., -w:] = torch.where(near, (flat @ k_tail.transpose(-1, -2)).float(), logits[..., -w:])
    kept, score = state.kept.gather(2, columns), state.score.gather(2, columns)
    probs = scan_block(logits.view(b, hkv, n, rep, -1), kept, score, columns, k0, budget, recent, sinks, decay)
    state.kept.scatter_(2, columns, kept)
    state.score.scatter_(2, columns, score)
    probs = probs.view(b, hkv, n * rep, -1).to(v_cols.dtype)
    out = probs @ v_cols
    if exact is not None:
        out = out + (probs[..., -w:] * near) @ (v_tail - v_cols[..., -w:, :])
    return out


def _columns(kept: torch.Tensor, first: int, k0: int, n: int) -> torch.Tensor:
    """The k0 positions kept before `first` (ascending), then first..first + n - 1: (B, Hkv, k0 + n)."""
    b, hkv = kept.shape[:2]
    own = torch.arange(first, first + n, device=kept.device).expand(b, hkv, n)
    if k0 == 0:
        return own.contiguous()
    # A stable sort of "not kept" puts the kept positions first, in ascending order.
    before = (~kept[..., :first]).to(torch.uint8).sort(dim=-1, stable=True).indices[..., :k0]
    return torch.cat([before, own], -1)
