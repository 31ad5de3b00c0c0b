"""Building blocks the model families share: linear layers, norms and rotary positions.

Layers call these instead of torch.nn.functional directly, so that a weight stored compressed
(a `PackedWeight` from the weight store) runs through the fused dequantize-matmul kernel
without the model code knowing how its weights are stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig, RopeScaling
from .base import WeightSpec


@dataclass
class PackedWeight:
    """A weight (out, in) quantized group-wise along `in` (see kernels/quant/pack.py)."""

    packed: torch.Tensor  # uint8 (out, groups, record bytes)
    spec: object  # kernels.quant.pack.QuantSpec
    shape: tuple[int, int]
    dtype: torch.dtype  # the compute dtype it stands for

    def dequantize(self) -> torch.Tensor:
        from offload_engine.kernels.quant.pack import dequantize
        return dequantize(self.packed, self.spec, self.shape[-1], self.dtype)


def linear_specs(name: str, key: str, out_dim: int, in_dim: int, bias: bool = True) -> list[WeightSpec]:
    specs = [WeightSpec(f"{name}.weight", f"{key}.weight", (out_dim, in_dim))]
    if bias:
        specs.append(WeightSpec(f"{name}.bias", f"{key}.bias", (out_dim,), "bias"))
    return specs


def linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    if isinstance(weight, PackedWeight):
        from offload_engine.kernels.quant.linear import quant_linear
        return quant_linear(x, weight.packed, weight.spec, weight.shape[1], bias)
    return F.linear(x, weight, bias)


def linear_relu(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    """relu(linear(x)). With a bias and a plain weight, one GEMM whose epilogue adds the bias and
    applies the ReLU (cuBLASLt's RELU_BIAS on CUDA): OPT's fc1 output is the largest activation of
    a prefill (B x S x 4h), and a separate in-place ReLU reads and writes it once more (3% of an
    OPT-6.7B prefill). Equal to the unfused result: rounding keeps signs, so ReLU commutes with it."""
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    if isinstance(weight, PackedWeight) or bias is None or x.dim() < 2:
        return F.relu(linear(x, w, name), inplace=True)
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


def embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    if isinstance(weight, PackedWeight):  # dequantize only the rows looked up
        from offload_engine.kernels.quant.pack import dequantize
        return dequantize(weight.packed[ids], weight.spec, weight.shape[1], weight.dtype)
    return F.embedding(ids, weight)


def lm_head(x: torch.Tensor, weight) -> torch.Tensor:
    """Logits in float32 (sampling and perplexity need them exact)."""
    if isinstance(weight, PackedWeight):
        return linear(x, {"w.weight": weight}, "w").float()
    return F.linear(x, weight).float()


def layer_norm(x: torch.Tensor, w: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[f"{name}.weight"], w[f"{name}.bias"], eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, scaled in the input dtype (as the reference does)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim / 2,), with the config's context scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s: RopeScaling | None = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # llama3: keep short wavelengths, divide long ones by factor, blend the ones between
    low_wavelen = s.original_max_positions / s.low_freq_factor
    high_wavelen = s.original_max_positions / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, s, 1, head_dim) for positions (B, s), computed in float32."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, s, H, D) by the half-split convention of the Hugging Face Llama weights."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
