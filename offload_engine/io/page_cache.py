"""The page cache of the disk tier's files: how much of a file is resident, and evicting it.

A disk tier smaller than free host memory ends up in the page cache after the first step, and
from then on reads run at memory speed. To measure the disk itself (a host whose free memory is
smaller than the disk tier), `--cold-disk` evicts the files before every step: pages written
through the memory mappings are flushed and unmapped from this process (mapped pages are never
dropped), each file's dirty pages are written back, then posix_fadvise(DONTNEED) drops them.
mincore then says what stayed. Everything falls back quietly where the system does not allow it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Iterable

import numpy as np


def resident_fraction(path: Path) -> float | None:
    """Fraction of the file's pages in the page cache (mincore), None where that cannot be asked."""
    try:
        size = path.stat().st_size
        if size == 0:
            return 0.0
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


def drop_files(paths: Iterable[Path]) -> None:
    """Write back each file's dirty pages and drop its pages from the page cache (pages mapped
    by a process stay: unmap them first)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)


def unmap_pages(mappings: Iterable[mmap.mmap]) -> None:
    """Flush what was written through the mappings and drop their pages from this process's page
    tables; the mappings stay valid (a later access reads the file again)."""
    for m in mappings:
        try:
            m.flush()
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError, AttributeError):
            pass


def evict(paths: list[Path], mappings: Iterable[mmap.mmap] = ()) -> float | None:
    """Evict the files (and this process's mappings of them) from the page cache; returns the
    fraction of their bytes still resident, None where that cannot be asked."""
    unmap_pages(mappings)
    drop_files(paths)
    sizes = [p.stat().st_size if p.exists() else 0 for p in paths]
    fractions = [resident_fraction(p) for p in paths]
    if not paths or any(f is None for f in fractions) or sum(sizes) == 0:
        return None
    return sum(f * s for f, s in zip(fractions, sizes)) / sum(sizes)
