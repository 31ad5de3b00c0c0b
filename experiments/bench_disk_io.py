"""Disk tier bandwidth: the raw disk, today's memmap -> GPU copy, and DiskRelay's settings.

Files: --total-gib spread over files of --file-mib MIN MAX bytes (like a model's layers) in a
fresh folder inside --dir (removed afterwards). Each pass moves every file once, one file
after another, each transfer finished before the next starts (as the engine loads a layer);
GB/s = bytes of the pass / seconds of the pass.
  raw_direct_read   dd-like sequential read with O_DIRECT into an aligned host buffer (cold)
  page_cache_read   the same with buffered reads (warm): the page cache's own speed
  memmap_copy       device tensor .copy_(torch.from_numpy(np.memmap)), today's Mover path, 1 thread
  memmap_copy_4t    the same, files spread over 4 threads (the Mover's io_threads)
  relay             DiskRelay.load, direct on/off x --threads x --chunk-mib, warm and cold;
                    DiskRelay.store of device tensors (write) and then fsync of every file
Warm: the page cache holds the files. Cold: the page cache is dropped before each pass, with
`echo 1 > /proc/sys/vm/drop_caches` where allowed (root), else posix_fadvise(DONTNEED) on each
file; the JSON names the method and the fraction of a file's pages still resident after it.

Timing: wall clock, median of --reps passes (cold: --cold-reps). Not triton.testing.do_bench:
a pass is seconds of host-blocking disk I/O, and a cold pass must start right after a cache
drop, which do_bench's five estimate calls and repeated timed calls cannot provide. Every
read configuration is checked byte for byte against the files in an untimed pass first;
writes are checked after their pass (all files for the first configuration of each mode,
one file for the others). The run stops starting new configurations after --budget-s.

  PYTHONPATH=. python experiments/bench_disk_io.py --dir /mnt/nvme/tmp --out DIR
  PYTHONPATH=. python experiments/bench_disk_io.py --smoke --out /tmp/smoke   # tiny, runs on CPU
"""
from __future__ import annotations

import argparse
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.disk_setup import drop_cache, fs_type, make_files  # noqa: E402
from offload_engine.io.page_cache import resident_fraction  # noqa: E402
from offload_engine.io.disk_relay import ALIGN, DiskRelay  # noqa: E402
from offload_engine.metrics import git_commit, hardware, write_json_atomic  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Median wall time of passes, warm or cold, within the run's time budget."""

    def __init__(self, paths: list[Path], budget_s: float, system_wide: bool):
        self.paths, self.deadline, self.system_wide = paths, time.perf_counter() + budget_s, system_wide
        self.drop_methods: set[str] = set()
        self.resident_after_drop: list[float] = []  # of the first file, after each drop

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def drop(self) -> None:
        self.drop_methods.add(drop_cache(self.paths, self.system_wide))
        frac = resident_fraction(self.paths[0])
        if frac is not None:
            self.resident_after_drop.append(frac)

    def passes(self, fn, reps: int, cold: bool, device: torch.device, warmed: bool = False) -> list[float]:
        """Seconds of each pass. Warm passes follow an untimed one (unless `warmed`: one just ran)."""
        if not cold and not warmed:
            fn()
            sync(device)
        times = []
        for _ in range(reps):
            if cold:
                self.drop()
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return times


def sequential_read(paths: list[Path], direct: bool, buf: mmap.mmap) -> bool:
    """Read every file through one aligned buffer; returns whether O_DIRECT was really used."""
    used = direct
    mv = memoryview(buf)
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            fd, used = os.open(p, os.O_RDONLY), False
        try:
            pos = 0
            while True:
                n = os.preadv(fd, [mv], pos)
                pos += n
                if n < len(mv):  # end of file (O_DIRECT could not go on from an unaligned end)
                    break
        finally:
            os.close(fd)
        if pos != p.stat().st_size:
            raise SystemExit(f"raw read of {p} stopped at byte {pos} of {p.stat().st_size}.")
    return used


def memmap_pass(paths: list[Path], dsts: list[torch.Tensor], threads: int, fresh: bool):
    """Today's path: dst.copy_(memmap tensor), pageable, page-faulting, synchronous, per file.

    Warm passes keep the maps (as the engine does). Cold passes map the files afresh and unmap
    them after: pages mapped by a process survive a cache drop, so kept maps would stay warm.
    """
    def mapping(i):
        return torch.from_numpy(np.memmap(paths[i], dtype=np.uint8, mode="r+", shape=(dsts[i].numel(),)))

    kept = None if fresh else [mapping(i) for i in range(len(paths))]

    def copy(i):
        dsts[i].copy_(kept[i] if kept is not None else mapping(i))

    if threads == 1:
        return lambda: [copy(i) for i in range(len(paths))]
    pool = ThreadPoolExecutor(threads)
    return lambda: list(pool.map(copy, range(len(paths))))


def gbps(nbytes: int, seconds: list[float]) -> float | None:
    return nbytes / statistics.median(seconds) / 1e9 if seconds else None


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)  # a folder on the disk to measure, made if missing
    folder = Path(tempfile.mkdtemp(prefix="bench_disk_io_", dir=args.dir))
    total = int(args.total_gib * GiB)
    need = 2 * total + 64 * MiB  # read files and write files
    if shutil.disk_usage(folder).free < need:
        shutil.rmtree(folder)
        sys.exit(f"{args.dir} has less than {need / GiB:.1f} GiB free; lower --total-gib or pick another --dir.")
    try:
        return measure(args, device, folder, total)
    finally:
        if not args.keep_files:
            shutil.rmtree(folder, ignore_errors=True)


def measure(args, device: torch.device, folder: Path, total: int) -> dict:
    lo, hi = (int(m * MiB) for m in args.file_mib)
    log(f"writing {total / GiB:.2f} GiB of files to {folder} ...")
    paths, host = make_files(folder, total, lo, hi, args.seed)
    sizes = [a.size for a in host]
    wpaths = [folder / f"write_{i:03d}.bin" for i in range(len(paths))]
    for p, n in zip(wpaths, sizes):  # allocated up front: the write passes measure writing, not allocating
        with open(p, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, n)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    ref = torch.from_numpy(np.concatenate(host)).to(device)
    dst = torch.empty_like(ref)
    views = [dst[offsets[i]:offsets[i + 1]] for i in range(len(paths))]
    srcs = [ref[offsets[i]:offsets[i + 1]] for i in range(len(paths))]
    timer = Timer(paths, args.budget_s, system_wide=not args.smoke)  # smoke: leave other caches alone
    out = {"files": {"count": len(paths), "bytes": sizes, "folder": str(folder)}, "results": []}

    def record(name: str, **kw) -> dict:
        row = {"path": name, **kw}
        for key in ("warm_s", "cold_s", "write_s", "write_fsync_s"):
            if key in row:
                row[key.replace("_s", "_GBps")] = gbps(total, row[key])
        out["results"].append(row)
        log("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in row.items() if not k.endswith("_s")))
        return row

    def check(what: str) -> None:
        sync(device)
        if not torch.equal(dst, ref):
            raise SystemExit(f"{what}: loaded bytes differ from the files; not timing it.")
        dst.fill_(0)

    buf = mmap.mmap(-1, args.raw_chunk_mib * MiB)  # page-aligned, as O_DIRECT needs
    raw = {}

    def raw_pass():
        raw["direct"] = sequential_read(paths, True, buf)

    cold = timer.passes(raw_pass, args.cold_reps, True, device)
    record("raw_direct_read", cold_s=cold, direct=raw["direct"])
    record("page_cache_read", warm_s=timer.passes(lambda: sequential_read(paths, False, buf), args.reps, False, device))

    for threads in (1, 4):
        fn = memmap_pass(paths, views, threads, fresh=False)
        fn()
        check(f"memmap_copy {threads} threads")
        warm = timer.passes(fn, args.reps, False, device)
        del fn  # unmaps the files
        cold = timer.passes(memmap_pass(paths, views, threads, fresh=True), args.cold_reps, True, device)
        record("memmap_copy" if threads == 1 else "memmap_copy_4t", threads=threads, warm_s=warm, cold_s=cold)

    checked_writes = set()
    for chunk_mib in args.chunk_mib:  # direct innermost: a run cut short by the budget still compares both
        chunk = max(ALIGN, int(chunk_mib * MiB) // ALIGN * ALIGN)
        ring = max(chunk, int(args.ring_mib * MiB))
        for threads in args.threads:
            for direct in args.direct:
                settings = dict(direct=direct == "on", threads=threads, chunk_MiB=chunk / MiB, ring_MiB=ring // chunk * chunk / MiB,
                                host_bytes=DiskRelay.host_bytes(ring, chunk))
                if timer.out_of_time():
                    record("relay", skipped="time budget", **settings)
                    continue
                with DiskRelay(ring, chunk, threads, direct=direct == "on", pin=True, device=device) as relay:
                    def load_all():
                        for v, p in zip(views, paths):
                            relay.load(v, p, 0).synchronize()

                    def store_all():
                        for s, p in zip(srcs, wpaths):
                            relay.store(s, p, 0).synchronize()

                    load_all()
                    check(f"relay {settings}")
                    warm = timer.passes(load_all, args.reps, False, device, warmed=True)
                    cold = timer.passes(load_all, args.cold_reps, True, device)
                    mode = relay.mode(paths[0])
                    if direct not in checked_writes:
                        store_all()
                        check_writes(wpaths, host, range(len(wpaths)))
                        checked_writes.add(direct)
                    write, write_fsync = [], []
                    for _ in range(args.cold_reps):
                        t0 = time.perf_counter()
                        store_all()
                        t1 = time.perf_counter()
                        for p in wpaths:
                            fd = os.open(p, os.O_RDONLY)
                            os.fsync(fd)
                            os.close(fd)
                        write.append(t1 - t0)
                        write_fsync.append(time.perf_counter() - t0)
                    check_writes(wpaths, host, [len(out["results"]) % len(wpaths)])
                record("relay", mode=mode, warm_s=warm, cold_s=cold, write_s=write, write_fsync_s=write_fsync, **settings)
    fr = timer.resident_after_drop
    out["cache_drop"] = {"methods": sorted(timer.drop_methods), "resident_fraction_after_drop":
                         {"min": min(fr), "max": max(fr)} if fr else None}
    return out


def check_writes(wpaths: list[Path], host: list[np.ndarray], which) -> None:
    for i in which:
        if not np.array_equal(np.fromfile(wpaths[i], dtype=np.uint8), host[i]):
            raise SystemExit(f"relay store: {wpaths[i]} differs from the tensor stored.")


def pick_default(rows: list[dict]) -> dict | None:
    """Best cold read; among those within 3% of it, best warm read."""
    relay = [r for r in rows if r["path"] == "relay" and r.get("cold_GBps")]
    if not relay:
        return None
    best = max(r["cold_GBps"] for r in relay)
    near = [r for r in relay if r["cold_GBps"] >= 0.97 * best]
    r = max(near, key=lambda r: r["warm_GBps"] or 0)
    return {k: r[k] for k in ("direct", "threads", "chunk_MiB", "ring_MiB", "cold_GBps", "warm_GBps", "write_fsync_GBps")}


def table(rows: list[dict]) -> str:
    def f(x):
        return f"{x:7.2f}" if isinstance(x, float) else f"{'-' if x is None else x:>7}"

    lines = [f"{'path':<16}{'direct':>7}{'thr':>5}{'chunk':>7}{'warm':>8}{'cold':>8}{'write':>8}{'+fsync':>8}   GB/s"]
    for r in rows:
        chunk = r.get("chunk_MiB")
        lines.append(f"{r['path']:<16}{str(r.get('direct', '-')):>7}{str(r.get('threads', '-')):>5}"
                     f"{'-' if chunk is None else f'{chunk:g}':>7} {f(r.get('warm_GBps'))} {f(r.get('cold_GBps'))}"
                     f" {f(r.get('write_GBps'))} {f(r.get('write_fsync_GBps'))}" + ("  skipped" if r.get("skipped") else ""))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for disk_io.json")
    p.add_argument("--dir", type=Path, help="folder on the disk to measure (the offload dir); required unless --smoke")
    p.add_argument("--total-gib", type=float, default=4.0, help="bytes over all files (default 4)")
    p.add_argument("--file-mib", type=float, nargs=2, default=[100, 400], metavar=("MIN", "MAX"))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--chunk-mib", type=float, nargs="+", default=[4, 16, 64])
    p.add_argument("--ring-mib", type=float, default=256, help="relay ring size (host memory held)")
    p.add_argument("--direct", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--reps", type=int, default=3, help="warm passes (median)")
    p.add_argument("--cold-reps", type=int, default=1, help="cold read passes and write passes (median)")
    p.add_argument("--raw-chunk-mib", type=int, default=16, help="buffer of the dd-like raw read")
    p.add_argument("--budget-s", type=float, default=480, help="start no configuration after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-files", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU: checks that the script works")
    args = p.parse_args(argv)
    if args.smoke:
        args.total_gib, args.file_mib = 5.3 / 1024, [1.1, 2.3]
        args.threads, args.chunk_mib, args.ring_mib = [1, 3], [0.0625, 0.25], 1
        args.reps, args.cold_reps, args.raw_chunk_mib = 1, 1, 1
        args.dir = args.dir or Path(tempfile.gettempdir())
    if args.dir is None:
        p.error("--dir is required (a folder on the disk to measure), unless --smoke")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    out = run(args)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    hw = hardware()
    hw.update(triton=triton_version, kernel=platform.release(), dir=str(args.dir), dir_fs=fs_type(args.dir))
    out["hardware"] = hw
    out["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out["commit"] = git_commit()
    out["wall_s"] = time.time() - started
    out["default"] = pick_default(out["results"])
    write_json_atomic(args.out / "disk_io.json", out)
    print(f"wrote {args.out / 'disk_io.json'}; cold passes: page cache dropped with {out['cache_drop']}", flush=True)
    d = out["default"]
    if d:
        print(f"default chosen (best cold read, ties within 3% by warm read): direct={d['direct']} "
              f"threads={d['threads']} chunk={d['chunk_MiB']:g} MiB ring={d['ring_MiB']:g} MiB")
    print(table(out["results"]), flush=True)


if __name__ == "__main__":
    main()
