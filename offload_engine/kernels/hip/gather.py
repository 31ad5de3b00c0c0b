"""Gathering cached rows on the CPU: what HiP's PyTorch paths read keys and values with."""
from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, b_of, h_of, idx) -> torch.Tensor:
    """x[b_of, h_of, idx] (..., D): one index_select of whole rows when x's rows of D are evenly
    strided (a cache slice is), about 4x faster on the CPU than advanced indexing."""
    D = x.shape[-1]
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or s2 != D or s1 % D or s0 % D:
        return x[b_of, h_of, idx]
    B, H, T, _ = x.shape
    rows = (B - 1) * (s0 // D) + (H - 1) * (s1 // D) + T
    index = b_of * (s0 // D) + h_of * (s1 // D) + idx
    return x.as_strided((rows, D), (D, 1)).index_select(0, index.reshape(-1)).view(*index.shape, D)
