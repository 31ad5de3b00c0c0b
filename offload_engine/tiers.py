"""The three storage tiers: the compute device ("gpu"), pinned host memory ("cpu") and disk.

Each tier hands out tensors and counts the bytes it holds. Disk tensors are memory-mapped
files, one per tensor, so they read and write like CPU tensors. Host memory comes from a
pinned arena of 1 GiB chunks: PyTorch's pinned allocator rounds every request up to a
power of two, which can nearly double the host memory an offloaded model takes.
"""
from __future__ import annotations

import enum
import os
from pathlib import Path

import numpy as np
import torch

from .errors import EngineError

ALIGN = 256
CHUNK_BYTES = 1 << 30


class Tier(str, enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class Storage:
    """Base: allocation with byte counting."""

    tier: Tier

    def __init__(self) -> None:
        self.allocated_bytes = 0

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
        t = self._allocate(tuple(shape), dtype, name)
        self.allocated_bytes += t.numel() * t.element_size()
        return t

    def _allocate(self, shape, dtype, name) -> torch.Tensor:
        raise NotImplementedError


class DeviceStorage(Storage):
    """The compute device: a CUDA GPU, or the CPU on a machine without one."""

    tier = Tier.GPU

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def _allocate(self, shape, dtype, name):
        return torch.empty(shape, dtype=dtype, device=self.device)


class HostStorage(Storage):
    """Host memory, page-locked when a GPU is present so copies run asynchronously at full speed."""

    tier = Tier.CPU

    def __init__(self, pin: bool):
        super().__init__()
        self.pin = pin and torch.cuda.is_available()
        self._chunks: list[torch.Tensor] = []
        self._free_offset = 0
        self.reserved_bytes = 0

    def _allocate(self, shape, dtype, name):
        nbytes = tensor_bytes(shape, dtype)
        if not self.pin:
            return torch.empty(shape, dtype=dtype)
        if not self._chunks or self._free_offset + nbytes > self._chunks[-1].numel():
            self._new_chunk(max(CHUNK_BYTES, round_up(nbytes)))
        chunk = self._chunks[-1]
        view = chunk[self._free_offset:self._free_offset + nbytes]
        self._free_offset = round_up(self._free_offset + nbytes)
        return view.view(dtype).view(shape)

    def _new_chunk(self, nbytes: int) -> None:
        try:
            chunk = torch.empty(nbytes, dtype=torch.uint8, pin_memory=nbytes == CHUNK_BYTES)
            if nbytes != CHUNK_BYTES:  # exact-size pinning for large tensors
                err = torch.cuda.cudart().cudaHostRegister(chunk.data_ptr(), nbytes, 0)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister returned {err}")
        except RuntimeError as e:
            raise EngineError(f"could not pin {nbytes / 2**30:.1f} GiB of host memory ({e}).",
                              "Lower --cpu-mem usage: move KV cache or weights to disk, or shrink the batch.") from None
        self._chunks.append(chunk)
        self._free_offset = 0
        self.reserved_bytes += nbytes


class DiskStorage(Storage):
    """One memory-mapped file per tensor in the offload directory."""

    tier = Tier.DISK

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)
        self._files: list[Path] = []

    def _allocate(self, shape, dtype, name):
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.bin"
        nbytes = max(tensor_bytes(shape, dtype), 1)
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(nbytes,))
        self._files.append(path)
        return torch.from_numpy(mm).view(dtype)[: int(np.prod(shape))].view(shape)

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files if p.exists())

    def cleanup(self) -> None:
        for p in self._files:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        self._files.clear()


def check_writable(directory: Path) -> None:
    """Refuse an offload directory that cannot hold files, before anything is written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".offload_engine_probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise EngineError(f"offload directory {directory} is not writable ({e.strerror}).",
                          "Pass a writable folder with --offload-dir.") from None
