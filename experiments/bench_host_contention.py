"""Host memory shared by CPU attention and paced weight copies: does the total grow when the
copies run slower than PCIe allows?

At full speed the pinned copies take about 55 GB/s and CPU attention gets 11-20 of what it reads
alone (70-94 GB/s): the two together move 64-73 GB/s. A decode step of OPT-30B `20 80` 24x2 must
move 48 GB of weights and 35.9 GB of cache; 40 token/s needs that in 1.145 s. If the memory
system gives more in total when the copies are paced (say 42 GB/s for 1.145 s), pacing the
weight stream would pay. Per pace this reports the copies' and CPU attention's GB/s together.

The copier waits for its copies one of three ways (--wait): `spin`, CUDA's default (a
synchronize spins a core), `event` (a blocking event: the thread sleeps), `flag` (spin code, with
the context switched to blocking sync as the engine does when it queues CPU attention).

  PYTHONPATH=. python experiments/bench_host_contention.py --out DIR --wait spin   # a CUDA machine
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.bench_common import kernel_hardware, write_json  # noqa: E402
from experiments.bench_host_pages import SHAPE, rate_for  # noqa: E402
from kernels.cpu_attention import cpp_backend, cpu_decode_attention  # noqa: E402
from offload_engine.io.tiers import HostStorage  # noqa: E402
from offload_engine.kv.cpu_queue import sleep_on_waits  # noqa: E402

PIECE = 64 << 20
PACES_GBPS = (None, 45, 40, 35, 0)  # None: as fast as the link goes; 0: no copies


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
    ap.add_argument("--wait", choices=("spin", "event", "flag"), default="spin", help="how the copier waits")
    args = ap.parse_args()
    if not args.out.is_dir():
        ap.error(f"--out {args.out}: not a folder")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU: the copies are host-to-device")
    sleeping = sleep_on_waits(torch.device("cuda")) if args.wait == "flag" else None
    items, copy_bytes = 8, 2 << 30
    item_bytes = 2 * SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3]
    store = HostStorage(pin=True, planned_bytes=2 * items * item_bytes + copy_bytes)
    cache = [(store.allocate(SHAPE, torch.float16, f"k{i}"), store.allocate(SHAPE, torch.float16, f"v{i}"))
             for i in range(items)]
    for k, v in cache:
        k.uniform_(-1, 1)
        v.uniform_(-1, 1)
    src = store.allocate((copy_bytes,), torch.uint8, "copy source")
    src.random_(0, 256)
    q = torch.randn(SHAPE[0], SHAPE[1], SHAPE[3], dtype=torch.float16) * SHAPE[3] ** -0.5
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
