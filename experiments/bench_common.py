"""Helpers shared by the kernel benchmarks in experiments/ (bench_attention_scores, bench_cpu_attention,
bench_decode_attention, bench_hip_kernels, bench_quant_kernels).

Importing this module chooses Triton's interpreter when there is no CUDA device, before triton is
imported, so the scripts import it ahead of any kernel module and their --smoke runs work on CPU.
Hardware facts and atomic JSON writing build on offload_engine.metrics (the scripts take git_commit
from there too), so kernel results carry the same facts as engine results. Times are medians in ms: triton.testing.do_bench on CUDA, a
wall-clock median where do_bench cannot run (CPU) or must not (host-side work).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():  # smoke runs: Triton's interpreter on CPU; set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from offload_engine import metrics  # noqa: E402

GiB = 1 << 30


def kernel_hardware() -> dict:
    """offload_engine.metrics.hardware() plus triton and CUDA versions, TRITON_INTERPRET, and the GPU's SM count."""
    info = metrics.hardware()
    info.update(triton=triton.__version__, cuda=torch.version.cuda,
                interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    if torch.cuda.is_available():
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    return info


def write_json(path: Path, data: dict) -> None:
    """Create the folder, then write all or nothing (metrics.write_json_atomic): never half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metrics.write_json_atomic(path, data)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def timer(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100, *, wall_clock: bool = False,
          reps: int = 3, warm_call: bool = False) -> float:
    """Median ms of fn: do_bench on CUDA unless wall_clock, else of reps timed calls (+1 untimed if warm_call)."""
    if torch.cuda.is_available() and not wall_clock:
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    if warm_call:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def hbm_copy_ms(nbytes: int, device: str, time_ms: Callable[[Callable[[], object]], float]) -> float:
    """ms of one same-device copy of nbytes (the memory-bandwidth bound; it moves 2 * nbytes), timed by time_ms."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    return ms


def arg_parser(doc: str, json_name: str, smoke_help: str) -> argparse.ArgumentParser:
    """A parser with the script's docstring as description and the --out and --smoke every script takes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help=f"folder for {json_name}")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    return ap


def add_timing_args(ap: argparse.ArgumentParser, warmup_ms: int = 25, rep_ms: int = 100) -> None:
    """--warmup and --rep: do_bench's warm-up and repetition times, ms."""
    ap.add_argument("--warmup", type=int, default=warmup_ms, help="do_bench warmup, ms")
    ap.add_argument("--rep", type=int, default=rep_ms, help="do_bench repetition time, ms")


def device_or_exit(ap: argparse.ArgumentParser, smoke: bool) -> str:
    """'cuda' when there is a GPU; else 'cpu', which only --smoke may use (a usage error otherwise)."""
    if torch.cuda.is_available():
        return "cuda"
    if not smoke:
        ap.error("no GPU here: pass --smoke for the tiny CPU run")
    return "cpu"
