"""HiP kernels: block selection (kernels/hip/select.py) and block-sparse attention.

Triton launchers run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET) or
compiled on a GPU when there is one; references run on the CPU. Selection must match the loop
reference exactly; attention is compared with a float64 reference by relative error
||a - b|| / ||b||: 1e-5 for fp32, 1e-3 for fp16, 1e-2 for bf16.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from offload_engine.kernels.attention import attention_reference
from offload_engine.kernels.cpu_attention import cpp_backend
from offload_engine.kernels.hip.attention import (block_sparse_attention, block_sparse_attention_cpu,
                                   block_sparse_attention_reference, block_sparse_attention_torch,
                                   block_sparse_attention_triton)
from offload_engine.kernels.hip.select import HipConfig, hip_select, hip_select_reference, hip_select_torch, hip_select_triton

from conftest import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SMALL = HipConfig(k=16, block_size_q=8, block_size_k=2, sink=3, window=8)


def make_qk(B, Hq, Hkv, Tq, Tk, D, seed, dtype=torch.float32, token_major=True, dyadic=False):
    """Random q and k; keys as the engine stores them: a permuted view of a (Tk, B, H, D) cache.

    dyadic: values on a 1/4 grid, so every dot product is exact in any summation order and
    equal scores (ties) are common: this pins down the tie rule.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k = torch.randn(Tk, B, Hkv, D, generator=g).permute(1, 2, 0, 3) if token_major else torch.randn(B, Hkv, Tk, D, generator=g)
    if dyadic:
        q, k = (q * 4).round() / 4, (k * 4).round() / 4
    return q.to(dtype), k.to(dtype)


def positions(Tq, Tk, start):
    """q_idx for the last Tq of Tk tokens, and key_start (None for no padding)."""
    q_idx = torch.arange(Tk - Tq, Tk, dtype=torch.int32)
    return q_idx, (None if start is None else torch.tensor(start, dtype=torch.int32))


def dev(t):
    return None if t is None else t.to(DEV)


SELECT_CASES = {  # B, Hq, Hkv, Tq, Tk, D, cfg, key_start, options
    "prefill-gqa-partial-block": (2, 4, 2, 21, 150, 16, SMALL, [0, 5], {}),
    "decode-mha-padded": (2, 2, 2, 1, 301, 24, SMALL, [7, 0], {}),
    "prefill-ties": (2, 4, 4, 37, 200, 24, SMALL, [3, 40], dict(dyadic=True)),
    "T-smaller-than-k": (1, 2, 1, 9, 9, 16, SMALL, None, {}),
    "padded-query-block": (1, 2, 2, 40, 40, 16, HipConfig(k=8, block_size_q=16, sink=2, window=16), [30], {}),
    "bk1-bq1-no-sink": (2, 2, 1, 5, 120, 16, HipConfig(k=8, block_size_q=1, block_size_k=1, sink=0, window=4),
                        [3, 117], {}),
    "bk4-odd-T-contiguous": (2, 4, 1, 13, 141, 32, HipConfig(k=16, block_size_q=4, block_size_k=4, sink=5, window=8),
                             [1, 9], dict(token_major=False)),
    "defaults-decode": (1, 1, 1, 1, 3001, 64, HipConfig(), [11], {}),
    "fp16-ties": (1, 4, 2, 20, 170, 32, SMALL, [2], dict(dtype=torch.float16, dyadic=True)),
}


@pytest.mark.parametrize("name", list(SELECT_CASES))
def test_select_triton_and_torch_equal_reference(name):
    B, Hq, Hkv, Tq, Tk, D, cfg, start, opts = SELECT_CASES[name]
    q, k = make_qk(B, Hq, Hkv, Tq, Tk, D, seed=len(name), **opts)
    q_idx, key_start = positions(Tq, Tk, start)
    ref = hip_select_reference(q, k, q_idx, key_start, cfg)
    assert (ref >= 0).sum() > 0
    out = torch.full(ref.shape, -7, dtype=torch.int32, device=DEV)  # unwritten entries would show as -7
    hip_select_triton(dev(q), dev(k), dev(q_idx), dev(key_start), cfg, out=out)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(hip_select_torch(q, k, q_idx, key_start, cfg), ref)


def test_select_triton_persistent_programs_reuse_scratch():
    """Fewer programs than query blocks: each program walks several, reusing its scratch."""
    q, k = make_qk(2, 2, 1, 29, 160, 16, seed=3)
    q_idx, key_start = positions(29, 160, [4, 0])
    ref = hip_select_reference(q, k, q_idx, key_start, SMALL)
    out = hip_select_triton(dev(q), dev(k), dev(q_idx), dev(key_start), SMALL, max_programs=3)
    assert torch.equal(out.cpu(), ref)


def test_selection_follows_the_definition():
    """Checks that do not go through any implementation's search: the layout of every row."""
    cfg = HipConfig(k=16, block_size_q=8, block_size_k=2, sink=5, window=12)
    Tq, Tk, starts = 24, 203, [0, 9, 150]
    q, k = make_qk(3, 2, 1, Tq, Tk, 16, seed=7)
    q_idx, key_start = positions(Tq, Tk, starts)
    sel = hip_select(q, k, q_idx, key_start, cfg)
    bk = cfg.block_size_k
    assert sel.shape == (3, 2, 3, cfg.max_selected)
    for b, start in enumerate(starts):
        for j in range(3):
            last = int(q_idx[j * 8:(j + 1) * 8].max())
            for h in range(2):
                row = sel[b, h, j]
                n = int((row >= 0).sum())
                assert (row[n:] == -1).all() and (row[:n].diff() > 0).all()  # ascending, unique, -1 padded
                blocks = set(row[:n].tolist())
                sink = {t // bk for t in range(start, min(start + cfg.sink, last + 1))}
                window = {t // bk for t in range(max(last - cfg.window + 1, start), last + 1)}
                assert sink | window <= blocks
                assert min(blocks) == start // bk and max(blocks) == last // bk
                middle = blocks - sink - window
                between = max(0, min(window) - max(sink) - 1)  # blocks strictly between the two
                assert len(middle) == min(between, cfg.num_chunks)
                assert all(max(sink) < x < min(window) for x in middle)


def attention_inputs(B, Hq, Hkv, Tq, Tk, D, cfg, start, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Tq, D, generator=g) * D ** -0.5).to(dtype)
    k = torch.randn(Tk, B, Hkv, D, generator=g).permute(1, 2, 0, 3).to(dtype)
    v = torch.randn(Tk, B, Hkv, D, generator=g).permute(1, 2, 0, 3).to(dtype)
    q_idx, key_start = positions(Tq, Tk, start)
    sel = hip_select(q.float(), k.float(), q_idx, key_start, cfg)
    return q, k, v, sel, q_idx, key_start


def run_triton(q, k, v, sel, q_idx, key_start, bq, bk, block_pos=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)  # unwritten elements fail
    block_sparse_attention_triton(dev(q), dev(k), dev(v), dev(sel), dev(q_idx), dev(key_start), bq, bk,
                                  dev(block_pos), out=out)
    return out.cpu()


ATTN_CASES = {  # B, Hq, Hkv, Tq, Tk, D, cfg, key_start
    "prefill-gqa": (2, 4, 2, 21, 150, 16, SMALL, [0, 5]),
    "decode-gqa": (3, 4, 1, 1, 301, 40, SMALL, [7, 0, 290]),
    "prefill-bk4-odd": (2, 2, 1, 13, 141, 32, HipConfig(k=16, block_size_q=4, block_size_k=4, sink=5, window=8), [1, 9]),
    "padded-query-block": (1, 2, 2, 40, 40, 16, HipConfig(k=8, block_size_q=16, sink=2, window=16), [30]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_matches_float64_reference(name, dtype):
    B, Hq, Hkv, Tq, Tk, D, cfg, start = ATTN_CASES[name]
    if dtype == torch.bfloat16 and Tq > 1 and INTERPRET:
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; this case runs on a GPU")
    q, k, v, sel, q_idx, key_start = attention_inputs(B, Hq, Hkv, Tq, Tk, D, cfg, start, dtype)
    args = (sel, q_idx, key_start, cfg.block_size_q, cfg.block_size_k)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), *args)
    out = run_triton(q, k, v, *args)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(block_sparse_attention_torch(q, k, v, *args), ref) < TOL[dtype]  # the CPU (PyTorch) path
    if Tq == 1 and cpp_backend() is not None:  # decode on the CPU: the C++ token-list kernel
        assert rel_err(block_sparse_attention_cpu(q, k, v, *args), ref) < TOL[dtype]
    if name == "padded-query-block":  # queries before key_start see nothing: exactly 0, not NaN
        assert (out[:, :, :30] == 0).all() and out[:, :, 30:].abs().sum() > 0


@pytest.mark.parametrize("Tq", [1, 21])
def test_block_pos_remapping_leaves_output_unchanged(Tq):
    """Blocks scattered into random slots of a compact per-(row, kv head) buffer full of noise."""
    B, Hq, Hkv, Tk, D, bk = 2, 4, 2, 150, 16, SMALL.block_size_k
    q, k, v, sel, q_idx, key_start = attention_inputs(B, Hq, Hkv, Tq, Tk, D, SMALL, [0, 5], torch.float32, seed=1)
    g = torch.Generator().manual_seed(5)
    slots = 60
    kbuf = torch.randn(slots * bk, B, Hkv, D, generator=g).permute(1, 2, 0, 3)
    vbuf = torch.randn(slots * bk, B, Hkv, D, generator=g).permute(1, 2, 0, 3)
    block_idx = torch.full_like(sel, -1)
    group = Hq // Hkv
    for b in range(B):
        for kvh in range(Hkv):
            rows = sel[b, kvh * group:(kvh + 1) * group]
            used = rows[rows >= 0].unique()
            slot_of = torch.full((Tk // bk + 1,), -1, dtype=torch.long)
            slot_of[used] = torch.randperm(slots, generator=g)[:len(used)]
            for t in range(bk):
                tok = (used * bk + t).clamp(max=Tk - 1)  # the tail of a partial last block is masked anyway
                kbuf[b, kvh, slot_of[used] * bk + t] = k[b, kvh, tok]
                vbuf[b, kvh, slot_of[used] * bk + t] = v[b, kvh, tok]
            block_idx[b, kvh * group:(kvh + 1) * group] = torch.where(rows >= 0, slot_of[rows.clamp(min=0)], -1).int()
    args = (q_idx, key_start, SMALL.block_size_q, bk)
    plain = run_triton(q, k, v, sel, *args)
    remapped = run_triton(q, kbuf, vbuf, block_idx, *args, block_pos=sel)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), sel, *args)
    assert rel_err(plain, ref) < 1e-5
    assert rel_err(remapped, plain) < 1e-6
    ref_remapped = block_sparse_attention_reference(q.double(), kbuf.double(), vbuf.double(), block_idx, *args,
                                                    block_pos=sel)
    assert rel_err(ref_remapped, ref) < 1e-12
    assert rel_err(block_sparse_attention(q, kbuf, vbuf, block_idx, *args, block_pos=sel), ref) < 1e-5
    assert rel_err(block_sparse_attention_torch(q, kbuf, vbuf, block_idx, *args, block_pos=sel), ref) < 1e-5
    wrong = run_triton(q, kbuf, vbuf, block_idx, *args)  # without block_pos the masks are wrong: must differ
    assert rel_err(wrong, ref) > 1e-3


@pytest.mark.parametrize("Tq,start", [(1, None), (17, None), (17, [0, 6])])
def test_everything_selected_equals_dense_causal_attention(Tq, start):
    Tk, D = 70, 16
    cfg = HipConfig(k=128, block_size_q=8, block_size_k=2, sink=4, window=8)  # k >= T: all blocks selected
    q, k, v, sel, q_idx, key_start = attention_inputs(2, 4, 2, Tq, Tk, D, cfg, start, torch.float32, seed=2)
    bk = cfg.block_size_k
    for j in range(sel.shape[2]):  # every block from the first valid key to the block's last query
        last = int(q_idx[j * 8:(j + 1) * 8].max())
        for b in range(2):
            first = start[b] // bk if start else 0
            expect = torch.arange(first, last // bk + 1, dtype=torch.int32)
            assert torch.equal(sel[b, :, j, :len(expect)], expect.expand(4, -1))
            assert (sel[b, :, j, len(expect):] == -1).all()
    args = (sel, q_idx, key_start, cfg.block_size_q, bk)
    out = run_triton(q, k, v, *args)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    if start is None:
        dense = attention_reference(q.double(), kk.double(), vv.double(), None)
        causal = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
        sdpa = F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal, scale=1.0)
        assert rel_err(sdpa, dense) < 1e-5  # the two dense references agree
    else:
        key_pos = torch.arange(Tk)
        mask = (key_pos <= q_idx[:, None]) & (key_pos >= key_start.view(2, 1, 1, 1))
        scores = (q.double() @ kk.double().transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        dense = scores.softmax(-1) @ vv.double()
    assert rel_err(out, dense) < 1e-5
    assert rel_err(block_sparse_attention(q, k, v, *args), dense) < 1e-5


def test_recall_beats_random_selection():
    """Recall of the searched blocks against the exact top-k/bk blocks of the same range, where a
    block's exact score is the true max over the query block's queries and the block's keys of q.k."""
    cfg = HipConfig(k=64, block_size_q=16, block_size_k=2, sink=4, window=32)
    T, H, Tq, D, bk, nb = 2048, 8, 64, 32, 2, cfg.num_chunks
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, Tq, D, generator=g)
    keys = {"gaussian": torch.randn(1, H, T, D, generator=g),
            # a smooth random walk along the sequence plus noise: neighbouring keys are similar
            "locality": (torch.randn(1, H, T, D, generator=g) * 0.15).cumsum(2) + 0.3 * torch.randn(1, H, T, D, generator=g)}
    q_idx = torch.arange(T - Tq, T, dtype=torch.int32)
    result = {}
    for kind, k in keys.items():
        sel = hip_select(q, k, q_idx, None, cfg)
        recall, chance = [], []
        for h in range(H):
            for j in range(Tq // cfg.block_size_q):
                rows = slice(j * cfg.block_size_q, (j + 1) * cfg.block_size_q)
                last = int(q_idx[rows].max())
                lo, hi = -(-cfg.sink // bk), (last - cfg.window + 1) // bk  # the searched range
                exact = (q[0, h, rows] @ k[0, h, lo * bk:hi * bk].T).amax(0).view(-1, bk).amax(1).topk(nb).indices + lo
                got = [x for x in sel[0, h, j].tolist() if lo <= x < hi]
                assert len(got) == nb
                recall.append(len(set(got) & set(exact.tolist())) / nb)
                chance.append(nb / (hi - lo))
        result[kind] = (sum(recall) / len(recall), sum(chance) / len(chance))
    print("recall (hip, random):", {k: (round(a, 3), round(b, 3)) for k, (a, b) in result.items()})
    assert result["gaussian"][0] >= 2 * result["gaussian"][1]  # measured 0.10 against 0.032
    assert result["locality"][0] >= 10 * result["locality"][1]  # measured 0.79 against 0.032
    assert result["locality"][0] >= 0.5


@pytest.mark.parametrize("kwargs", [dict(k=5, block_size_k=2), dict(block_size_k=3, k=24), dict(k=0),
                                    dict(window=16, block_size_q=32), dict(sink=-1), dict(block_size_q=0)])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        HipConfig(**kwargs)


def test_bad_inputs_raise():
    q, k = make_qk(1, 4, 2, 5, 40, 16, seed=0)
    q_idx, _ = positions(5, 40, None)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        hip_select(q, k[:, :1].expand(1, 3, 40, 16), q_idx, None, SMALL)
    with pytest.raises(ValueError, match="q_idx"):
        hip_select(q, k, q_idx.float(), None, SMALL)
    with pytest.raises(ValueError, match="key_start"):
        hip_select(q, k, q_idx, torch.zeros(2, dtype=torch.int32), SMALL)
    with pytest.raises(ValueError, match="cand_tile"):
        hip_select_triton(q, k, q_idx, None, SMALL, cand_tile=24)
    sel = hip_select(q, k, q_idx, None, SMALL)
    with pytest.raises(ValueError, match="block_idx"):
        block_sparse_attention(q, k, k, sel[:, :, :, :3].transpose(2, 3), q_idx, None, 8, 2)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, k, k, sel, q_idx, None, 8, 3)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k, k.half(), sel, q_idx, None, 8, 2)
    with pytest.raises(ValueError, match="block_pos"):
        block_sparse_attention(q, k, k, sel, q_idx, None, 8, 2, block_pos=sel[..., :2])


def test_gather_rows_equals_advanced_indexing():
    """The index_select fast path (a strided head-major slice) and the fallback (token-major view)."""
    from offload_engine.kernels.hip.gather import gather_rows

    g = torch.Generator().manual_seed(9)
    head_major = torch.randn(3, 4, 40, 8, generator=g)[:, :, :25]
    token_major = torch.randn(25, 3, 4, 8, generator=g).permute(1, 2, 0, 3)
    b_of, h_of = torch.arange(3).view(3, 1, 1, 1), torch.arange(4).view(1, 4, 1, 1)
    idx = torch.randint(0, 25, (3, 4, 2, 6), generator=g)
    for x in (head_major, token_major):
        assert torch.equal(gather_rows(x, b_of, h_of, idx), x[b_of, h_of, idx])
    assert torch.equal(gather_rows(head_major, b_of, h_of // 2, idx[:1, :1]), head_major[b_of, h_of // 2, idx[:1, :1]])
