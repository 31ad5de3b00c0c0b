"""The three storage tiers: the compute device ("gpu"), pinned host memory ("cpu") and disk.

Each tier hands out tensors and counts the bytes it holds. Disk tensors are memory-mapped
files, one per tensor, so they read and write like CPU tensors. Host memory comes from a
pinned arena of 1 GiB chunks: PyTorch's pinned allocator rounds every request up to a
power of two, which can nearly double the host memory an offloaded model takes.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from ..errors import EngineError, format_size
from . import page_cache
from .files import write_all
from .folders import free_bytes, make_folders, not_writable, remove_if_empty

ALIGN = 256


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


PREFAULT_ENV = "OFFLOAD_ENGINE_PREFAULT"  # "0": leave faulting pages in to cudaHostRegister (for comparisons)


def prefault(arena: torch.Tensor) -> None:
    """Fault a fresh arena's pages in with every core (a parallel fill) before it is registered:
    cudaHostRegister faults in what is missing on the calling thread: four pipeline stages pinned
    400 GiB at about 3 GB/s together (over two minutes of start-up)."""
    if os.environ.get(PREFAULT_ENV, "1") != "0":
        arena.zero_()


HUGE_PAGES_ENV = "OFFLOAD_ENGINE_HUGE_PAGES"  # "1": advise host arenas onto transparent huge pages
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


def advise_huge_pages(arena: torch.Tensor) -> int:
    """With OFFLOAD_ENGINE_HUGE_PAGES=1, ask Linux to back a fresh arena with 2 MiB transparent
    huge pages (before its pages are first touched); returns the bytes advised.

    Off by default, as measured on an H200 host (experiments/bench_host_pages.py, NOTES.md):
    CPU attention read the cache no faster from huge pages, the engine's OPT-30B CPU-attention
    run was level (34.8 against 34.5 token/s), and faulting an 80 GiB arena in took longer.
    """
    if os.environ.get(HUGE_PAGES_ENV, "0") != "1" or not sys.platform.startswith("linux"):
        return 0
    start = round_up(arena.data_ptr(), HUGE_PAGE)
    end = (arena.data_ptr() + arena.numel() * arena.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    ok = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0
    return end - start if ok else 0


class _DevicePointer:
    """A device address as `__cuda_array_interface__` (bytes), for torch.as_tensor."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over a contiguous pinned host tensor's memory, or None where there is none.

    Pinned memory is mapped into the GPU's address space (unified addressing), so kernels read it
    across PCIe themselves. Unlike a copy, that does not wait behind other copies in the GPU's
    copy engine, which runs the copies of one direction in the order they were issued.
    """
    if device.type != "cuda" or not host.is_contiguous() or host.numel() == 0 or not host.is_pinned():
        return None
    try:
        raw = torch.as_tensor(_DevicePointer(host.data_ptr(), host.numel() * host.element_size()), device=device)
    except (RuntimeError, TypeError, ValueError):  # not registered with CUDA, or no unified addressing
        return None
    return raw.view(host.dtype).view(host.shape)


class HostStorage(Storage):
    """Host memory, page-locked when a GPU is present so copies run asynchronously at full speed.

    Pinned memory comes from one arena sized to the plan and registered with CUDA, carved
    into aligned tensors: no per-tensor rounding, so what is pinned is what was planned.
    """

    tier = Tier.CPU
    SLACK = 4 << 20  # room for per-tensor alignment

    def __init__(self, pin: bool, planned_bytes: int = 0):
        super().__init__()
        self.pin = pin and torch.cuda.is_available()
        self.planned_bytes = planned_bytes
        self._arenas: list[torch.Tensor] = []
        self._offset = 0
        self.reserved_bytes = 0
        self.pin_seconds = 0.0  # spent faulting in and registering arenas (start-up time)

    def _allocate(self, shape, dtype, name):
        nbytes = tensor_bytes(shape, dtype)
        if not self.pin:
            return torch.empty(shape, dtype=dtype)
        if not self._arenas or self._offset + nbytes > self._arenas[-1].numel():
            self._new_arena(max(round_up(nbytes), self.planned_bytes - self.allocated_bytes + self.SLACK))
        view = self._arenas[-1][self._offset:self._offset + nbytes]
        self._offset = round_up(self._offset + nbytes)
        return view.view(dtype).view(shape)

    def _new_arena(self, nbytes: int) -> None:
        start = time.perf_counter()
        try:
            arena = torch.empty(nbytes, dtype=torch.uint8)
            advise_huge_pages(arena)
            prefault(arena)
            # Portable and mapped: kernels may read the arena in place (device_view), e.g. HiP's
            # hot-block fetch reading missed blocks from a KV home here.
            err = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), nbytes, 3)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
        except RuntimeError as e:
            raise EngineError(f"could not pin {format_size(nbytes)} of host memory ({e}).",
                              "Lower --cpu-mem use: move KV cache or weights to disk, or shrink the batch.") from None
        self._arenas.append(arena)
        self._offset = 0
        self.reserved_bytes += nbytes
        self.pin_seconds += time.perf_counter() - start

    def release(self) -> None:
        """Unpin the arenas (the same addresses may be registered again by a later engine)."""
        for arena in self._arenas:
            torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
        self._arenas.clear()


class DiskStorage(Storage):
    """One memory-mapped file per tensor, in a folder of its own inside the offload directory
    (so engines sharing an offload directory never truncate each other's files).

    The folder is named after the process (`engine-<pid>-...`): folders left behind by processes
    that died without cleaning up (killed, out of memory) are reclaimed by the next engine.

    Every file's blocks are reserved when it is created (`reserve_space`): writing a mapped page
    whose block cannot be allocated kills the process with SIGBUS; reserved up front, a disk that
    is full is one error (ENOSPC) before the run starts.
    """

    tier = Tier.DISK

    def __init__(self, offload_dir: Path, planned_bytes: int = 0):
        super().__init__()
        self.offload_dir = Path(offload_dir)
        self.planned_bytes = planned_bytes  # the whole tier, for the out-of-space message
        self.directory: Path | None = None
        self._created: list[Path] = []  # the offload directory and parents this storage made
        self._files: list[Path] = []
        self._maps: list[np.memmap] = []
        self._spans: list[tuple[int, int, Path]] = []  # (first byte address, end address, file) per mapping

    def _allocate(self, shape, dtype, name):
        if self.directory is None:
            self._created = make_folders(self.offload_dir)
            reclaim_stale_folders(self.offload_dir)
            self.directory = Path(tempfile.mkdtemp(prefix=f"engine-{os.getpid()}-", dir=self.offload_dir))
        path = self.directory / f"{name}.bin"
        nbytes = max(tensor_bytes(shape, dtype), 1)
        self._files.append(path)  # cleanup removes it even if its space cannot be reserved
        self._create_reserved(path, nbytes)
        mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
        self._maps.append(mm)
        tensor = torch.from_numpy(mm)
        self._spans.append((tensor.data_ptr(), tensor.data_ptr() + nbytes, path))
        return tensor.view(dtype)[: int(np.prod(shape))].view(shape)

    def locate(self, t: torch.Tensor) -> tuple[Path, int] | None:
        """(file, byte offset) of a contiguous view of a disk tensor: what the disk relay reads and
        writes with pread/pwrite instead of page-faulting through the memory mapping."""
        if not t.is_contiguous() or t.device.type != "cpu":
            return None
        start = t.data_ptr()
        for first, end, path in self._spans:
            if first <= start and start + t.numel() * t.element_size() <= end:
                return path, start - first
        return None

    def evict_page_cache(self) -> float | None:
        """Drop this tier's files from the page cache (page_cache.py); returns the fraction of
        their bytes still resident, None where that cannot be asked."""
        return page_cache.evict(self._files, [m.base for m in self._maps if isinstance(m.base, mmap.mmap)])

    def _create_reserved(self, path: Path, nbytes: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            reserve_space(fd, nbytes)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise self._out_of_space(nbytes) from None
        finally:
            os.close(fd)

    def _out_of_space(self, nbytes: int) -> EngineError:
        """What the tier needs against what this run can have: the free space plus its own files,
        which go when the run ends."""
        need = max(self.planned_bytes, self.allocated_bytes + nbytes)
        available = free_bytes(self.offload_dir) + self.allocated_bytes
        return EngineError(f"the disk tier ran out of space in --offload-dir {self.offload_dir}: it needs "
                           f"{format_size(need)} but only {format_size(available)} are available (the disk filled "
                           "up after the plan was checked).",
                           "Free space on that disk or pick another --offload-dir (or keep more on GPU/CPU with "
                           "--percent).")

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files if p.exists())

    def cleanup(self) -> None:
        for p in self._files:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        self._files.clear()
        self._maps.clear()
        self._spans.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        remove_if_empty(self._created)  # ./offload_dir made for this run goes; one the user had stays
        self._created = []


ZERO_CHUNK = 8 << 20


def reserve_space(fd: int, nbytes: int) -> None:
    """Allocate a new file's blocks now (raises ENOSPC if they do not fit): posix_fallocate, or,
    where the file system refuses it, writing zeros, which allocates them just as surely."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    zeros = memoryview(bytes(min(nbytes, ZERO_CHUNK)))
    for pos in range(0, nbytes, len(zeros)):
        write_all(None, fd, zeros[:nbytes - pos], pos)


def reclaim_stale_folders(offload_dir: Path) -> list[Path]:
    """Remove `engine-<pid>-*` folders whose process no longer exists; returns what was removed."""
    removed = []
    for folder in offload_dir.glob("engine-*-*"):
        pid = folder.name.split("-")[1]
        if folder.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def check_writable(directory: Path) -> None:
    """Refuse an offload directory that cannot hold files, before anything is written; a folder
    made for the check is removed again (the disk tier makes it when it writes its first file)."""
    directory, created = Path(directory), []
    try:
        created = make_folders(directory)
        probe = directory / ".offload_engine_probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise EngineError(f"{not_writable(directory, e, 'the offload directory')}.",
                          "Pass --offload-dir a folder this user can create files in.") from None
    finally:
        remove_if_empty(created)


def disk_capacity(offload_dir: Path) -> int:
    """Free bytes for the disk tier. Folders of dead processes are reclaimed first: their files
    would otherwise count as used, and a run after a crash be refused for lack of space."""
    offload_dir = Path(offload_dir)
    if offload_dir.is_dir():
        reclaim_stale_folders(offload_dir)
    check_writable(offload_dir)
    return free_bytes(offload_dir)
