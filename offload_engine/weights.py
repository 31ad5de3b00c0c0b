"""Filling weight homes: from a local Hugging Face checkpoint, or random ("dummy") weights.

Checkpoints: `*.safetensors` or `pytorch_model*.bin`, single or sharded with an index file.
Tensors are read one at a time and written straight to their home tier, so loading never
holds a second copy of the model in host memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import EngineError
from .models.base import WeightSpec
from .tiers import Tier

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class Checkpoint:
    """Lazy access to the tensors of a checkpoint folder by key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._open: dict[Path, object] = {}
        self.key_to_file = self._index()

    def _index(self) -> dict[str, Path]:
        for name in INDEX_FILES:
            index = self.folder / name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise EngineError(f"{index} is not a valid checkpoint index ({e}).", "Re-download it.") from None
                files = {k: self.folder / f for k, f in weight_map.items()}
                for f in sorted(set(files.values())):
                    if not f.exists():
                        raise EngineError(f"checkpoint shard {f.name} listed in {name} is missing from {self.folder}.",
                                          "Re-download the checkpoint or restore that file.")
                return files
        for name in SINGLE_FILES:
            f = self.folder / name
            if f.exists():
                return {k: f for k in self._keys_of(f)}
        raise EngineError(f"no weights in {self.folder}: expected {' or '.join(SINGLE_FILES + INDEX_FILES)}.",
                          "Point --model at a checkpoint folder, or pass --dummy for random weights.")

    def _keys_of(self, f: Path) -> list[str]:
        return list(self._handle(f).keys())

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open
                    self._open[f] = safe_open(str(f), framework="pt")
                else:
                    self._open[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # truncated or corrupt files fail in many library-specific ways
                raise EngineError(f"cannot read checkpoint file {f.name}: {str(e).splitlines()[0][:200]}",
                                  "The file is truncated or corrupt; re-download it.") from None
        return self._open[f]

    def get(self, key: str) -> torch.Tensor | None:
        for k in (key, "model." + key):
            if k in self.key_to_file:
                f = self.key_to_file[k]
                try:
                    h = self._handle(f)
                    return h.get_tensor(k) if f.suffix == ".safetensors" else h[k]
                except EngineError:
                    raise
                except Exception as e:
                    raise EngineError(f"cannot read tensor {k} from {f.name}: {str(e).splitlines()[0][:200]}",
                                      "The file is truncated or corrupt; re-download it.") from None
        return None


def load_checkpoint(folder: Path, specs: dict[str, WeightSpec], homes: dict[str, tuple[Tier, torch.Tensor]],
                    progress: bool = True) -> None:
    ckpt = Checkpoint(folder)
    for key in tqdm(list(homes), desc="load weights", disable=not progress, unit="tensor"):
        tensor = ckpt.get(key)
        if tensor is None:
            raise EngineError(f"checkpoint {folder} has no tensor '{key}'.",
                              "The weights do not match config.json; re-download the checkpoint.")
        spec = specs[key]
        if tuple(tensor.shape) != spec.shape:
            raise EngineError(f"checkpoint tensor '{key}' has shape {tuple(tensor.shape)} but config.json implies "
                              f"{spec.shape}.", "config.json does not match the weights; use the matching config.")
        homes[key][1].copy_(tensor)


def dummy_weights(specs: dict[str, WeightSpec], homes: dict[str, tuple[Tier, torch.Tensor]], seed: int,
                  device: torch.device, progress: bool = True) -> None:
    """Random weights of the right scale (never constants: they would make attention uniform).

    Drawn on the compute device (fast on a GPU) in one seeded order, then copied home.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    for key in tqdm(list(homes), desc="init dummy weights", disable=not progress, unit="tensor"):
        spec, home = specs[key], homes[key][1]
        x = torch.empty(spec.shape, dtype=torch.float32, device=device)
        if spec.init == "norm_weight":
            x.normal_(0.0, 0.1, generator=gen).add_(1.0)
        elif spec.init == "bias":
            x.normal_(0.0, 0.02, generator=gen)
        else:
            fan_in = spec.shape[-1]
            x.normal_(0.0, fan_in ** -0.5, generator=gen)
        home.copy_(x)

