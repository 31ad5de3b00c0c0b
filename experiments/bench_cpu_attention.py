"""CPU decode attention against host memory bandwidth (kernels/cpu_attention.py), on the GPU
machine's host.

  PYTHONPATH=. python experiments/bench_cpu_attention.py --out DIR            # the 16-core host
  PYTHONPATH=. python experiments/bench_cpu_attention.py --out DIR --smoke    # tiny, any CPU

Sections, each at torch thread counts default / 8 / 16, alone and while a CUDA stream copies a
pinned 1 GiB buffer to the GPU in a loop (the engine's weight streaming; skipped without CUDA):
  bandwidth  STREAM-style probes with all threads over a multi-GB fp16 buffer: read only (an
             int64-view sum: integer adds, so no fp16 or denormal slow paths; an fp16 sum too)
             and copy (GB/s counts read + write)
  attention  OPT-30B decode, B = 24 and 48, Hq = Hkv = 56, D = 128, T = 544, fp16 cache as
             head-major slices home[:, :, :T] of a (B, H, T_max = 544, D) buffer (pinned when
             CUDA is there, as the engine's), left padding on some rows:
               sdpa   today's path, as CpuCacheAccess calls it: token_major_attention over the
                      permuted home with padding_mask (kernels.attention.attention -> SDPA)
               cpp    cpu_decode_attention_cpp (the new kernel)
               torch  cpu_decode_attention_torch (its fallback when the build fails)
             GB/s = cache bytes (K + V, all B x H x T x D fp16 values) / time.
Every variant is checked against the float64 reference (a few sequences, padded ones included)
before it is timed. Times: do_bench median on a CUDA machine (each call preceded by a sync of the
timing stream, so the events bracket exactly the host work), a wall-clock median otherwise.
Writes DIR/bench_cpu_attention.json after every section and prints a table last.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_common first: it chooses TRITON_INTERPRET (no GPU) before anything imports triton.
from experiments import bench_common  # noqa: E402
from experiments.bench_common import (GiB, add_timing_args, arg_parser, kernel_hardware, rel_err,  # noqa: E402
                                      write_json)
from offload_engine.kernels.attention import padding_mask  # noqa: E402
from offload_engine.kernels.cpu_attention import (cpp_backend, cpu_decode_attention_cpp, cpu_decode_attention_reference,  # noqa: E402
                                   cpu_decode_attention_torch)
from offload_engine.kv.codec import token_major_attention  # noqa: E402

CASES = [(24, 56, 128, 544, 544), (48, 56, 128, 544, 544)]           # B, H, D, T, T_max
SMOKE_CASES = [(2, 4, 64, 40, 48), (3, 6, 32, 19, 24)]
TOL = 2e-3                                                            # fp16 output vs float64


def hardware() -> dict:
    """kernel_hardware() plus the host facts this benchmark is about: threads, C++ backend, CPU model and flags."""
    info = dict(kernel_hardware(), cpu_count=os.cpu_count(), torch_threads_default=torch.get_num_threads(),
                cpp_backend=cpp_backend())
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags"))
        info["cpu_flags"] = [f for f in ("avx2", "f16c", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")
                             if f in flags]
    except (OSError, StopIteration):
        pass
    return info


def timer(fn, args) -> float:
    """Median ms of a host-side function (wall clock: one warm-up call, then 3 calls in smoke runs, else 7)."""
    if args.wall_clock or not torch.cuda.is_available():
        return bench_common.timer(fn, wall_clock=True, reps=3 if args.smoke else 7, warm_call=True)
    stream = torch.cuda.current_stream()

    def synced():
        stream.synchronize()    # start only once do_bench's start event has fired (after its cache flush)
        fn()
    return bench_common.timer(synced, args.warmup, args.rep)


class BackgroundH2D:
    """A thread keeps a non-blocking CUDA stream busy copying a pinned buffer to the GPU (two
    copies queued at a time); on exit, the host-to-device GB/s it achieved meanwhile."""

    def __init__(self, nbytes: int):
        self.src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).random_()
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()
        self.stop = threading.Event()
        self.GBps = 0.0

    def _loop(self) -> None:
        pending = []
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                self.dst.copy_(self.src, non_blocking=True)
                ev = torch.cuda.Event(blocking=True)                 # the waiting thread sleeps, not spins
                ev.record(self.stream)
                pending.append(ev)
                if len(pending) > 1:
                    pending.pop(0).synchronize()
                self.copies += 1
        self.stream.synchronize()

    def __enter__(self) -> "BackgroundH2D":
        self.copies, self.t0 = 0, time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        time.sleep(0.2)                                              # let the copies get going
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.GBps = self.copies * self.src.numel() / (time.perf_counter() - self.t0) / 1e9
        self.stop.clear()


def bandwidth(args, nbytes: int) -> dict:
    x = torch.empty(nbytes // 2, dtype=torch.float16).uniform_(-1, 1)
    y = torch.empty_like(x)
    wide = x.view(torch.int64)
    read_ms = timer(lambda: wide.sum(), args)
    fp16_ms = timer(lambda: x.sum(), args)
    copy_ms = timer(lambda: y.copy_(x), args)
    assert torch.equal(y, x)
    return dict(bytes=nbytes, read_ms=read_ms, read_GBps=nbytes / read_ms / 1e6, read_fp16_sum_ms=fp16_ms,
                read_fp16_sum_GBps=nbytes / fp16_ms / 1e6, copy_ms=copy_ms, copy_GBps=2 * nbytes / copy_ms / 1e6)


def make_case(b: int, h: int, d: int, t: int, t_max: int, pin: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    homes = []
    for _ in range(2):
        home = torch.empty(b, h, t_max, d, dtype=torch.float16, pin_memory=pin)
        home.copy_(torch.randn(b, h, t_max, d, generator=g, dtype=torch.float16))
        homes.append(home)
    q = (torch.randn(b, h, d, generator=g) * d ** -0.5).half()
    key_valid = torch.ones(b, t, dtype=torch.bool)
    key_valid[::3, : t // 8] = False                                 # a third of the rows left-padded
    key_valid[1, : t - 1] = False                                    # one row sees only its newest token
    return q, homes[0], homes[1], key_valid


def attention_case(b: int, h: int, d: int, t: int, t_max: int, args) -> dict:
    q, k_home, v_home, key_valid = make_case(b, h, d, t, t_max, pin=torch.cuda.is_available() and not args.no_pin)
    k, v = k_home[:, :, :t], v_home[:, :, :t]
    keys, values = k_home.permute(2, 0, 1, 3), v_home.permute(2, 0, 1, 3)   # as CpuCacheAccess hands them on
    mask = padding_mask(key_valid, 1)
    variants = {
        "sdpa": lambda: token_major_attention(q[:, None], keys, values, t, mask)[:, 0],
        "torch": lambda: cpu_decode_attention_torch(q, k, v, key_valid),
    }
    if cpp_backend() is not None:
        variants["cpp"] = lambda: cpu_decode_attention_cpp(q, k, v, key_valid)
    row = dict(B=b, H=h, D=d, T=t, T_max=t_max, cache_bytes=2 * k.numel() * 2,
               valid_fraction=float(key_valid.float().mean()), variants=list(variants))
    idx = torch.tensor(sorted({0, 1, b // 2, b - 1}))               # padded rows 0 and 1 included
    ref = cpu_decode_attention_reference(q[idx], k[idx], v[idx], key_valid[idx])
    row["err_vs_ref"] = {name: rel_err(fn()[idx], ref) for name, fn in variants.items()}
    row["checks_passed"] = all(e < TOL for e in row["err_vs_ref"].values())
    if not row["checks_passed"]:
        print(f"CHECK FAILED B={b}: {row['err_vs_ref']}", flush=True)
        return row
    row["runs"] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dma in ([False, True] if torch.cuda.is_available() else [False]):
            run = dict(threads=threads, dma=dma)
            if dma:
                with args.dma as bg:
                    for name, fn in variants.items():
                        run[f"{name}_ms"] = timer(fn, args)
                run["dma_GBps"] = bg.GBps
            else:
                for name, fn in variants.items():
                    run[f"{name}_ms"] = timer(fn, args)
            for name in variants:
                run[f"{name}_GBps"] = row["cache_bytes"] / run[f"{name}_ms"] / 1e6
            row["runs"].append(run)
            print(f"B={b} {run}", flush=True)
    torch.set_num_threads(args.threads[0])
    return row


def table(res: dict) -> str:
    lines = [f"cpp backend: {res['hardware']['cpp_backend']}; cpu: {res['hardware'].get('cpu_model')}; "
             f"gpu: {res['hardware']['gpu']}"]
    lines.append(f"{'bandwidth':>10} {'thr':>4} {'dma':>4} {'read GB/s':>10} {'fp16 sum':>9} {'copy r+w':>9} "
                 f"{'DMA GB/s':>9}")
    for r in res["bandwidth"]:
        lines.append(f"{'':>10} {r['threads']:>4} {'yes' if r['dma'] else 'no':>4} {r['read_GBps']:>10.1f} "
                     f"{r['read_fp16_sum_GBps']:>9.1f} {r['copy_GBps']:>9.1f} "
                     f"{format(r['dma_GBps'], '.1f') if 'dma_GBps' in r else '-':>9}")
    bw = {(r["threads"], r["dma"]): r["read_GBps"] for r in res["bandwidth"]}
    lines.append(f"{'attention':>10} {'thr':>4} {'dma':>4} {'sdpa ms':>8} {'GB/s':>6} {'torch ms':>9} {'GB/s':>6} "
                 f"{'cpp ms':>7} {'GB/s':>6} {'cpp/read':>8} {'x sdpa':>6}")
    for r in res["attention"]:
        label = f"B={r['B']}"
        if not r.get("checks_passed"):
            lines.append(f"{label:>10} CHECK FAILED {r['err_vs_ref']}")
            continue
        for run in r["runs"]:
            cpp = (f"{run['cpp_ms']:>7.2f} {run['cpp_GBps']:>6.1f} "
                   f"{run['cpp_GBps'] / bw.get((run['threads'], run['dma']), float('nan')):>8.2f} "
                   f"{run['sdpa_ms'] / run['cpp_ms']:>6.2f}") if "cpp_ms" in run else "   (cpp kernel not built)"
            lines.append(f"{label:>10} {run['threads']:>4} {'yes' if run['dma'] else 'no':>4} {run['sdpa_ms']:>8.2f} "
                         f"{run['sdpa_GBps']:>6.1f} {run['torch_ms']:>9.2f} {run['torch_GBps']:>6.1f} {cpp}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = arg_parser(__doc__, "bench_cpu_attention.json", "tiny shapes and buffers; runs on any CPU")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts to run (default: torch's default, 8, 16)")
    p.add_argument("--probe-gib", type=float, default=4.0, help="size of the bandwidth probe buffer, GiB")
    p.add_argument("--dma-gib", type=float, default=1.0, help="pinned buffer the background DMA copies, GiB")
    p.add_argument("--no-pin", action="store_true", help="pageable instead of pinned KV homes")
    add_timing_args(p, warmup_ms=100, rep_ms=600)
    p.add_argument("--wall-clock", action="store_true", help="time with a wall-clock median instead of do_bench")
    args = p.parse_args(argv)
    default = torch.get_num_threads()
    if args.threads is None:
        args.threads = [default] if args.smoke else list(dict.fromkeys([default, 8, 16]))
    cases = SMOKE_CASES if args.smoke else CASES
    probe = (64 << 20) if args.smoke else int(args.probe_gib * GiB)
    cuda = torch.cuda.is_available()
    args.dma = BackgroundH2D(int((64 << 20) if args.smoke else args.dma_gib * GiB)) if cuda else None
    res = dict(hardware=hardware(), settings=dict(
        smoke=args.smoke, threads=args.threads, probe_bytes=probe, dma_bytes=args.dma.src.numel() if cuda else None,
        pinned_homes=cuda and not args.no_pin, warmup_ms=args.warmup, rep_ms=args.rep, dtype="float16",
        tolerance=TOL, timer="do_bench median" if cuda and not args.wall_clock else "wall-clock median"),
        bandwidth=[], attention=[])
    path = args.out / "bench_cpu_attention.json"
    for threads in args.threads:
        torch.set_num_threads(threads)
        res["bandwidth"].append(dict(threads=threads, dma=False, **bandwidth(args, probe)))
        if args.dma is not None:
            with args.dma as bg:
                row = dict(threads=threads, dma=True, **bandwidth(args, probe))
            res["bandwidth"].append(dict(row, dma_GBps=bg.GBps))
        print(res["bandwidth"][-1], flush=True)
        write_json(path, res)
    torch.set_num_threads(args.threads[0])
    for case in cases:
        res["attention"].append(attention_case(*case, args))
        write_json(path, res)
    print(f"wrote {path}")
    print(table(res))


if __name__ == "__main__":
    main()
