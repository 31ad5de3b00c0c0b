"""The packed format's parameters (`QuantSpec`) and the checks and views every quant kernel shares.

See pack.py for the format itself: records of a float16 scale, a float16 minimum and the codes,
one per group of `group_size` consecutive elements along the last dimension.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    """Bits per code (2, 4 or 8) and elements per group (even, >= 2; 2-bit: a multiple of 4)."""

    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in (2, 4, 8):
            raise ValueError(f"QuantSpec.bits must be 2, 4 or 8, got {self.bits!r}; pick one of those.")
        gs = self.group_size
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 2 or gs % 2:
            raise ValueError(f"QuantSpec.group_size must be an even integer >= 2, got {gs!r}; "
                             "use an even size such as 32 or 64.")
        if self.bits == 2 and gs % 4:
            raise ValueError(f"2-bit groups pack four codes a byte: group_size must be a multiple of 4, got {gs}.")

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def for_length(self, n: int) -> "QuantSpec":
        """The spec for rows of n elements: a group longer than the row is one group per row (the
        row's length rounded up to even), not a row padded out to the group."""
        step = 4 if self.bits == 2 else 2
        group = min(self.group_size, max(step, -(-n // step) * step))
        return self if group == self.group_size else QuantSpec(self.bits, group)

    @property
    def record_bytes(self) -> int:
        return 4 + self.group_size * self.bits // 8

    def num_groups(self, n: int) -> int:
        if n < 1:
            raise ValueError(f"the grouped dimension must have at least 1 element, got {n}.")
        return -(-n // self.group_size)

    def packed_shape(self, shape) -> tuple:
        shape = tuple(shape)
        if not shape:
            raise ValueError("cannot quantize a 0-dim tensor; give it at least one dimension.")
        return (*shape[:-1], self.num_groups(shape[-1]), self.record_bytes)

    def packed_nbytes(self, shape) -> int:
        nbytes = 1
        for s in self.packed_shape(shape):
            nbytes *= s
        return nbytes


# ----------------------------------------------------------------------------- validation

def check_packed(packed: torch.Tensor, spec: QuantSpec, n: int) -> None:
    """ValueError unless packed is uint8 (..., G, R) for n elements grouped by spec."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a QuantSpec, got {type(spec).__name__}.")
    if packed.dtype != torch.uint8 or packed.dim() < 2:
        raise ValueError(f"packed must be a uint8 tensor (*lead, G, R), got {packed.dtype} {tuple(packed.shape)}.")
    want = (spec.num_groups(n), spec.record_bytes)
    if tuple(packed.shape[-2:]) != want:
        raise ValueError(f"packed has shape {tuple(packed.shape)} but {spec} with n={n} needs "
                         f"(..., {want[0]}, {want[1]}); check bits, group_size and n.")


def check_float(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must be a floating tensor with a non-empty last dim, got {x.dtype} {tuple(x.shape)}.")


def half_view(packed: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(float16 view, True) when the scale/min halves are 2-byte aligned (R, strides and offset
    even), else (packed, False): kernels then assemble each float16 from its two bytes."""
    try:
        return packed.view(torch.float16), True
    except RuntimeError:
        return packed, False


def lead3(t: torch.Tensor, nlead: int):
    """Collapse the first `nlead` dims of t to exactly 3 (sizes, strides), or None if impossible.

    Kernels index records through these 3 dims, so views such as cache[t:t+s] or a permuted
    head-major cache work without copies.
    """
    dims = [(s, st) for s, st in zip(t.shape[:nlead], t.stride()[:nlead]) if s != 1]
    merged: list = []
    for s, st in dims:
        if merged and merged[-1][1] == st * s:
            merged[-1] = (merged[-1][0] * s, st)
        else:
            merged.append((s, st))
    if len(merged) > 3:
        return None
    merged = [(1, 0)] * (3 - len(merged)) + merged
    return [s for s, _ in merged], [st for _, st in merged]
