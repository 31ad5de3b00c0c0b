"""Filling weight homes: from a checkpoint (folder or GGUF file), or random ("dummy") weights.

Tensors are read one at a time and written straight to their home tier, so loading never
holds a second copy of the model in host memory. A checkpoint must match the config exactly:
a missing tensor, a wrong shape or a tensor the config does not use is refused by name.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from .checkpoints import open_checkpoint
from .errors import EngineError
from .models.base import WeightSpec

# Tensors some checkpoints carry that no layer reads: rotary tables (recomputed) and a tied head.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)



class WeightTarget(Protocol):
    """Where loaded weights go (the engine's WeightStore)."""

    def store(self, key: str, tensor: torch.Tensor, row_start: int = 0) -> None: ...

    def accepts_packed(self, key: str, bits: int, group_size: int) -> bool: ...

    def store_packed(self, key: str, packed: torch.Tensor) -> None: ...


def _unused_keys(ckpt_keys: list[str], expected: set[str], tied_head: bool) -> list[str]:
    unused = []
    for key in ckpt_keys:
        bare = key[len("model."):] if key.startswith("model.") else key
        if bare in expected or key.endswith(IGNORED_SUFFIXES) or (tied_head and bare == "lm_head.weight"):
            continue
        unused.append(key)
    return unused


def load_checkpoint(path: Path, specs: dict[str, WeightSpec], target: WeightTarget, tied_head: bool,
                    progress: bool = True, other_keys: set[str] = frozenset()) -> None:
    """Stream every tensor the layers need into its home. A checkpoint that stores 4/8-bit blocks
    in the engine's packed format (GGUF Q4_0/Q4_1/Q8_0) hands them over without a float round
    trip when the weight is stored compressed with the same bits and group size.

    `other_keys`: tensors of the model that other pipeline stages load (skipped, not refused)."""
    ckpt = open_checkpoint(path)
    unused = _unused_keys(ckpt.keys(), set(specs) | set(other_keys), tied_head)
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise EngineError(f"checkpoint {path} holds {len(unused)} tensor(s) the config does not use ({shown}).",
                          "The config does not match the weights (e.g. more layers in the files than in the "
                          "config); use the config that came with them.")
    get_packed = getattr(ckpt, "get_packed", None)
    for key, spec in tqdm(list(specs.items()), desc="load weights", disable=not progress, unit="tensor"):
        packed = get_packed(key) if get_packed is not None else None
        if packed is not None and target.accepts_packed(key, packed[1], packed[2]):
            target.store_packed(key, packed[0])
            continue
        tensor = ckpt.get(key)
        if tensor is None:
            raise EngineError(f"checkpoint {path} has no tensor '{key}'.",
                              "The weights do not match the config; re-download the checkpoint.")
        if tuple(tensor.shape) != spec.shape:
            raise EngineError(f"checkpoint tensor '{key}' has shape {tuple(tensor.shape)} but config.json (or the GGUF metadata) implies "
                              f"{spec.shape}.", "The config does not match the weights; use the matching config.")
        target.store(key, tensor)


DUMMY_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 drawn at a time: the only memory dummy init takes beyond the plan


def dummy_weights(specs: dict[str, WeightSpec], target: WeightTarget, seed: int, device: torch.device,
                  progress: bool = True) -> None:
    """Random weights of the right scale (never constants: they would make attention uniform).

    Drawn on the compute device (fast on a GPU) a block of rows at a time, then stored home: a
    whole fp32 tensor (OPT-30B's embedding: 1.34 GiB) would not fit beside a GPU plan that is
    nearly full before the cache and working buffers are allocated. Each tensor has its own seed,
    from `seed` and its key, so any subset of the model (a pipeline stage's) gets the same values.
    """
    gen = torch.Generator(device=device)
    for key, spec in tqdm(list(specs.items()), desc="init dummy weights", disable=not progress, unit="tensor"):
        gen.manual_seed(zlib.crc32(f"{seed}:{key}".encode()))  # 32 bits: what the CPU generator uses
        rows = spec.shape[0]
        per_row = math.prod(spec.shape[1:])
        step = rows if len(spec.shape) == 1 else max(1, DUMMY_CHUNK_ELEMENTS // per_row)
        for start in range(0, rows, step):
            x = torch.empty((min(step, rows - start), *spec.shape[1:]), dtype=torch.float32, device=device)
            if spec.init == "norm_weight":
                x.normal_(0.0, 0.1, generator=gen).add_(1.0)
            elif spec.init == "bias":
                x.normal_(0.0, 0.02, generator=gen)
            else:
                x.normal_(0.0, spec.shape[-1] ** -0.5, generator=gen)  # 1/sqrt(fan_in)
            target.store(key, x, start)
