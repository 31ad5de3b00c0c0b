"""Dense attention over a KV cache, on the GPU or the CPU.

Layouts: q is (B, Hq, s, D); keys/values are (B, Hkv, t, D) views, usually permuted from the
cache's token-major (t, B, Hkv, D) storage. Grouped-query attention: Hq is a multiple of Hkv
and query head h reads KV head h // (Hq // Hkv). `mask` is a boolean (B, 1, s, t) tensor, True where a
query may attend, or None for plain causal attention. Queries must already be scaled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# cuDNN's attention builds an execution plan for every new key length, i.e. every decode
# step (about 2 ms per layer on an H100); flash and memory-efficient kernels need no plan.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention (scale 1: the model scales q); fp16 runs natively on CPU too."""
    s, t = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and 1 < s < t:
        # A chunk of the prompt after the cache so far: causal aligned to the last keys. The lower-right
        # bias reaches the flash kernel on a GPU; a boolean mask with grouped-query heads would fall to
        # the math kernel, which materialises every score (48 GiB for a chunk of 8192 at 128k, batch 3).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(s, t), scale=1.0,
                                              enable_gqa=gqa)
    if mask is not None and gqa and q.is_cuda:
        # The memory-efficient kernel takes a mask but not grouped heads: give it whole heads.
        group = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
    with sdpa_kernel(_BACKENDS):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=1.0, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=gqa)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Float64 softmax(q k^T) v, the reference for tests."""
    s, t = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q.double() @ k.double().transpose(-1, -2)
    if mask is None:
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def padding_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(B, 1, s, t) mask for the last `num_queries` of t tokens: causal, skipping padded keys.

    A padded query may always see itself, so no row is empty (an all-masked row gives NaN,
    and NaN in a padded row's values would spread through later layers).
    """
    t = key_valid.shape[1]
    s = num_queries
    causal = torch.ones(s, t, dtype=torch.bool, device=key_valid.device).tril(t - s)
    mask = causal & key_valid[:, None, None, :]
    mask |= _diagonal(s, t, key_valid.device)
    return mask


def _diagonal(s: int, t: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(s, device=device)[:, None] + (t - s)
    return rows == torch.arange(t, device=device)[None, :]
