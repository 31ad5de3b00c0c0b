"""y = x @ W^T + b with W stored in the packed group-wise format (kernels/quant/pack.py), grouped along K.

Decode (few rows) is bound by reading the weight, so on CUDA a fused Triton kernel reads the
packed bytes, dequantizes a (group/2, BLOCK_N) tile per nibble half in registers and feeds both
halves to tl.dot against the matching halves of the x slice (this is why a record stores element
j and j + group/2 in one byte): the fp16 weight never exists in global memory. Prefill (many
rows) is compute bound, so it dequantizes into a temporary and uses cuBLAS via F.linear.
CPU tensors: dequantize + F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from offload_engine.kernels.quant.pack import QuantSpec, check_packed, dequantize, dequantize_reference, half_view, load_f16

# Up to this many rows the fused kernel runs. Per packed weight byte (4-bit, group 64: 0.5625 B
# per weight) a GEMM does 2*M/0.5625 FLOP, ~114 at M = 32, still under the H100's ~300 FLOP/B
# ridge, so the fused kernel stays memory bound, while the dequantize + cuBLAS path moves ~8x the
# bytes (write and re-read an fp16 weight). Beyond ~32 rows this simple kernel (no warp
# specialization, fp32 dequant per tile) loses to cuBLAS's tensor-core rate; the benchmark
# (experiments/bench_quant_kernels.py) measures M = 1..64 on both paths to revisit this number.
FUSED_MAX_ROWS = 32


@triton.jit
def _qlinear_kernel(x_ptr, w_ptr, wsm_ptr, b_ptr, y_ptr, M, N, K, G, sxm, swn, sym,
                    EVEN: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, HALF_P2: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    HALF: tl.constexpr = GS // 2
    R: tl.constexpr = 4 + GS * BITS // 8
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, HALF_P2)
    m_ok, n_ok, j_ok = rm < M, rn < N, j < HALF
    w_rows = rn.to(tl.int64) * swn                       # record base per output row
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * sxm
    w_mask = j_ok[:, None] & n_ok[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, G):
        rec = w_rows + g * R
        s = load_f16(w_ptr, wsm_ptr, rec, n_ok, EVEN)[None, :]
        mn = load_f16(w_ptr, wsm_ptr, rec + 2, n_ok, EVEN)[None, :]
        src = w_ptr + rec[None, :] + 4 + j[:, None]     # (HALF_P2, BLOCK_N): already transposed
        if BITS == 4:
            byte = tl.load(src, mask=w_mask, other=0).to(tl.int32)
            c_lo, c_hi = byte & 15, byte >> 4
        else:
            c_lo = tl.load(src, mask=w_mask, other=0).to(tl.int32)
            c_hi = tl.load(src + HALF, mask=w_mask, other=0).to(tl.int32)
        k_lo = g * GS + j
        # Padded K positions read x = 0, so the (finite) padded weights add nothing.
        x_lo = tl.load(x_rows + k_lo[None, :], mask=m_ok[:, None] & (j_ok & (k_lo < K))[None, :], other=0.0)
        x_hi = tl.load(x_rows + (k_lo + HALF)[None, :],
                       mask=m_ok[:, None] & (j_ok & (k_lo + HALF < K))[None, :], other=0.0)
        w_lo = (c_lo.to(tl.float32) * s + mn).to(x_lo.dtype)
        w_hi = (c_hi.to(tl.float32) * s + mn).to(x_lo.dtype)
        if IEEE:                                          # fp32 inputs: no TF32 rounding
            acc += tl.dot(x_lo, w_lo, input_precision="ieee")
            acc += tl.dot(x_hi, w_hi, input_precision="ieee")
        else:
            acc += tl.dot(x_lo, w_lo)
            acc += tl.dot(x_hi, w_hi)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dst = y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check(x: torch.Tensor, w_packed: torch.Tensor, spec: QuantSpec, in_features: int,
           bias: torch.Tensor | None) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}; cast it first.")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)} but in_features is {in_features}; "
                         "its last dim must equal in_features.")
    check_packed(w_packed, spec, in_features)
    if w_packed.dim() != 3:
        raise ValueError(f"w_packed must be (N, G, R), got shape {tuple(w_packed.shape)}.")
    if bias is not None and tuple(bias.shape) != (w_packed.shape[0],):
        raise ValueError(f"bias must have shape ({w_packed.shape[0]},), got {tuple(bias.shape)}.")


def quant_linear_reference(x: torch.Tensor, w_packed: torch.Tensor, spec: QuantSpec, in_features: int,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 x @ dequantize(W)^T + b, for tests."""
    _check(x, w_packed, spec, in_features, bias)
    y = x.double() @ dequantize_reference(w_packed, spec, in_features).T
    return y if bias is None else y + bias.double()


def quant_linear_triton(x2d: torch.Tensor, w_packed: torch.Tensor, spec: QuantSpec, in_features: int,
                        bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                        block_n: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """Fused dequant-GEMM on x2d (M, K); needs group_size >= 32 (tl.dot wants K-tiles of >= 16)."""
    _check(x2d, w_packed, spec, in_features, bias)
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D (M, K), got shape {tuple(x2d.shape)}; reshape it first.")
    if spec.group_size < 32:
        raise ValueError(f"the fused kernel needs group_size >= 32, got {spec.group_size}; "
                         "use quant_linear, which falls back to dequantize + F.linear.")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if w_packed.stride(-1) != 1 or w_packed.stride(-2) != spec.record_bytes:
        w_packed = w_packed.contiguous()
    m, n = x2d.shape[0], w_packed.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x2d.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be ({m}, {n}) {x2d.dtype} with a contiguous last dim.")
    if m == 0:
        return out
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if block_n is None:
        # Enough programs to fill ~2 waves of an H100's 132 SMs before growing the tile.
        block_n = 64 if triton.cdiv(n, 64) * triton.cdiv(m, block_m) >= 264 else 32
    wsm, even = half_view(w_packed)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _qlinear_kernel[grid](x2d, w_packed, wsm, bias if bias is not None else x2d, out, m, n, in_features,
                          w_packed.shape[1], x2d.stride(0), w_packed.stride(0), out.stride(0),
                          EVEN=even, BITS=spec.bits, GS=spec.group_size,
                          HALF_P2=triton.next_power_of_2(spec.group_size // 2),
                          BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None,
                          IEEE=x2d.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    return out


def quant_linear(x: torch.Tensor, w_packed: torch.Tensor, spec: QuantSpec, in_features: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T + bias with W (N, K) packed as (N, G, R); returns (..., N) in x.dtype."""
    _check(x, w_packed, spec, in_features, bias)
    rows = x.numel() // in_features
    if x.is_cuda and rows <= FUSED_MAX_ROWS and spec.group_size >= 32:
        y = quant_linear_triton(x.reshape(rows, in_features), w_packed, spec, in_features, bias)
        return y.view(*x.shape[:-1], w_packed.shape[0])
    w = dequantize(w_packed, spec, in_features, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
