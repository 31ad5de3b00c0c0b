"""Measure this machine for the cost model: memory per tier, copy and disk bandwidths, compute and
attention rates, and the host overhead of an eager decode step (`offload-engine profile`).

Each quantity is one short function that times the engine's own path where there is one (the
disk relay, the decode-attention kernels, a real engine step), so the cost model predicts what
the engine does rather than what a synthetic benchmark could. Every timing is a median of a few
repetitions after an untimed warm-up; GPU work is timed with CUDA events (device time), host work
with the wall clock. Sizes (`Sizes`) are chosen to leave the caches (L2 / L3, the page cache) and
to keep the whole profile under about a minute on a GPU machine and 20 s on a small CPU host.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch

from offload_engine.policies.hardware import HardwareProfile

from .io.folders import free_bytes, make_folders, remove_if_empty
from .step_probe import cpu_attention_call_overhead, eager_layer_overhead

MiB = 1 << 20
GPU_ONLY = ("gpu_mem_bytes", "h2d_bytes_s", "d2h_bytes_s", "gpu_mem_bytes_s", "gpu_attention_bytes_s",
            "cpu_attention_dma_bytes_s", "h2d_cpu_attention_bytes_s", "cpu_attention_call_s")


@dataclass(frozen=True)
class Sizes:
    """What each measurement moves; see `sizes_for`."""

    reps: int
    pinned_bytes: int  # one host <-> device copy
    hbm_bytes: int  # one device-to-device copy (read once, written once)
    matmul_n: int  # n x n x n matmul
    gpu_attention: tuple[int, int, int, int]  # T, B, H, D of the token-major fp16 cache
    cpu_attention: tuple[int, int, int, int]  # B, H, T, D of the head-major fp16 cache
    host_read_bytes: int
    disk_bytes: int
    decode_steps: int  # steps per timed generate call of the tiny engine


def sizes_for(cuda: bool, quick: bool, disk_mib: int | None = None) -> Sizes:
    """Sizes for a GPU or CPU device; `quick` shrinks buffers and repetitions (tests, a first look)."""
    if cuda:
        s = Sizes(5, 256 * MiB, 1024 * MiB, 4096, (2048, 32, 32, 128), (16, 32, 1024, 128), 1024 * MiB,
                  512 * MiB, 16)
        if quick:
            s = Sizes(3, 64 * MiB, 256 * MiB, 4096, (512, 32, 32, 128), (8, 32, 512, 128), 256 * MiB, 64 * MiB, 8)
    else:
        s = Sizes(5, 0, 0, 2048, (0, 0, 0, 0), (8, 32, 512, 128), 256 * MiB, 64 * MiB, 16)
        if quick:
            s = Sizes(3, 0, 0, 1024, (0, 0, 0, 0), (4, 16, 512, 128), 64 * MiB, 16 * MiB, 8)
    if disk_mib is not None:
        s = replace(s, disk_bytes=disk_mib * MiB)
    return s


def median_s(fn: Callable[[], object], reps: int, device: torch.device | None = None, warmup: int = 1) -> float:
    """Median seconds of fn after `warmup` untimed calls: CUDA events around each call on a CUDA
    device (the device time of the work fn queues), the wall clock otherwise."""
    for _ in range(warmup):
        fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- memory per tier

def gpu_free_bytes(device: torch.device) -> int:
    """Free GPU memory now (the GPU tier's capacity; the CUDA context is already subtracted)."""
    return int(torch.cuda.mem_get_info(device)[0])


def host_available_bytes() -> int:
    """Host memory available without swapping (the CPU tier's capacity)."""
    return int(psutil.virtual_memory().available)


def disk_free_bytes(directory: Path) -> int:
    """Free space on the file system of the offload directory (the disk tier's capacity)."""
    return free_bytes(directory)


# ----------------------------------------------------------------------------- copies and compute

def pinned_copy_rates(device: torch.device, nbytes: int, reps: int) -> tuple[float, float]:
    """Bytes/s of one pinned host -> device copy and of one device -> pinned host copy."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = median_s(lambda: dev.copy_(host, non_blocking=True), reps, device)
    d2h = median_s(lambda: host.copy_(dev, non_blocking=True), reps, device)
    return nbytes / h2d, nbytes / d2h


def device_copy_rate(device: torch.device, nbytes: int, reps: int) -> float:
    """HBM bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_s(lambda: dst.copy_(src), reps, device)


def matmul_flops(device: torch.device, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n matmul: fp16 on a GPU, float32 on the CPU (its dtype for CPU-device runs)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / median_s(lambda: torch.matmul(a, b, out=out), reps, device, warmup=2)


def gemv_read_rate(device: torch.device, n: int, reps: int, rows: int = 16) -> float:
    """Weight bytes/s of a decode matmul: `rows` sequences against an n x 4n weight (an MLP's
    first matrix), which reads the weight once and does little with it (fp16 on a GPU, float32
    on the CPU)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    w = torch.randn(n, 4 * n, dtype=dtype, device=device)
    x = torch.randn(rows, n, dtype=dtype, device=device)
    out = torch.empty(rows, 4 * n, dtype=dtype, device=device)
    return w.numel() * w.element_size() / median_s(lambda: torch.matmul(x, w, out=out), reps, device, warmup=2)


def gpu_attention_rate(device: torch.device, shape: tuple[int, int, int, int], reps: int) -> float:
    """K + V bytes/s of kernels.decode_attention over a full (T, B, H, D) fp16 cache (the captured step's kernel)."""
    from offload_engine.kernels.decode_attention import decode_attention

    t, b, h, d = shape
    k, v = (torch.randn(t, b, h, d, dtype=torch.float16, device=device) for _ in range(2))
    q = torch.randn(b, h, d, dtype=torch.float16, device=device) * d ** -0.5
    length = torch.tensor(t, device=device)
    return 2 * k.nbytes / median_s(lambda: decode_attention(q, k, v, length), reps, device, warmup=2)


def cpu_attention_rate(shape: tuple[int, int, int, int], reps: int) -> tuple[float, str]:
    """K + V bytes/s of kernels.cpu_attention over a head-major (B, H, T, D) fp16 cache with all
    cores, and the backend that ran ("cpp:<isa>" or "torch")."""
    from offload_engine.kernels.cpu_attention import cpp_backend, cpu_decode_attention

    b, h, t, d = shape
    k, v = (torch.randn(b, h, t, d, dtype=torch.float16) for _ in range(2))
    q = torch.randn(b, h, d, dtype=torch.float16) * d ** -0.5
    seconds = median_s(lambda: cpu_decode_attention(q, k, v), reps)
    isa = cpp_backend() if os.environ.get("OFFLOAD_ENGINE_CPU_ATTENTION") != "torch" else None  # its switch
    return 2 * k.nbytes / seconds, f"cpp:{isa}" if isa else "torch"


def cpu_packed_attention_rate(shape: tuple[int, int, int, int], reps: int) -> float:
    """fp16-equivalent K + V bytes/s (2 per cached element) of CPU decode attention over the same
    cache packed to 4 bits in groups of 64 (--compress-cache's default): dequantizing costs compute."""
    from offload_engine.kernels.quant.attention import quant_decode_attention
    from offload_engine.kernels.quant.pack import quantize
    from offload_engine.kernels.quant.spec import QuantSpec

    b, h, t, d = shape
    spec = QuantSpec(4, 64)
    k, v = (quantize(torch.randn(b, h, t, d), spec).permute(2, 0, 1, 3, 4) for _ in range(2))  # head-major storage
    q = torch.randn(b, h, d, dtype=torch.float16) * d ** -0.5
    seconds = median_s(lambda: quant_decode_attention(q, k, v, spec, d, t), reps)
    return 2 * 2 * b * h * t * d / seconds


def contended_rates(device: torch.device, nbytes: int, shape: tuple[int, int, int, int],
                    seconds: float) -> tuple[float, float]:
    """(CPU attention K + V bytes/s, pinned host -> device bytes/s) with both running at once for
    `seconds`: a decode step that streams weights from host memory while the cache is attended
    there. Both read host memory, so each runs slower than alone (the cost model's host term)."""
    import threading

    from offload_engine.kernels.cpu_attention import cpu_decode_attention

    b, h, t, d = shape
    k, v = (torch.randn(b, h, t, d, dtype=torch.float16) for _ in range(2))
    q = torch.randn(b, h, d, dtype=torch.float16) * d ** -0.5
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream, stop, copied = torch.cuda.Stream(device), threading.Event(), []

    def copy_until_stopped() -> None:
        t0, n = time.perf_counter(), 0
        with torch.cuda.stream(stream):
            while not stop.is_set():
                dev.copy_(host, non_blocking=True)
                done = torch.cuda.Event(blocking=True)  # sleep while waiting: a spinning wait takes a
                done.record(stream)                     # core from CPU attention's OpenMP team
                done.synchronize()
                n += 1
        copied.append(n * nbytes / (time.perf_counter() - t0))

    cpu_decode_attention(q, k, v)  # warm: the C++ build and the first touch of the cache
    copier = threading.Thread(target=copy_until_stopped, daemon=True)
    copier.start()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        cpu_decode_attention(q, k, v)
        n += 1
    attention = n * 2 * k.nbytes / (time.perf_counter() - t0)
    stop.set()
    copier.join()
    return attention, copied[0]


def host_read_rate(nbytes: int, reps: int) -> float:
    """Host memory read bytes/s with all cores: the sum of an fp16 buffer viewed as int64 (integer
    adds: no fp16 or denormal slow path), as experiments/bench_cpu_attention.py measures it."""
    wide = torch.empty(nbytes // 2, dtype=torch.float16).uniform_(-1, 1).view(torch.int64)
    return wide.nbytes / median_s(wide.sum, reps)


def l3_cache_bytes() -> int | None:
    """The L3 size sysfs reports for CPU 0 (None where it reports none): what the CPU buffers must exceed."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip().upper()
                return int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1:], 0)
        except (OSError, ValueError):
            return None
    return None


# ----------------------------------------------------------------------------- disk

def drop_page_cache(fd: int) -> bool:
    """Ask the kernel to drop the file's clean cached pages (call after fsync); False where it cannot."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (AttributeError, OSError):
        return False


def cached_fraction(fd: int, nbytes: int) -> float | None:
    """Fraction of the file's first nbytes in the page cache: mincore over a fresh mapping, which
    touches no page. None where that cannot be asked (not Linux, a file system without mmap)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        addr = libc.mmap(None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = (ctypes.c_ubyte * (-(-nbytes // mmap.PAGESIZE)))()
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), vec) != 0:
                return None
            return float((np.frombuffer(vec, np.uint8) & 1).mean())  # only the low bit is defined
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes))
    except (OSError, AttributeError):
        return None


def disk_rates(directory: Path, nbytes: int, device: torch.device, reps: int) -> dict:
    """Write and read bytes/s of a file in `directory` through the engine's DiskRelay (its default
    settings, tensors on `device`: the engine's path file <-> host ring <-> device). A write counts
    until fsync returns (the bytes are on the disk, not in the page cache); before each read the
    file's pages are dropped and mincore tells whether that worked (`cached`: the fraction still
    cached, 0 for a cold read). The first round is an untimed warm-up that allocates the file."""
    from .errors import EngineError
    from .io.disk_relay import DiskRelay, DiskRelaySettings

    r = DiskRelaySettings().fitted(nbytes)  # the relay an engine with this much on disk builds
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).to(device)  # random: no compressing file system
    dst = torch.empty_like(src)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".offload-engine-profile-", suffix=".bin")
    write_s, read_s, cached = [], [], []
    try:
        with DiskRelay(r.ring_bytes, r.chunk_bytes, r.threads, direct=r.direct, device=device) as relay:
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                relay.store(src, name).synchronize()
                os.fsync(fd)  # any descriptor of the file flushes all its dirty pages
                write_s.append(time.perf_counter() - t0)
                drop_page_cache(fd)
                cached.append(cached_fraction(fd, nbytes))
                t0 = time.perf_counter()
                relay.load(dst, name).synchronize()
                read_s.append(time.perf_counter() - t0)
        if not torch.equal(dst, src):
            raise EngineError(f"the disk test file in {directory} read back different bytes than were written.",
                              "Check the disk (dmesg) or point --offload-dir elsewhere.")
    finally:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
    known = [c for c in cached[1:] if c is not None]
    return {"write_bytes_s": nbytes / statistics.median(write_s[1:]),
            "read_bytes_s": nbytes / statistics.median(read_s[1:]),
            "cached": max(known) if known else None, "relay": {**asdict(r), "device": str(device)}}


# ----------------------------------------------------------------------------- the whole profile

def profile_machine(device: torch.device, offload_dir: Path, sizes: Sizes,
                    log: Callable[[str], None] = lambda s: None) -> HardwareProfile:
    """Every measurement, in a HardwareProfile: derived fields in bytes and FLOP per second, raw
    numbers with units in `measured`, and `measured["not_measured"]` naming the fields left at
    their defaults and why."""
    created = make_folders(offload_dir)  # measured where the engine would put its files
    try:
        return _measure(device, offload_dir, sizes, log)
    finally:
        remove_if_empty(created)  # a folder made for the measurement goes again


def _measure(device: torch.device, offload_dir: Path, sizes: Sizes, log: Callable[[str], None]) -> HardwareProfile:
    t_start, cuda, n = time.perf_counter(), device.type == "cuda", sizes.reps
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    f: dict = {"gpu_mem_bytes": gpu_free_bytes(device) if cuda else 0, "cpu_mem_bytes": host_available_bytes(),
               "disk_free_bytes": disk_free_bytes(offload_dir)}
    m: dict = {"device": str(device), "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
               "l3_cache_bytes": l3_cache_bytes(), "gpu_free_bytes": f["gpu_mem_bytes"] if cuda else None,
               "cpu_available_bytes": f["cpu_mem_bytes"], "disk_free_bytes": f["disk_free_bytes"],
               "not_measured": {}, "notes": {}}
    if cuda:
        log("pinned host <-> device copies")
        f["h2d_bytes_s"], f["d2h_bytes_s"] = pinned_copy_rates(device, sizes.pinned_bytes, n)
        log("device memory copy")
        f["gpu_mem_bytes_s"] = device_copy_rate(device, sizes.hbm_bytes, n)
        log("GPU decode attention")
        f["gpu_attention_bytes_s"] = gpu_attention_rate(device, sizes.gpu_attention, n)
        m.update(h2d_GB_s=f["h2d_bytes_s"] / 1e9, d2h_GB_s=f["d2h_bytes_s"] / 1e9,
                 pinned_copy_MiB=sizes.pinned_bytes / MiB, gpu_copy_read_write_GB_s=f["gpu_mem_bytes_s"] / 1e9,
                 gpu_copy_MiB=sizes.hbm_bytes / MiB, gpu_decode_attention_GB_s=f["gpu_attention_bytes_s"] / 1e9,
                 gpu_attention_shape_TBHD=sizes.gpu_attention)
    else:
        m["not_measured"] = {k: "the compute device is the CPU (no GPU, or --device cpu): class default kept"
                             for k in GPU_ONLY}
    log("matmul")
    f["gpu_flops"] = matmul_flops(device, sizes.matmul_n, n)
    m[("gpu_matmul_fp16" if cuda else "cpu_matmul_fp32") + "_TFLOP_s"] = f["gpu_flops"] / 1e12
    m["matmul_n"] = sizes.matmul_n
    log("decode matmul")
    f["gpu_gemv_bytes_s"] = gemv_read_rate(device, sizes.matmul_n, n)
    m["decode_matmul_weight_read_GB_s"] = f["gpu_gemv_bytes_s"] / 1e9
    if not cuda:
        m["notes"]["gpu_flops"] = "float32 matmul on the CPU: the compute device of CPU-device runs"
    log("CPU decode attention")
    f["cpu_attention_bytes_s"], m["cpu_attention_backend"] = cpu_attention_rate(sizes.cpu_attention, n)
    m.update(cpu_decode_attention_GB_s=f["cpu_attention_bytes_s"] / 1e9, cpu_attention_shape_BHTD=sizes.cpu_attention)
    log("CPU decode attention over a 4-bit cache")
    f["cpu_packed_attention_bytes_s"] = cpu_packed_attention_rate(sizes.cpu_attention, n)
    m["cpu_packed_decode_attention_fp16_GB_s"] = f["cpu_packed_attention_bytes_s"] / 1e9
    if cuda:
        log("CPU decode attention while pinned memory streams to the GPU")
        f["cpu_attention_dma_bytes_s"], f["h2d_cpu_attention_bytes_s"] = contended_rates(
            device, sizes.pinned_bytes, sizes.cpu_attention, 0.4 * sizes.reps)
        m.update(cpu_attention_under_h2d_GB_s=f["cpu_attention_dma_bytes_s"] / 1e9,
                 h2d_under_cpu_attention_GB_s=f["h2d_cpu_attention_bytes_s"] / 1e9)
    log("host memory read")
    f["cpu_mem_bytes_s"] = host_read_rate(sizes.host_read_bytes, n)
    m.update(cpu_read_GB_s=f["cpu_mem_bytes_s"] / 1e9, cpu_read_MiB=sizes.host_read_bytes / MiB)
    log(f"disk ({sizes.disk_bytes / MiB:.0f} MiB through the disk relay)")
    disk = disk_rates(offload_dir, sizes.disk_bytes, device, min(n, 3))
    f["disk_read_bytes_s"], f["disk_write_bytes_s"] = disk["read_bytes_s"], disk["write_bytes_s"]
    m.update(disk_read_GB_s=disk["read_bytes_s"] / 1e9, disk_write_fsync_GB_s=disk["write_bytes_s"] / 1e9,
             disk_file_MiB=sizes.disk_bytes / MiB, disk_read_cached_fraction=disk["cached"],
             disk_read_cold=None if disk["cached"] is None else disk["cached"] < 0.05, disk_relay=disk["relay"])
    if not m["disk_read_cold"]:
        m["notes"]["disk_read_bytes_s"] = "the page cache could not be dropped (or not checked): may be memory speed"
    log("eager decode step of a tiny engine")
    step = eager_layer_overhead(device, offload_dir, sizes.decode_steps, n)
    f["layer_overhead_s"] = step["per_layer_s"]
    m.update(eager_step_ms=step["step_s"] * 1e3, eager_step_layers=step["layers"],
             eager_step_model_layers=step["model_layers"], layer_overhead_us=step["per_layer_s"] * 1e6)
    if cuda:
        log("eager decode step of a tiny engine attending its cache on the CPU")
        calls = cpu_attention_call_overhead(device, offload_dir, sizes.decode_steps, n, on_device=step)
        f["cpu_attention_call_s"] = calls["per_call_s"]
        m.update(eager_step_cpu_attention_ms=calls["step_s"] * 1e3, cpu_attention_call_us=calls["per_call_s"] * 1e6)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    m["elapsed_s"] = time.perf_counter() - t_start
    return HardwareProfile(name=f"{gpu}, {cores} cores", **f, measured=m)
