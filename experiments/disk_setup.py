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

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload_engine.io.page_cache import drop_files  # noqa: E402


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
        drop_files(paths)
        return "fadvise_dontneed"
