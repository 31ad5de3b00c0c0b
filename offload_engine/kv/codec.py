"""How KV tokens are stored: as they are, or packed 4/8-bit (kernels/quant/pack.py).

A codec gives the per-token storage shape and dtype that homes, staging slots and transfers
use, encodes new tokens into a cache slice, and runs decode attention over a stored cache. The
rest of the KV machinery is the same for both: tiers only ever see bytes.
"""
from __future__ import annotations

import torch

from offload_engine.kernels.attention import attention


def token_major_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                          mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, s, Hq, D) over the first `length` tokens of token-major (T, B, Hkv, D) keys/values."""
    keys, values = k[:length].permute(1, 2, 0, 3), v[:length].permute(1, 2, 0, 3)
    return attention(q.transpose(1, 2), keys, values, mask).transpose(1, 2)


class PlainCodec:
    """Tokens stored in the compute dtype."""

    packed = False
    blocked = False  # tokens are written home as they arrive (ChannelKeyCodec: a block at a time)

    def __init__(self, dtype: torch.dtype, head_dim: int):
        self.dtype, self.head_dim = dtype, head_dim
        self.compute_dtype = dtype

    @property
    def tail(self) -> tuple[int, ...]:
        return (self.head_dim,)

    def encode(self, x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(x)

    def encoded(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        return token_major_attention(q, k, v, length, mask)


class PackedCodec:
    """Tokens quantized group-wise along the head dimension; decode attention reads the packed
    cache directly (the full-precision cache is never materialised)."""

    packed = True
    blocked = False

    def __init__(self, spec, compute_dtype: torch.dtype, head_dim: int):
        self.spec, self.compute_dtype, self.head_dim = spec, compute_dtype, head_dim
        self.dtype = torch.uint8

    @property
    def tail(self) -> tuple[int, ...]:
        return (self.spec.num_groups(self.head_dim), self.spec.record_bytes)

    def encode(self, x: torch.Tensor, out: torch.Tensor) -> None:
        from offload_engine.kernels.quant.pack import quantize
        quantize(x, self.spec, out=out)

    def encoded(self, x: torch.Tensor) -> torch.Tensor:
        from offload_engine.kernels.quant.pack import quantize
        return quantize(x, self.spec)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        from offload_engine.kernels.quant.pack import dequantize
        return dequantize(stored, self.spec, self.head_dim, self.compute_dtype)

    def attend(self, q, k, v, length, mask, key_valid: torch.Tensor | None = None):
        """Decode only (one query per sequence): `key_valid` (B, length) masks left padding."""
        from offload_engine.kernels.quant.attention import quant_decode_attention
        assert q.shape[1] == 1, "packed caches are attended in decode steps only"
        out = quant_decode_attention(q[:, 0], k, v, self.spec, self.head_dim, length, key_valid)
        return out[:, None]


class ChannelKeyCodec(PackedCodec):
    """KIVI (kernels/quant/kivi.py): keys per channel over blocks of 32 tokens, values per token.
    A block is encoded once it is full; the access keeps the newest tokens exact until then
    (kv/recent.py) and attends the two parts together (`attend_recent`)."""

    blocked = True

    def __init__(self, spec, compute_dtype: torch.dtype, head_dim: int):
        from offload_engine.kernels.quant.kivi import check_head_dim
        check_head_dim(head_dim)
        super().__init__(spec, compute_dtype, head_dim)

    def encode(self, x, out):
        raise RuntimeError("a per-channel cache is written a block at a time: use encode_blocks")

    encoded = encode

    def decode(self, stored):
        raise RuntimeError("a per-channel cache is attended packed (attend_recent), never decoded token by token")

    def encode_blocks(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None):
        """Whole blocks (n * 32, B, H, D) -> their records; `valid` (B, n * 32) marks real tokens."""
        from offload_engine.kernels.quant.kivi import encode_keys, encode_values
        return encode_keys(k, self.spec, valid), encode_values(v, self.spec)

    def finished_blocks(self, recent, t: int, k_new: torch.Tensor, v_new: torch.Tensor,
                        key_valid: torch.Tensor | None):
        """Hand tokens [t, t + s) (s, B, H, D) to `recent` (kv/recent.py); the records of the blocks
        they complete, (start, keys, values), or None. key_valid (B, >= t + s), None: no padding."""
        done = recent.append(t, k_new, v_new)
        if done is None:
            return None
        start, k, v = done
        valid = key_valid[:, start:start + k.shape[0]] if key_valid is not None else None
        return (start, *self.encode_blocks(k, v, valid))

    def attend_recent(self, q, k, v, flushed: int, recent_k, recent_v, key_valid):
        """Decode: q (B, 1, Hq, D) over `flushed` packed tokens of k/v (token-major records) and the
        exact tokens after them (r, B, H, D); key_valid (B, flushed + r)."""
        from offload_engine.kernels.quant.attention import attention_with_recent
        out = attention_with_recent(q[:, 0], k, v, self.spec, self.head_dim, flushed, recent_k, recent_v, key_valid)
        return out[:, None]


def make_codec(compression, dtype: torch.dtype, head_dim: int):
    if compression is None:
        return PlainCodec(dtype, head_dim)
    if compression.keys_per_channel:
        return ChannelKeyCodec(compression.kernel_spec(), dtype, head_dim)
    return PackedCodec(compression.kernel_spec().for_length(head_dim), dtype, head_dim)
