"""Folders the user names (--offload-dir, the folder of an output file): what is wrong with one,
in words a user can act on, and folders the engine creates, removed again once they are empty.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists (a file, if a file is in the way)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def file_in_the_way(folder: Path) -> Path | None:
    """The regular file (or other non-folder) where `folder` or one of its parents should be."""
    base = nearest_existing(folder)
    return None if base.is_dir() else base


def make_folders(folder: Path, attempts: int = 3) -> list[Path]:
    """Create `folder` and its missing parents; returns those this call created, deepest first
    (one that another process creates meanwhile is not ours and is never removed by us)."""
    for attempt in range(attempts):
        try:
            return _make_missing(Path(folder))
        except FileNotFoundError:  # a parent that another process made went again (it was empty)
            if attempt == attempts - 1:
                raise
    return []


def _make_missing(folder: Path) -> list[Path]:
    missing = []
    path = folder
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    created: list[Path] = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise
            continue
        created.append(path)
    return created[::-1]


def remove_if_empty(created: list[Path]) -> None:
    """Remove folders this process created (deepest first) as long as they are empty: a folder the
    user already had, or one holding anything else, stays."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def free_bytes(folder: Path) -> int:
    """Free space on the file system that holds (or will hold) `folder`."""
    return int(shutil.disk_usage(nearest_existing(folder)).free)


def not_writable(folder: Path, error: OSError, what: str) -> str:
    """One sentence on why files cannot be created in `folder` (`what` it is for the user), from
    the error that said so: "No such file or directory" for /proc says nothing a user can act on."""
    blocker = file_in_the_way(folder)
    if blocker is not None:
        return f"{what} {folder} cannot be created: {blocker} is a file, not a folder"
    base = nearest_existing(folder)
    if error.errno in (errno.EACCES, errno.EPERM):
        reason = f"permission denied in {base}"
    elif error.errno == errno.EROFS:
        reason = f"{base} is on a read-only file system"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"the file system of {base} is full"
    elif error.errno == errno.ENOENT:  # the folder exists, yet a file in it "does not exist": /proc, /sys
        reason = "its file system takes no new files (a virtual one, such as /proc or /sys)"
    else:
        reason = error.strerror or str(error)
    return f"{what} {folder} is not writable: {reason}"
