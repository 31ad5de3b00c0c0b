"""KIVI's KV format: keys quantized per channel over blocks of 32 tokens, values per token.

Keys have outlier channels: a few channels of the head dimension hold values far larger than
the rest, so a group along the head dimension (pack.py's per-token records) spends its 16
levels on the outlier and rounds every other channel to a few codes. Within one channel, a
block of consecutive tokens spans a narrow range, so keys are grouped along tokens instead.

Both keys and values use pack.py's records with groups of 32 (4-bit: 20 bytes, 2-bit: 12: the codes
plus 4 per 32 elements), one (G = head_dim / 32, R) row of records per token, so every tier, copy
and gather treats the cache as per-token records like any other packed cache:
- values: record (t, g) is token t's channels [32g, 32g + 32), quantized together (pack.py);
- keys, in blocks of 32 tokens: record (t, g) holds token t's codes of channels [32g, 32g + 32)
  (in pack.py's order: 4-bit byte j holds channels 32g + j and 32g + j + 16) and in
  its 4 header bytes the scale and minimum of channel 32g + i of the whole block, i = t mod 32.
  Those are pack.py's parameters of the channel's 32 values along the block's tokens, so the
  rounding rule and its bound (|error| <= scale / 2) are pack.py's exactly.
A block is written once it is full: until then its tokens stay exact (KIVI's residual, which
the KV access keeps; see kv/residual.py). Left padding is left out of a block's ranges.
"""
from __future__ import annotations

import torch

from .pack import QuantSpec, dequantize_reference, pack_codes, quantize, unpack_codes

BLOCK = 32  # tokens per key block = elements per value group


def kivi_spec(bits: int = 4) -> QuantSpec:
    return QuantSpec(bits=bits, group_size=BLOCK)


def check_head_dim(head_dim: int) -> None:
    if head_dim % BLOCK:
        raise ValueError(f"the per-channel KV codec needs a head dimension divisible by {BLOCK}, got {head_dim}.")




def encode_keys(keys: torch.Tensor, spec: QuantSpec, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Whole blocks of keys (n * 32, B, H, D), token-major, -> uint8 (n * 32, B, H, D / 32, R).

    `valid` (B, n * 32) marks real tokens: padding is left out of each channel's range (with left
    padding a block's real tokens are its last ones, so padded slots take the block's last key)."""
    t, b, h, d = keys.shape
    if t % BLOCK:
        raise ValueError(f"keys are encoded in whole blocks of {BLOCK} tokens, got {t}.")
    check_head_dim(d)
    n, g = t // BLOCK, d // BLOCK
    x = keys.reshape(n, BLOCK, b, h, d)
    if valid is not None:
        x = torch.where(valid.T.reshape(n, BLOCK, b)[..., None, None], x, x[:, BLOCK - 1:])
    per_channel = quantize(x.permute(0, 2, 3, 4, 1), spec)                 # (n, B, H, D, 1, R)
    head, codes = per_channel[..., 0, :4], per_channel[..., 0, 4:]
    codes = unpack_codes(codes, spec.bits).permute(0, 4, 1, 2, 3)                # (n, token, B, H, D)
    codes = pack_codes(codes.reshape(n, BLOCK, b, h, g, BLOCK), spec.bits)
    head = head.reshape(n, b, h, g, BLOCK, 4).permute(0, 4, 1, 2, 3, 5)    # channel 32g + i -> record (i, g)
    return torch.cat([head, codes], -1).reshape(t, b, h, g, spec.record_bytes)


def encode_values(values: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return quantize(values, spec)


def dequantize_keys(packed: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n * 32, B, H, G, R) key records -> (n * 32, B, H, G * 32) values (any strided view)."""
    t, b, h, g, r = packed.shape
    n = t // BLOCK
    blocks = packed.reshape(n, BLOCK, b, h, g, r)
    try:
        sm = blocks[..., :4].view(torch.float16).float()                    # (n, i, B, H, G, 2)
    except RuntimeError:
        sm = blocks[..., :4].contiguous().view(torch.float16).float()
    sm = sm.permute(0, 2, 3, 4, 1, 5)[:, None]                              # (n, 1, B, H, G, channel, 2)
    codes = unpack_codes(blocks[..., 4:], spec.bits).float()                     # (n, token, B, H, G, channel)
    vals = torch.addcmul(sm[..., 1], codes, sm[..., 0])
    return vals.reshape(t, b, h, g * BLOCK).to(dtype)


def dequantize_keys_reference(packed: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float64 keys, reading each channel's block of records back as one pack.py group."""
    t, b, h, g, r = packed.shape
    n = t // BLOCK
    blocks = packed.reshape(n, BLOCK, b, h, g, r)
    codes = unpack_codes(blocks[..., 4:].to(torch.int32), spec.bits)            # (n, token, B, H, G, channel)
    along_tokens = pack_codes(codes.permute(0, 2, 3, 4, 5, 1), spec.bits).to(torch.uint8)  # (n, B, H, G, ch, tok)
    head = blocks[..., :4].permute(0, 2, 3, 4, 1, 5)                        # (n, B, H, G, channel, 4)
    groups = torch.cat([head, along_tokens], -1)[..., None, :]              # one group of 32 tokens
    vals = dequantize_reference(groups, spec, BLOCK)                        # (n, B, H, G, channel, token)
    return vals.permute(0, 5, 1, 2, 3, 4).reshape(t, b, h, g * BLOCK)
