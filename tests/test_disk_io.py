"""DiskRelay: byte-exact round trips, O_DIRECT and its fallback, coherence, a disk that fills up.

The reference for every check is the file's bytes read with plain Python I/O (or written with
np.memmap), independent of the relay. Destinations are pre-filled with a random pattern that
differs from the expected bytes, so an unwritten byte fails the comparison.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from offload_engine.io.disk_relay import ALIGN, DiskRelay
from offload_engine.errors import EngineError

CHUNK = 4 * ALIGN  # 16 KiB chunks, 4 of them in the ring: transfers of 100 KB cycle the ring
RING = 4 * CHUNK
SIZES = [1, 7, ALIGN - 1, ALIGN, ALIGN + 1, CHUNK, 3 * CHUNK, RING, RING + 3 * ALIGN + 5, 5 * RING + 12345]


def random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def random_file(path, n: int, seed: int) -> np.ndarray:
    data = random_bytes(n, seed)
    path.write_bytes(data.tobytes())
    return data


def file_bytes(path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


def garbage_like(n: int, avoid: np.ndarray, seed: int) -> torch.Tensor:
    """Random bytes that differ from `avoid` everywhere (so unwritten bytes always show)."""
    g = random_bytes(n, seed)
    g[g == avoid] ^= 0x5A
    return torch.from_numpy(g)


def o_direct_works(folder) -> bool:
    probe = folder / ".direct_probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = np.zeros(2 * ALIGN, dtype=np.uint8)
        start = (-buf.ctypes.data) % ALIGN
        os.pwrite(fd, memoryview(buf)[start:start + ALIGN], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture(params=[None, True, False], ids=["auto", "direct", "buffered"])
def relay(request):
    with DiskRelay(RING, CHUNK, threads=3, direct=request.param) as r:
        yield r


def test_store_then_load_is_byte_identical(relay, tmp_path):
    rng = np.random.default_rng(0)
    for i, n in enumerate(SIZES):
        path = tmp_path / f"t{i}.bin"
        before = random_file(path, n + 3 * ALIGN, seed=100 + i)  # neighbours that must survive
        offset = int(rng.integers(0, 2 * ALIGN))  # mostly unaligned
        data = random_bytes(n, seed=i)
        relay.store(torch.from_numpy(data.copy()), path, offset).synchronize()
        expect = before.copy()
        expect[offset:offset + n] = data
        np.testing.assert_array_equal(file_bytes(path), expect, err_msg=f"size {n} offset {offset}")
        dst = garbage_like(n, data, seed=1000 + i)
        relay.load(dst, path, offset).synchronize()
        np.testing.assert_array_equal(dst.numpy(), data, err_msg=f"size {n} offset {offset}")


def test_store_extends_a_new_file_to_exactly_its_end(relay, tmp_path):
    for n, offset in [(1, 0), (ALIGN + 9, 5), (2 * CHUNK, ALIGN), (RING + 17, 3 * ALIGN + 1)]:
        path = tmp_path / f"new_{n}_{offset}.bin"
        data = random_bytes(n, seed=n)
        relay.store(torch.from_numpy(data), path, offset).synchronize()
        got = file_bytes(path)
        assert got.size == offset + n  # O_DIRECT never pads the file to a block boundary
        np.testing.assert_array_equal(got[offset:], data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_load_typed_tensor_written_by_memmap(relay, tmp_path, dtype):
    """A file written by other means (np.memmap, never flushed) loads into a typed tensor."""
    shape = (37, 129)  # 4773 elements: no size here is a multiple of the chunk
    ref = torch.randn(shape, dtype=torch.float64).to(dtype) if dtype.is_floating_point \
        else torch.randint(-2**40, 2**40, shape, dtype=dtype)
    raw = ref.reshape(-1).view(torch.uint8).numpy()
    offset = 1000
    path = tmp_path / "w.bin"
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(offset + raw.size + 77,))
    mm[:] = random_bytes(mm.size, seed=5)
    mm[offset:offset + raw.size] = raw  # dirty page-cache pages: a direct read must see them
    fill = float("nan") if dtype.is_floating_point else -7
    dst = torch.full(shape, fill, dtype=dtype)
    relay.load(dst, path, offset).synchronize()
    assert torch.equal(dst.reshape(-1).view(torch.uint8), torch.from_numpy(raw))
    assert torch.equal(dst, ref) if dtype == torch.int64 else torch.equal(dst.isnan(), ref.isnan())
    del mm


def test_memmap_view_sees_a_later_store(relay, tmp_path):
    path = tmp_path / "m.bin"
    n = 3 * CHUNK + 100
    old = random_file(path, n, seed=1)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(n,))
    assert int(mm[5000]) == int(old[5000])  # fault the pages in before the store
    np.testing.assert_array_equal(np.asarray(mm), old)
    new = random_bytes(n - 2 * ALIGN, seed=2)
    relay.store(torch.from_numpy(new), path, ALIGN).synchronize()
    np.testing.assert_array_equal(np.asarray(mm[ALIGN:n - ALIGN]), new)  # a direct write dropped the pages
    np.testing.assert_array_equal(np.asarray(mm[:ALIGN]), old[:ALIGN])
    del mm


@pytest.mark.parametrize("first,second", [(False, True), (True, False)])
def test_buffered_and_direct_relays_agree_without_fsync(tmp_path, first, second):
    """A store through one mode is seen by a load through the other (coherence rule)."""
    path = tmp_path / "c.bin"
    n = 2 * RING + 333
    data = random_bytes(n, seed=3)
    with DiskRelay(RING, CHUNK, 2, direct=first) as a, DiskRelay(RING, CHUNK, 2, direct=second) as b:
        for k in range(3):  # rewrite and reread the same file several times
            data = random_bytes(n, seed=10 + k)
            a.store(torch.from_numpy(data), path, 11).synchronize()
            dst = garbage_like(n, data, seed=20 + k)
            b.load(dst, path, 11).synchronize()
            np.testing.assert_array_equal(dst.numpy(), data)


def test_many_transfers_in_flight(relay, tmp_path):
    """Loads and stores of several files at once, and same-file hazards ordered without waits."""
    rng = np.random.default_rng(7)
    files = [(tmp_path / f"f{i}.bin", int(rng.integers(1, 3 * RING))) for i in range(6)]
    contents = {p: random_file(p, n, seed=i) for i, (p, n) in enumerate(files)}
    handles, checks = [], []
    for i, (p, n) in enumerate(files):
        dst = garbage_like(n, contents[p], seed=50 + i)
        handles.append(relay.load(dst, p, 0))
        checks.append((dst, contents[p]))
    # store then load of the same range, load then store: issued back to back, no waiting
    path = tmp_path / "hazard.bin"
    n = 2 * RING + 5
    old = random_file(path, n + 10, seed=8)
    before = garbage_like(n, old[3:3 + n], seed=9)
    handles.append(relay.load(before, path, 3))  # must see the old bytes
    new = random_bytes(n, seed=10)
    handles.append(relay.store(torch.from_numpy(new), path, 3))
    after = garbage_like(n, new, seed=11)
    handles.append(relay.load(after, path, 3))  # must see the new bytes
    for h in handles:
        h.synchronize()
    for dst, want in checks:
        np.testing.assert_array_equal(dst.numpy(), want)
    np.testing.assert_array_equal(before.numpy(), old[3:3 + n])
    np.testing.assert_array_equal(after.numpy(), new)


@pytest.mark.parametrize("hazard", ["read-then-write", "write-then-read", "write-then-write"])
def test_overlapping_transfers_keep_call_order(tmp_path, monkeypatch, hazard):
    """The first transfer's I/O is made slow; the second, issued at once, must still come after it."""
    op = "preadv" if hazard == "read-then-write" else "pwrite"
    real = getattr(os, op)
    counter = itertools.count(1)  # next() is atomic; the relay's workers call this concurrently

    def slow_first(fd, buf, pos):
        if next(counter) <= 2:  # the first transfer's two pieces
            time.sleep(0.2)
        return real(fd, buf, pos)

    monkeypatch.setattr(os, op, slow_first)
    path = tmp_path / "order.bin"
    n = 2 * CHUNK
    old = random_file(path, n + 100, seed=21)
    one, two = random_bytes(n, seed=22), random_bytes(n, seed=23)
    with DiskRelay(RING, CHUNK, 4, direct=False) as r:
        if hazard == "read-then-write":
            dst = garbage_like(n, old[50:50 + n], seed=24)
            handles = [r.load(dst, path, 50), r.store(torch.from_numpy(one), path, 50)]
            want = old[50:50 + n]
        elif hazard == "write-then-read":
            dst = garbage_like(n, one, seed=25)
            handles = [r.store(torch.from_numpy(one), path, 50), r.load(dst, path, 50)]
            want = one
        else:
            handles = [r.store(torch.from_numpy(one), path, 50), r.store(torch.from_numpy(two), path, 60)]
        for h in handles:
            h.synchronize()
    if hazard == "write-then-write":
        expect = old.copy()
        expect[50:50 + n] = one
        expect[60:60 + n] = two
        np.testing.assert_array_equal(file_bytes(path)[:60 + n], expect[:60 + n])
    else:
        np.testing.assert_array_equal(dst.numpy(), want)


@pytest.mark.parametrize("threads,slots", [(1, 1), (8, 1), (2, 3)])
def test_tiny_rings_and_thread_counts_never_deadlock(tmp_path, threads, slots):
    """Chains of dependent transfers on a ring smaller than the thread pool (or one slot, one thread)."""
    path = tmp_path / "chain.bin"
    n = 3 * CHUNK + 7
    versions = [random_bytes(n, seed=80 + k) for k in range(4)]
    loaded = [garbage_like(n, v, seed=90 + k) for k, v in enumerate(versions)]
    result = {}

    def run():
        with DiskRelay(slots * CHUNK, CHUNK, threads) as r:
            handles = []
            for v, dst in zip(versions, loaded):
                handles += [r.store(torch.from_numpy(v), path, 9), r.load(dst, path, 9)]
            for h in handles:
                h.synchronize()
        result["ok"] = True

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert result.get("ok"), "transfers did not finish: deadlock"
    for v, dst in zip(versions, loaded):
        np.testing.assert_array_equal(dst.numpy(), v)


def test_direct_io_is_used_where_the_folder_allows_it(tmp_path):
    if not o_direct_works(tmp_path):
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    direct_calls = []  # list.append is atomic; `count += 1` from two worker threads can lose updates
    real_preadv, real_pwrite = os.preadv, os.pwrite

    def note(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_calls.append(fd)

    def preadv(fd, bufs, pos):
        note(fd)
        return real_preadv(fd, bufs, pos)

    def pwrite(fd, buf, pos):
        note(fd)
        return real_pwrite(fd, buf, pos)

    path = tmp_path / "d.bin"
    data = random_bytes(RING + 5, seed=4)
    mp = pytest.MonkeyPatch()
    mp.setattr(os, "preadv", preadv)
    mp.setattr(os, "pwrite", pwrite)
    try:
        with DiskRelay(RING, CHUNK, 2, direct=None) as r:
            r.store(torch.from_numpy(data), path, 3).synchronize()
            dst = garbage_like(data.size, data, seed=5)
            r.load(dst, path, 3).synchronize()
            assert r.mode(path) == "direct"
    finally:
        mp.undo()
    assert len(direct_calls) >= 2 * (RING // CHUNK)
    np.testing.assert_array_equal(dst.numpy(), data)


@pytest.mark.parametrize("where", ["open", "io"])
def test_fallback_to_buffered_when_o_direct_is_refused(tmp_path, monkeypatch, where):
    """tmpfs-like file systems refuse O_DIRECT at open or at the first I/O with EINVAL."""
    real_open, real_preadv, real_pwrite = os.open, os.preadv, os.pwrite

    def refuse(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    if where == "open":
        def fake_open(path, flags, mode=0o777, **kw):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real_open(path, flags, mode, **kw)
        monkeypatch.setattr(os, "open", fake_open)
    else:
        monkeypatch.setattr(os, "preadv", lambda fd, b, p: refuse(fd) or real_preadv(fd, b, p))
        monkeypatch.setattr(os, "pwrite", lambda fd, b, p: refuse(fd) or real_pwrite(fd, b, p))
    with DiskRelay(RING, CHUNK, 3, direct=None) as r:
        for i, n in enumerate([ALIGN - 3, 3 * CHUNK, RING + 4 * ALIGN + 1]):
            path = tmp_path / f"fb{i}.bin"
            before = random_file(path, n + 2 * ALIGN, seed=i)
            data = random_bytes(n, seed=30 + i)
            r.store(torch.from_numpy(data), path, ALIGN - 1).synchronize()
            expect = before.copy()
            expect[ALIGN - 1:ALIGN - 1 + n] = data
            np.testing.assert_array_equal(file_bytes(path), expect)
            back = garbage_like(n, data, seed=70 + i)
            r.load(back, path, ALIGN - 1).synchronize()
            np.testing.assert_array_equal(back.numpy(), data)
            loaded = random_file(tmp_path / f"other{i}.bin", n, seed=60 + i)  # read-only first use
            dst = garbage_like(n, loaded, seed=40 + i)
            r.load(dst, tmp_path / f"other{i}.bin", 0).synchronize()
            np.testing.assert_array_equal(dst.numpy(), loaded)
            assert r.mode(path) == "buffered" and r.mode(tmp_path / f"other{i}.bin") == "buffered"


def test_tmpfs_round_trip():
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    path = os.path.join(shm, f"disk_io_test_{os.getpid()}.bin")
    data = random_bytes(RING + 99, seed=12)
    try:
        with DiskRelay(RING, CHUNK, 2, direct=True) as r:
            r.store(torch.from_numpy(data), path, 5).synchronize()
            dst = garbage_like(data.size, data, seed=13)
            r.load(dst, path, 5).synchronize()
            assert r.mode(path) in ("direct", "buffered")
        np.testing.assert_array_equal(dst.numpy(), data)
    finally:
        os.remove(path)


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("disk-relay")]


def test_disk_full_mid_write_raises_one_line_and_relay_survives(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    budget = {"left": 2 * CHUNK + 100}

    def filling_pwrite(fd, buf, pos):
        if budget["left"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_pwrite(fd, memoryview(buf)[:budget["left"]], pos)
        budget["left"] -= n
        return n

    monkeypatch.setattr(os, "pwrite", filling_pwrite)
    path = tmp_path / "full.bin"
    r = DiskRelay(RING, CHUNK, 3, direct=None)
    h = r.store(torch.from_numpy(random_bytes(3 * RING, seed=14)), path, 0)
    for _ in range(2):  # raised again on a second call
        with pytest.raises(EngineError) as info:
            h.wait()
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and "No space left on device" in msg and "--offload-dir" in msg
    with pytest.raises(EngineError):
        h.synchronize()
    monkeypatch.setattr(os, "pwrite", real_pwrite)  # space freed: the same relay works again
    data = random_bytes(RING + 1, seed=15)
    r.store(torch.from_numpy(data), path, 1).synchronize()
    dst = garbage_like(data.size, data, seed=16)
    r.load(dst, path, 1).synchronize()
    np.testing.assert_array_equal(dst.numpy(), data)
    r.close()
    for t in relay_threads():
        t.join(timeout=5)
    assert not relay_threads()


def test_read_errors_name_the_file(relay, tmp_path):
    missing = tmp_path / "missing.bin"
    with pytest.raises(EngineError, match="missing.bin.*No such file"):
        relay.load(torch.empty(10, dtype=torch.uint8), missing, 0).synchronize()
    short = tmp_path / "short.bin"
    random_file(short, 5000, seed=17)
    with pytest.raises(EngineError, match="ends at byte 5000"):
        relay.load(torch.empty(2000, dtype=torch.uint8), short, 4000).synchronize()
    dst = torch.empty(1000, dtype=torch.uint8)  # still usable afterwards
    relay.load(dst, short, 4000).synchronize()
    np.testing.assert_array_equal(dst.numpy(), file_bytes(short)[4000:])


def test_replaced_file_is_reopened(relay, tmp_path):
    path = tmp_path / "r.bin"
    first = random_file(path, 3000, seed=18)
    dst = torch.empty(3000, dtype=torch.uint8)
    relay.load(dst, path).synchronize()
    np.testing.assert_array_equal(dst.numpy(), first)
    path.unlink()
    second = random_file(path, 3000, seed=19)  # a new inode under the same name
    relay.load(dst, path).synchronize()
    np.testing.assert_array_equal(dst.numpy(), second)


def test_bad_input_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        DiskRelay(RING, 1000, 1)
    with pytest.raises(ValueError, match="smaller than one chunk"):
        DiskRelay(CHUNK - ALIGN, CHUNK, 1)
    with pytest.raises(ValueError, match="threads"):
        DiskRelay(RING, CHUNK, 0)
    with DiskRelay(RING, CHUNK, 1) as r:
        with pytest.raises(ValueError, match="contiguous"):
            r.load(torch.empty(8, 8).t(), tmp_path / "x.bin")
        with pytest.raises(ValueError, match="offset"):
            r.store(torch.empty(8), tmp_path / "x.bin", -1)
    with pytest.raises(ValueError, match="closed"):
        r.load(torch.empty(8), tmp_path / "x.bin")
    r.close()  # closing twice is fine


def test_host_bytes_is_the_ring_and_threads_stop_on_close(tmp_path):
    assert DiskRelay.host_bytes(RING + CHUNK - 1, CHUNK) == RING + ALIGN
    with DiskRelay(RING + CHUNK - 1, CHUNK, 4) as r:
        assert r.ring_bytes == RING and r._arena.numel() == DiskRelay.host_bytes(RING, CHUNK)
        data = random_bytes(10 * CHUNK, seed=20)
        r.store(torch.from_numpy(data), tmp_path / "h.bin").synchronize()
        assert relay_threads()
    for t in relay_threads():
        t.join(timeout=5)
    assert not relay_threads()
    with pytest.raises(ValueError):
        r.store(torch.from_numpy(data), tmp_path / "h.bin")


def test_empty_tensor_is_a_no_op(relay, tmp_path):
    h = relay.load(torch.empty(0), tmp_path / "nothing.bin", 0)
    h.wait()
    h.synchronize()
    assert h.done() and not (tmp_path / "nothing.bin").exists()


def test_queued_disk_writes_hold_at_most_the_budget():
    """A write to disk holds its source until the disk has taken it; queued writes may hold no
    more than the budget: a new one first waits for the oldest (a prefill outruns a disk)."""
    from offload_engine.io.transfer import Mover
    from offload_engine.profiler import Profiler

    waited: list[int] = []

    class Handle:
        def __init__(self, n: int):
            self.n = n

        def wait(self) -> None:
            self.synchronize()

        def synchronize(self) -> None:
            if self.n not in waited:
                waited.append(self.n)

    class Relay:
        def __init__(self):
            self.stores = 0

        def store(self, src, path, offset):
            self.stores += 1
            return Handle(self.stores - 1)

        def close(self):
            pass

    class Disk:
        def locate(self, t):
            return "file", 0

    mover = Mover(torch.device("cpu"), overlap=False, profiler=Profiler(False), relay=Relay(), disk=Disk(),
                  disk_store_budget=250)
    src, dst = torch.randn(25), torch.empty(25)  # 100 bytes each
    held = []
    for _ in range(5):
        mover.store(dst, src, "kv_io", to_disk=True)
        held.append(mover.disk_store_bytes)
    assert waited == [0, 1, 2]  # the third write waited for the first, and so on
    assert held == [100, 200, 200, 200, 200]
    mover.store(torch.empty(100), torch.randn(100), "kv_io", to_disk=True)  # 400 bytes: larger than the budget
    assert waited == [0, 1, 2, 3, 4] and mover.disk_store_bytes == 400
    mover.store(dst, src, "kv_io")  # a copy to host memory is not a disk write: not held back
    assert waited == [0, 1, 2, 3, 4]


def test_prefault_touches_every_page_unless_switched_off(monkeypatch):
    """A fresh arena is faulted in (filled) with every core before cudaHostRegister pins it;
    OFFLOAD_ENGINE_PREFAULT=0 leaves it as allocated, for comparisons."""
    from offload_engine.io.tiers import PREFAULT_ENV, prefault

    arena = torch.full((3 << 20,), 7, dtype=torch.uint8)  # stands in for garbage in fresh memory
    monkeypatch.setenv(PREFAULT_ENV, "0")
    prefault(arena)
    assert bool((arena == 7).all())
    monkeypatch.delenv(PREFAULT_ENV)
    prefault(arena)
    assert not bool(arena.any())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_huge_pages_advised_on_the_aligned_interior_when_switched_on(monkeypatch):
    """With OFFLOAD_ENGINE_HUGE_PAGES=1 huge pages are advised over the whole 2 MiB pages inside an
    arena (madvise needs aligned bounds), by default not at all; the memory reads back what was written."""
    from offload_engine.io.tiers import HUGE_PAGE, HUGE_PAGES_ENV, advise_huge_pages

    arena = torch.empty(9 * HUGE_PAGE + 12345, dtype=torch.uint8)
    monkeypatch.delenv(HUGE_PAGES_ENV, raising=False)
    assert advise_huge_pages(arena) == 0
    monkeypatch.setenv(HUGE_PAGES_ENV, "1")
    advised = advise_huge_pages(arena)
    if advised == 0 and not Path("/sys/kernel/mm/transparent_hugepage").exists():
        pytest.skip("this kernel has no transparent huge pages")
    first = -arena.data_ptr() % HUGE_PAGE
    assert advised == (arena.numel() - first) // HUGE_PAGE * HUGE_PAGE >= 8 * HUGE_PAGE
    assert advise_huge_pages(arena[first + 1:first + HUGE_PAGE]) == 0  # no whole page inside
    data = torch.randint(0, 256, arena.shape, dtype=torch.uint8)
    arena.copy_(data)
    assert torch.equal(arena, data)


@pytest.mark.parametrize("disk_bytes", [1, 5000, 3 << 20, 300 << 20, 64 << 30])
def test_relay_settings_fit_the_disk_tier(disk_bytes):
    from offload_engine.io.disk_relay import DiskRelaySettings

    default = DiskRelaySettings()
    fit = default.fitted(disk_bytes)
    assert fit.threads == default.threads and fit.direct == default.direct
    assert fit.chunk_bytes % ALIGN == 0 and ALIGN <= fit.chunk_bytes <= default.chunk_bytes
    assert fit.ring_bytes % fit.chunk_bytes == 0 and fit.chunk_bytes <= fit.ring_bytes <= default.ring_bytes
    assert fit.ring_bytes <= max(ALIGN, -(-disk_bytes // ALIGN) * ALIGN)  # never more than is on disk
    if disk_bytes >= default.ring_bytes:
        assert fit == default  # a large disk tier gets the measured settings unchanged
    elif fit.chunk_bytes > ALIGN:
        assert fit.ring_bytes // fit.chunk_bytes >= 4 * fit.threads  # 4 chunks a thread
    DiskRelay(fit.ring_bytes, fit.chunk_bytes, fit.threads).close()  # the relay accepts them
