"""Host memory shared by CPU attention and pinned copies to the GPU, the copies paced below the
link's speed or not, and the copier waiting for them in one of three ways (--wait):
  spin    stream.synchronize() under CUDA's default scheduling: the waiting thread spins a core
  event   a blocking event: the thread sleeps until the copies are done
  flag    spin code, with the context switched to CU_CTX_SCHED_BLOCKING_SYNC
Per pace: CPU attention's GB/s (K + V of 8 OPT-30B-shaped items), the copies' GB/s, the sum.

What it showed (H200 host, experiments/NOTES.md): a spinning copier takes a core from CPU
attention's OpenMP team, which then waits on that core at every barrier (13 GB/s beside the
copies); a sleeping one leaves 61-62 GB/s beside copies at 50 GB/s, 111 GB/s in all.

  PYTHONPATH=. python experiments/bench_host_contention.py --out DIR --wait event   # a CUDA machine
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.bench_common import kernel_hardware, write_json  # noqa: E402
from experiments.bench_host_pages import SHAPE, host_cache, rate_for  # noqa: E402
from offload_engine.kernels.cpu_attention import cpp_backend, cpu_decode_attention  # noqa: E402
from offload_engine.kv.cpu_queue import libcuda  # noqa: E402

PIECE = 64 << 20
PACES_GBPS = (None, 45, 40, 35, 0)  # None: as fast as the link goes; 0: no copies


def blocking_sync() -> bool:
    """Switch the primary context to CU_CTX_SCHED_BLOCKING_SYNC (every synchronize sleeps)."""
    torch.cuda.init()
    lib, dev = libcuda(), ctypes.c_int()
    return (lib is not None and lib.cuDeviceGet(ctypes.byref(dev), torch.cuda.current_device()) == 0
            and lib.cuDevicePrimaryCtxSetFlags_v2(dev, 0x4) == 0)


class PacedCopier(threading.Thread):
    """Copies pinned pieces to the GPU, each issued no earlier than its share of the pace allows."""

    def __init__(self, src: torch.Tensor, pace_gbps: float | None, blocking_event: bool):
        super().__init__(daemon=True)
        self.src, self.pace, self.blocking_event = src, pace_gbps, blocking_event
        self.dst = torch.empty_like(src, device="cuda")
        self.stream = torch.cuda.Stream()
        self.stop, self.bytes = threading.Event(), 0

    def run(self) -> None:
        pieces = self.src.numel() // PIECE
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                for i in range(pieces):
                    if self.pace:
                        wait = t0 + self.bytes / (self.pace * 1e9) - time.perf_counter()
                        if wait > 0:
                            time.sleep(wait)
                    self.dst[i * PIECE:(i + 1) * PIECE].copy_(self.src[i * PIECE:(i + 1) * PIECE], non_blocking=True)
                    self.bytes += PIECE
                    if i % 4 == 3:
                        self.wait()  # at most four pieces in flight
                self.wait()
        self.seconds = time.perf_counter() - t0

    def wait(self) -> None:
        if self.blocking_event:
            done = torch.cuda.Event(blocking=True)
            done.record(self.stream)
            done.synchronize()
        else:
            self.stream.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for bench_host_contention_<wait>.json")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per pace")
    ap.add_argument("--wait", choices=("spin", "event", "flag"), default="event",
                    help="how the copier waits (spin shows what a spinning wait costs CPU attention)")
    args = ap.parse_args()
    if not args.out.is_dir():
        ap.error(f"--out {args.out}: not a folder")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU: the copies are host-to-device")
    sleeping = blocking_sync() if args.wait == "flag" else None
    items, copy_bytes = 8, 2 << 30
    item_bytes = 2 * SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3]
    store, cache, src, q = host_cache(SHAPE, items, copy_bytes, pin=True)
    cache_bytes = 2 * items * item_bytes

    def attend_all():
        for k, v in cache:
            cpu_decode_attention(q, k, v)
    result = {"hardware": dict(kernel_hardware(), cpu_count=os.cpu_count(), cpp_backend=cpp_backend()),
              "shape_BHTD": SHAPE, "items": items, "piece_mib": PIECE >> 20,
              "wait": args.wait, "blocking_sync_set": sleeping, "rows": []}
    for pace in PACES_GBPS:
        copier = PacedCopier(src, pace, args.wait == "event") if pace != 0 else None
        if copier:
            copier.start()
        attention = rate_for(args.seconds, attend_all) * cache_bytes / 1e9
        row = {"pace_gbps": pace if pace is not None else "full", "attention_gbps": round(attention, 1)}
        if copier:
            copier.stop.set()
            copier.join()
            row["copy_gbps"] = round(copier.bytes / copier.seconds / 1e9, 1)
        row["total_gbps"] = round(attention + row.get("copy_gbps", 0.0), 1)
        result["rows"].append(row)
        print(row, flush=True)
        write_json(args.out / f"bench_host_contention_{args.wait}.json", result)
    store.release()


if __name__ == "__main__":
    main()
