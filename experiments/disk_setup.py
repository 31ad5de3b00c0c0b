"""The files and the page cache of `experiments/bench_disk_io.py`: writing the test files,
evicting them from the page cache, asking how much of a file is still resident, and naming the
file system a folder is on.

Why it is built this way: a cold pass means nothing unless its files really left the page
cache, so eviction reports how it was done (drop_caches where root may, else
posix_fadvise(DONTNEED) per file) and mincore says what stayed; both fall back quietly where the
system does not allow them, since the benchmark must also run unprivileged (--smoke). Files get
random contents and sizes that are not 4 KiB multiples, so every read is checked against real
bytes and O_DIRECT's unaligned file ends are exercised.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np


def make_files(folder: Path, total: int, lo: int, hi: int, seed: int) -> tuple[list[Path], list[np.ndarray]]:
    """Random contents in files of random sizes in [lo, hi] (deliberately not 4 KiB multiples)."""
    rng = np.random.default_rng(seed)
    paths, data, left, i = [], [], total, 0
    while left > 0:
        n = min(left, int(rng.integers(lo, hi + 1)))
        arr = np.frombuffer(rng.bytes(n), dtype=np.uint8)
        path = folder / f"layer_{i:03d}.bin"
        with open(path, "wb") as f:
            f.write(arr.data)
            os.fsync(f.fileno())
        paths.append(path)
        data.append(arr)
        left -= n
        i += 1
    return paths, data


def resident_fraction(path: Path) -> float | None:
    """Fraction of the file's pages in the page cache (mincore), None where that cannot be asked."""
    try:
        size = path.stat().st_size
        libc = ctypes.CDLL(None, use_errno=True)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        view = np.frombuffer(mm, dtype=np.uint8)
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
        mm.close()
        return None if rc != 0 else sum(b & 1 for b in vec) / pages
    except (OSError, ValueError, AttributeError):
        return None


def fs_type(path: Path) -> str | None:
    """The file system holding `path` (longest mount point in /proc/mounts that contains it)."""
    best, kind, where = "", None, str(path.resolve())
    try:
        for line in open("/proc/mounts"):
            _, mount, fstype = line.split()[:3]
            inside = where == mount or where.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def drop_cache(paths: list[Path], system_wide: bool) -> str:
    """Evict the files from the page cache (pages mapped by a process stay: unmap them first)."""
    os.sync()
    try:
        if not system_wide:
            raise PermissionError
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "fadvise_dontneed"
