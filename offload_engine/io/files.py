"""Open files for the disk relay: a buffered and (where the file system allows it) an O_DIRECT
descriptor per file, shared by the relay's workers, and whole-range pread/pwrite loops.

O_DIRECT is refused per file system (EINVAL at open or at the first I/O): the file falls back to
buffered I/O, remembered. Aligned offsets use the direct descriptor, the unaligned head and tail
of a range the buffered one.
"""
from __future__ import annotations

import errno
import os
import threading
import warnings
from collections import OrderedDict

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
MAX_OPEN_FILES = 64  # a model has hundreds of files but only a few are busy at a time


class OpenFile:
    __slots__ = ("fd", "dfd", "ident", "users", "stale")

    def __init__(self, fd: int, dfd: int | None):
        self.fd, self.dfd = fd, dfd  # buffered and O_DIRECT descriptors of the same file
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)
        self.users = 0
        self.stale = False

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)


class FileCache:
    """Descriptors per (path, write), shared by the workers; the least recently used idle ones
    are closed beyond MAX_OPEN_FILES. A file replaced on disk (new inode) is opened afresh."""

    def __init__(self, direct: bool, warn: bool):
        self.direct, self.warn = direct, warn
        self.lock = threading.Lock()
        self.files: OrderedDict[tuple[str, bool], OpenFile] = OrderedDict()
        self.modes: dict[str, str] = {}  # path -> "direct" | "buffered"

    def acquire(self, path: str, write: bool) -> OpenFile:
        key = (path, write)
        with self.lock:
            f = self.files.get(key)
            if f is not None and not self._same(f, path):
                self._drop(key)
                f = None
            if f is None:
                f = self.files[key] = self._open(path, write)
                self._evict()
            self.files.move_to_end(key)
            f.users += 1
            return f

    def release(self, f: OpenFile) -> None:
        with self.lock:
            f.users -= 1
            if f.stale and f.users == 0:
                f.close()
            self._evict()

    def disable_direct(self, path: str) -> None:
        """The file system refused O_DIRECT I/O on this file: buffered from now on."""
        with self.lock:
            self._fallback(path)
            for key in [k for k in self.files if k[0] == path]:
                self._drop(key)

    def close_all(self) -> None:
        with self.lock:
            for f in self.files.values():
                f.close()
            self.files.clear()

    def _open(self, path: str, write: bool) -> OpenFile:
        flags = (os.O_WRONLY | os.O_CREAT if write else os.O_RDONLY) | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        dfd = None
        if self.direct and self.modes.get(path) != "buffered" and hasattr(os, "O_DIRECT"):
            try:
                dfd = os.open(path, flags | os.O_DIRECT, 0o644)
                self.modes[path] = "direct"
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
                self._fallback(path)
        else:
            self.modes[path] = "buffered"
        if not write and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead for buffered reads
        return OpenFile(fd, dfd)

    def _fallback(self, path: str) -> None:
        if self.warn and self.modes.get(path) != "buffered":
            warnings.warn(f"{path}: the file system does not allow O_DIRECT; using buffered I/O for this file.",
                          stacklevel=2)
        self.modes[path] = "buffered"

    @staticmethod
    def _same(f: OpenFile, path: str) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == f.ident

    def _drop(self, key: tuple[str, bool]) -> None:
        f = self.files.pop(key)
        f.stale = True
        if f.users == 0:
            f.close()

    def _evict(self) -> None:
        idle = [k for k, f in self.files.items() if f.users == 0]  # oldest first
        for key in idle[:max(0, len(self.files) - MAX_OPEN_FILES)]:
            self._drop(key)


def read_all(dfd: int | None, fd: int, mv: memoryview, pos: int) -> int:
    """Read up to len(mv) bytes at pos (fewer at end of file); O_DIRECT while still aligned."""
    got = 0
    while got < len(mv):
        n = os.preadv(dfd if dfd is not None and got % ALIGN == 0 else fd, [mv[got:]], pos + got)
        if n == 0:
            break
        got += n
    return got


def write_all(dfd: int | None, fd: int, mv: memoryview, pos: int) -> None:
    done = 0
    while done < len(mv):
        n = os.pwrite(dfd if dfd is not None and done % ALIGN == 0 else fd, mv[done:], pos + done)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
