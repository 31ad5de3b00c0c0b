"""offload_engine/io/transfer.py: copies issued in pieces cover the tensor exactly once."""
from __future__ import annotations

import torch

import offload_engine.io.transfer as transfer


def test_pieces_cover_a_large_copy_once(monkeypatch):
    monkeypatch.setattr(transfer, "COPY_PIECE_BYTES", 40)  # 10 float32 elements a piece
    src = torch.randn(7, 9)
    dst = torch.full((7, 9), float("nan"))
    pieces = transfer._pieces(dst, src)
    assert [d.numel() for d, _ in pieces] == [10] * 6 + [3]
    for d, s in pieces:
        d.copy_(s)
    assert torch.equal(dst, src)


def test_small_or_strided_copies_stay_whole(monkeypatch):
    monkeypatch.setattr(transfer, "COPY_PIECE_BYTES", 40)
    src = torch.randn(9, 7)
    assert len(transfer._pieces(torch.empty(2, 5), src[:2, :5].contiguous())) == 1   # 40 bytes: one piece
    assert len(transfer._pieces(torch.empty(7, 9), src.t())) == 1                    # strided source
    assert len(transfer._pieces(torch.empty(9, 7, dtype=torch.float16), src)) == 1   # a casting copy
