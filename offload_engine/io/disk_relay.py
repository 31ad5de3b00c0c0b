"""Disk tensors moved at the disk's speed: a ring of pinned host buffers relays file <-> device.

Why: copying a tensor from an np.memmap straight to the GPU page-faults through pageable
memory and runs one synchronous copy per tensor. Here a transfer is cut into chunks; a worker
thread reads each chunk with `os.preadv` straight into one buffer of a small ring of (pinned)
host buffers, then copies it to the device asynchronously on a copy stream; the buffer goes
back to the ring with that copy's CUDA event, and whoever takes it next waits on the event.
Several chunks are in flight at once, so disk reads, the relay and PCIe overlap. Stores run the
other way: device -> ring buffer (asynchronous copy, then its event) -> `os.pwrite`.

Direct I/O (`direct` True or None): files are opened a second time with O_DIRECT where the
file system allows it (EINVAL at open or at the first I/O -> buffered I/O for that file,
remembered). The ring is 4096-aligned and chunk boundaries sit at aligned file offsets, so a
read reads the aligned range covering its chunk and passes on only the wanted bytes; a write
sends its aligned middle through O_DIRECT and its unaligned head and tail (at most 4095 bytes
each, only at a transfer's two ends) through buffered `pwrite`, so neighbouring bytes are
never touched (no read-modify-write, hence no lost update between concurrent transfers).

Coherence rule: Linux keeps O_DIRECT and the page cache coherent between accesses that do not
run at the same time: a direct read first writes back dirty cached pages of its range (also
pages dirtied through an mmap), a direct write writes back and then drops the cached pages of
its range (mapped pages are unmapped and fault in again). So modes may be mixed per file; what
must not happen is two overlapping accesses at once, one of them a write. The relay orders its
own transfers: one that overlaps an unfinished earlier transfer of the same file, either being
a store, waits for it (a store followed by a load of the same bytes returns the stored bytes
without the caller synchronizing). Callers keep the rule for other access: do not write bytes
through an mmap while a relay transfer of them is in flight; after `synchronize()` an mmap of
the file sees the stored data, and a load sees what an mmap wrote before `load()` was called.

Host memory: the ring is the only host memory the relay holds: `DiskRelay.host_bytes(...)`.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import EngineError, format_size
from .files import ALIGN, FileCache, read_all, write_all


_FIXES = {
    errno.ENOSPC: "Free space on that disk or point --offload-dir elsewhere.",
    errno.EDQUOT: "Free space within your disk quota or point --offload-dir elsewhere.",
    errno.ENOENT: "Check that the file exists (was the offload folder removed while running?).",
    errno.EACCES: "Make the file accessible or point --offload-dir elsewhere.",
    errno.EPERM: "Make the file accessible or point --offload-dir elsewhere.",
    errno.EROFS: "Point --offload-dir at a writable file system.",
    errno.EIO: "The disk reported an I/O error: check it (dmesg) or point --offload-dir elsewhere.",
    errno.EMFILE: "Raise the open-file limit (ulimit -n).",
}


def _down(x: int) -> int:
    return x - x % ALIGN


def _up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


class _EndOfFile(Exception):
    def __init__(self, size: int):
        self.size = size


class _Transfer:
    """One load or store: its file range, the earlier transfers it must follow, its progress."""

    def __init__(self, path: str, start: int, end: int, write: bool, device: torch.device):
        self.path, self.start, self.end, self.write, self.device = path, start, end, write, device
        self.deps: list[_Transfer] = []
        self.ready: "torch.cuda.Event | None" = None  # the compute issued before the call
        self.left = 0  # pieces not finished
        self.finished = threading.Event()
        self.failed = False  # later pieces skip their work once one has failed


class Handle:
    """A transfer in flight. Errors of its pieces are raised (as EngineError) by wait/synchronize."""

    def __init__(self, transfer: _Transfer, futures: list[Future]):
        self._t = transfer
        self._futures = futures
        self._events: list | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        """Order the current CUDA stream after the transfer. The host blocks until every chunk has
        been read and its copy issued (a store: until the file holds the data)."""
        events = self._result()
        if events:
            stream = torch.cuda.current_stream(self._t.device)
            for e in events:
                stream.wait_event(e)

    def synchronize(self) -> None:
        """Block the host until the transfer is complete."""
        for e in self._result():
            e.synchronize()

    def _result(self) -> list:
        if self._events is None:
            events, error = [], None
            for f in self._futures:  # all of them: no piece may still use dst/src when we raise
                try:
                    e = f.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    error = error or exc
                    continue
                if e is not None:
                    events.append(e)
            self._error = _user_error(error, self._t) if error is not None else None
            self._events = events
        if self._error is not None:
            raise self._error
        return self._events


def _user_error(exc: BaseException, t: _Transfer) -> BaseException:
    """OS errors become one-line EngineErrors; anything else is a bug and keeps its traceback."""
    verb = "writing" if t.write else "reading"
    if isinstance(exc, _EndOfFile):
        return EngineError(f"reading {t.path} failed: the file ends at byte {exc.size}, before byte {t.end}.",
                           "Check that the file was written completely (or load a smaller range).")
    if isinstance(exc, OSError):
        text = exc.strerror or os.strerror(exc.errno or 0)
        fix = _FIXES.get(exc.errno, "Check the disk and the file, or point --offload-dir elsewhere.")
        err = EngineError(f"{verb} {t.path} failed: {text}.", fix)
        err.__cause__ = exc
        return err
    return exc


@dataclass(frozen=True)
class DiskRelaySettings:
    """The relay an engine builds when its policy puts anything on disk.

    Default buffered I/O: a disk tensor the page cache holds (a model smaller than host memory)
    reads at memory speed, which O_DIRECT would forgo; `direct` (--direct-io) is for models
    bigger than host memory, where the page cache only doubles the reads.

    Measured (experiments/results/h100_2026-11-26_disk/relay, h200_2026-11-27_gpu_suite_disk): a
    page-cache read moves a few GB/s a thread, so threads set the rate (4 x 8 MiB 0.67x of FlexGen);
    at 16 threads 8 MiB ran 0.41x and 64 MiB 0.75x of 32 MiB. The ring holds 4 chunks a thread.
    """

    ring_bytes: int = 4 * 16 * (32 << 20)
    chunk_bytes: int = 32 << 20
    threads: int = 16
    direct: bool = False

    def host_bytes(self) -> int:
        return DiskRelay.host_bytes(self.ring_bytes, self.chunk_bytes)

    def fitted(self, disk_bytes: int) -> "DiskRelaySettings":
        """For a disk tier of `disk_bytes`: a ring no larger than it, in chunks small enough for 4 a thread."""
        ring = max(ALIGN, min(self.ring_bytes, _up(disk_bytes)))
        chunk = min(self.chunk_bytes, max(ALIGN, _down(ring // (4 * self.threads))))
        return replace(self, ring_bytes=max(chunk, ring - ring % chunk), chunk_bytes=chunk)


class DiskRelay:
    """Loads and stores between files and contiguous tensors through a ring of host buffers.

    `device` is the compute device (CUDA, or the CPU on a machine without a GPU); tensors may
    also be CPU tensors (copied synchronously on the workers). `direct`: None uses O_DIRECT
    where the file system allows it, True the same but warns for each file that falls back,
    False never. `threads` workers share `ring_bytes // chunk_bytes` buffers, pinned when
    `pin` and the device is CUDA. Use as a context manager or call `close()`.
    """

    def __init__(self, ring_bytes: int = 256 << 20, chunk_bytes: int = 16 << 20, threads: int = 4,
                 direct: bool | None = None, pin: bool = True, device: torch.device | str = "cpu"):
        if not isinstance(chunk_bytes, int) or chunk_bytes <= 0 or chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes={chunk_bytes} is not a positive multiple of {ALIGN}; round it up to one.")
        if not isinstance(ring_bytes, int) or ring_bytes < chunk_bytes:
            raise ValueError(f"ring_bytes={ring_bytes} is smaller than one chunk ({chunk_bytes}); raise it.")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads} must be an integer of at least 1.")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device is CUDA but no GPU is available; pass device='cpu'.")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise ValueError(f"device {self.device} is not supported; pass a CUDA device or 'cpu'.")
        self.cuda = self.device.type == "cuda"
        self.chunk_bytes = chunk_bytes
        self.slots = ring_bytes // chunk_bytes
        self.ring_bytes = self.slots * chunk_bytes
        self._arena = torch.empty(self.ring_bytes + ALIGN, dtype=torch.uint8)
        pad = (-self._arena.data_ptr()) % ALIGN  # O_DIRECT needs aligned buffers
        self._ring = self._arena[pad:pad + self.ring_bytes]
        self._ring_mv = memoryview(self._ring.numpy())
        self._pinned = pin and self.cuda
        if self._pinned:  # registered, not pin_memory=True, which rounds up to a power of two
            err = torch.cuda.cudart().cudaHostRegister(self._arena.data_ptr(), self._arena.numel(), 0)
            if int(err) != 0:
                raise EngineError(f"could not pin the {format_size(self.ring_bytes)} disk relay ring ({err}).",
                                  "Lower the ring size or free host memory.")
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # (slot, event of its last copy | None)
        for i in range(self.slots):
            self._free.put((i, None))
        self._files = FileCache(direct is not False, warn=direct is True)
        self._lock = threading.Lock()
        self._inflight: dict[str, list[_Transfer]] = {}
        self._h2d = self._d2h = None
        if self.cuda:  # one stream per direction: PCIe copies both ways at once
            self._h2d, self._d2h = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        init = (lambda: torch.cuda.set_device(self.device)) if self.cuda else None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="disk-relay", initializer=init)
        self._closed = False

    @staticmethod
    def host_bytes(ring_bytes: int, chunk_bytes: int) -> int:
        """Host memory a relay of these settings holds (pinned on CUDA): the ring, plus alignment."""
        return ring_bytes // chunk_bytes * chunk_bytes + ALIGN

    def mode(self, path: Path | str) -> str | None:
        """'buffered', 'direct' (opened with O_DIRECT, not refused so far) or None (not opened yet)."""
        return self._files.modes.get(os.path.realpath(path))

    def load(self, dst: torch.Tensor, path: Path | str, offset: int = 0) -> Handle:
        """dst <- dst.nbytes bytes of the file at `offset`, after the compute issued so far."""
        return self._start(self._bytes(dst, offset, "dst"), path, offset, write=False)

    def store(self, src: torch.Tensor, path: Path | str, offset: int = 0) -> Handle:
        """The file at `offset` <- src's bytes (the file is created or extended as needed)."""
        return self._start(self._bytes(src, offset, "src"), path, offset, write=True)

    def close(self) -> None:
        """Finish outstanding transfers, stop the workers, close the files, unpin the ring."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        while not self._free.empty():
            _, event = self._free.get_nowait()
            if event is not None:
                event.synchronize()
        self._files.close_all()
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._arena.data_ptr())
            self._pinned = False

    def __enter__(self) -> "DiskRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _bytes(self, t: torch.Tensor, offset: int, name: str) -> torch.Tensor:
        if self._closed:
            raise ValueError("this DiskRelay is closed; create a new one.")
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor; call .contiguous() or pass a contiguous buffer.")
        if t.is_cuda and t.device != self.device:
            raise ValueError(f"{name} is on {t.device} but the relay serves {self.device}; build it with that device.")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {t.device}; only CPU and CUDA tensors are supported.")
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset={offset} must be a non-negative integer byte position.")
        return t.reshape(-1).view(torch.uint8)

    def _start(self, flat: torch.Tensor, path: Path | str, offset: int, write: bool) -> Handle:
        t = _Transfer(os.path.realpath(path), offset, offset + flat.numel(), write, self.device)
        if flat.numel() == 0:
            return Handle(t, [])
        if flat.is_cuda:
            t.ready = torch.cuda.Event()
            t.ready.record(torch.cuda.current_stream(self.device))
            flat.record_stream(self._d2h if write else self._h2d)  # keep its memory until our copies ran
        base, pieces, a = _down(offset), [], offset
        while a < t.end:  # chunk boundaries at aligned file offsets: no chunk straddles two
            b = min(t.end, base + ((a - base) // self.chunk_bytes + 1) * self.chunk_bytes)
            pieces.append((a, b))
            a = b
        with self._lock:  # registering and submitting together keeps the queue in dependency order
            live = self._inflight.setdefault(t.path, [])
            t.deps = [u for u in live if u.start < t.end and t.start < u.end and (write or u.write)]
            live.append(t)
            t.left = len(pieces)
            futures = [self._pool.submit(self._piece, t, flat, a, b) for a, b in pieces]
        return Handle(t, futures)

    # The workers. A piece waits for its dependencies before taking a ring slot, and a slot's
    # holder waits on nothing but its own I/O, so the FIFO pool can never deadlock.

    def _take(self) -> int:
        slot, event = self._free.get()
        if event is not None:
            event.synchronize()  # the slot's last copy to the device has finished
        return slot

    def _piece(self, t: _Transfer, flat: torch.Tensor, a: int, b: int):
        """File bytes [a, b) of a transfer: wait for earlier overlapping transfers, take a slot,
        move the bytes through it. Returns a load's CUDA event (None on the CPU, for stores)."""
        try:
            if t.failed:
                return None
            for u in t.deps:
                u.finished.wait()
            slot, event = self._take(), None
            try:
                lo = _down(a)  # the slot holds file byte x at x - lo
                buf = self._ring[slot * self.chunk_bytes:][a - lo:b - lo]
                part = flat[a - t.start:b - t.start]
                if t.write:
                    copied = self._copy(buf, part, self._d2h, t.ready)
                    if copied is not None:
                        copied.synchronize()
                    self._write(t.path, slot, lo, a, b)
                else:
                    self._read(t.path, slot, lo, a, b)
                    event = self._copy(part, buf, self._h2d, t.ready)
            finally:
                self._free.put((slot, event))  # the next taker waits for a load's copy
            return event
        except BaseException:
            t.failed = True
            raise
        finally:
            self._piece_done(t)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, stream, ready) -> "torch.cuda.Event | None":
        """dst <- src: on `stream` after `ready` when a side is on the GPU, else synchronously."""
        if not (dst.is_cuda or src.is_cuda):
            dst.copy_(src)
            return None
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event(blocking=True)  # waiters sleep: spinning ones starve CPU attention
            event.record(stream)
        return event

    def _read(self, path: str, slot: int, lo: int, a: int, b: int) -> None:
        """File bytes [a, b) into the slot at [a - lo, b - lo), lo = a rounded down."""
        mv = self._ring_mv[slot * self.chunk_bytes:(slot + 1) * self.chunk_bytes]
        f = self._files.acquire(path, write=False)
        try:
            end = None
            if f.dfd is not None:
                try:  # the aligned range covering [a, b); the file may end inside it
                    end = lo + read_all(f.dfd, f.fd, mv[:_up(b) - lo], lo)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._files.disable_direct(path)
            if end is None:
                end = a + read_all(None, f.fd, mv[a - lo:b - lo], a)
            if end < b:
                raise _EndOfFile(os.fstat(f.fd).st_size)
        finally:
            self._files.release(f)

    def _write(self, path: str, slot: int, lo: int, a: int, b: int) -> None:
        """Slot bytes [a - lo, b - lo) to the file at [a, b): the aligned middle direct, the
        unaligned ends buffered, so bytes outside [a, b) are never written."""
        mv = self._ring_mv[slot * self.chunk_bytes:(slot + 1) * self.chunk_bytes]
        f = self._files.acquire(path, write=True)
        try:
            m0, m1 = _up(a), _down(b)
            if f.dfd is not None and m0 < m1:
                try:
                    write_all(f.dfd, f.fd, mv[m0 - lo:m1 - lo], m0)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._files.disable_direct(path)
                    m0 = m1 = b  # rewrite all of it buffered
                write_all(None, f.fd, mv[a - lo:m0 - lo], a)
                write_all(None, f.fd, mv[m1 - lo:b - lo], m1)
            else:
                write_all(None, f.fd, mv[a - lo:b - lo], a)
        finally:
            self._files.release(f)

    def _piece_done(self, t: _Transfer) -> None:
        with self._lock:
            t.left -= 1
            if t.left == 0:
                t.finished.set()
                live = self._inflight.get(t.path, [])
                if t in live:
                    live.remove(t)
                if not live:
                    self._inflight.pop(t.path, None)
