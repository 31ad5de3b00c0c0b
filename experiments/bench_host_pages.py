"""Host memory pages under CPU attention: 2 MiB transparent huge pages against 4 KiB pages.

OPT-30B at 16 GiB with CPU attention reads about 36 GB of KV cache a step on the CPU while about
48 GB of weights stream to the GPU out of the same memory. With 4 KiB pages every core takes a
TLB miss every 4 KiB it streams, and under a hypervisor each miss walks two page tables. This
allocates the cache and a copy source exactly as the engine does (HostStorage: one arena, pinned,
huge pages advised when OFFLOAD_ENGINE_HUGE_PAGES=1) in both modes and measures, per mode:
  huge_fraction   the arena's share backed by huge pages (/proc/self/smaps AnonHugePages)
  attention       CPU decode attention GB/s (K + V bytes) over 8 OPT-30B (layer, batch) items
  copy            pinned host -> GPU GB/s of a 2 GiB buffer
  together        both at once: attention GB/s and copy GB/s (the decode step's contention)

  PYTHONPATH=. python experiments/bench_host_pages.py --out DIR            # a CUDA machine
  PYTHONPATH=. python experiments/bench_host_pages.py --out DIR --smoke    # tiny, no GPU needed
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.bench_common import kernel_hardware, write_json  # noqa: E402
from offload_engine.kernels.cpu_attention import cpp_backend, cpu_decode_attention  # noqa: E402
from offload_engine.io.tiers import HUGE_PAGES_ENV, HostStorage  # noqa: E402

SHAPE = (24, 56, 528, 128)          # B, H, T (the 512 + 32 run's mean length), D
SMOKE_SHAPE = (2, 4, 64, 32)


def thp_settings() -> dict:
    out = {}
    for name in ("enabled", "defrag"):
        try:
            out[name] = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
        except OSError:
            out[name] = None
    return out


def huge_bytes(lo: int, hi: int) -> int:
    """AnonHugePages of the mappings overlapping [lo, hi) of this process."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m[1], 16) < hi and int(m[2], 16) > lo
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def rate_for(seconds: float, fn) -> float:
    """Calls of fn per second over at least `seconds` (after one warm call)."""
    fn()
    t0, n = time.perf_counter(), 0
    while n == 0 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def host_cache(shape, items: int, copy_bytes: int, pin: bool):
    """One HostStorage arena, as the engine allocates it, holding `items` random fp16 (K, V) pairs of
    `shape` (B, H, T, D) and a random copy source of `copy_bytes`; with a query: (store, cache, src, q)."""
    item_bytes = 2 * shape[0] * shape[1] * shape[2] * shape[3]
    store = HostStorage(pin=pin, planned_bytes=2 * items * item_bytes + copy_bytes)
    cache = [(store.allocate(shape, torch.float16, f"k{i}"), store.allocate(shape, torch.float16, f"v{i}"))
             for i in range(items)]
    for k, v in cache:
        k.uniform_(-1, 1)
        v.uniform_(-1, 1)
    src = store.allocate((copy_bytes,), torch.uint8, "copy source").random_(0, 256)
    q = torch.randn(shape[0], shape[1], shape[3], dtype=torch.float16) * shape[3] ** -0.5
    return store, cache, src, q


def measure(mode: str, shape, items: int, copy_bytes: int, seconds: float) -> dict:
    os.environ[HUGE_PAGES_ENV] = mode
    cuda = torch.cuda.is_available()
    item_bytes = 2 * shape[0] * shape[1] * shape[2] * shape[3]
    store, cache, src, q = host_cache(shape, items, copy_bytes, cuda)
    lo, hi = cache[0][0].data_ptr(), src.data_ptr() + copy_bytes
    row = {"mode": "huge pages advised" if mode == "1" else "default pages",
           "huge_fraction": round(min(1.0, huge_bytes(lo, hi) / (hi - lo)), 3)}

    def attend_all():
        for k, v in cache:
            cpu_decode_attention(q, k, v)
    cache_bytes = 2 * items * item_bytes
    row["attention_gbps"] = round(rate_for(seconds, attend_all) * cache_bytes / 1e9, 1)
    if cuda:
        dst = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()

        def copy_once():
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event(blocking=True)  # sleep, not spin: a spinning wait takes a core
                done.record(stream)                     # from CPU attention (bench_host_contention)
            done.synchronize()
        row["copy_gbps"] = round(rate_for(seconds, copy_once) * copy_bytes / 1e9, 1)
        stop = threading.Event()
        t0, n = time.perf_counter(), 0

        def copier():
            nonlocal n
            while not stop.is_set():
                copy_once()
                n += 1
        thread = threading.Thread(target=copier, daemon=True)
        thread.start()
        row["together_attention_gbps"] = round(rate_for(seconds, attend_all) * cache_bytes / 1e9, 1)
        stop.set()
        thread.join()
        row["together_copy_gbps"] = round(n * copy_bytes / (time.perf_counter() - t0) / 1e9, 1)
        row["together_total_gbps"] = round(row["together_attention_gbps"] + row["together_copy_gbps"], 1)
    store.release()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for bench_host_pages.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and short timings (any machine)")
    ap.add_argument("--seconds", type=float, default=4.0, help="timing window per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two modes this many times")
    args = ap.parse_args()
    if not args.out.is_dir():
        ap.error(f"--out {args.out}: not a folder")
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    items, copy_bytes = (2, 1 << 20) if args.smoke else (8, 2 << 30)
    seconds = 0.05 if args.smoke else args.seconds
    result = {"hardware": dict(kernel_hardware(), cpu_count=os.cpu_count(), cpp_backend=cpp_backend()),
              "thp": thp_settings(), "shape_BHTD": shape, "items": items, "rows": []}
    for _ in range(args.rounds):
        for mode in ("0", "1"):
            result["rows"].append(measure(mode, shape, items, copy_bytes, seconds))
            print(result["rows"][-1], flush=True)
            write_json(args.out / "bench_host_pages.json", result)


if __name__ == "__main__":
    main()
