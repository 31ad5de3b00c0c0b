"""`offload-engine profile`: measure this machine and write the HardwareProfile JSON that the
policy search reads (policies/hardware.py). The measurements are in offload_engine/hardware_probe.py;
this module checks the flags before anything is measured, prints a table and writes the file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EngineError, format_size
from ..metrics import check_output_file
from .options import positive_int

# (field, unit, scale, what the cost model uses it for): the --help text and the printed table.
FIELDS = (
    ("gpu_mem_bytes", "GiB", 2 ** 30, "free GPU memory: the GPU tier's capacity"),
    ("cpu_mem_bytes", "GiB", 2 ** 30, "available host memory: the CPU tier's capacity"),
    ("disk_free_bytes", "GiB", 2 ** 30, "free space in --offload-dir: the disk tier's capacity"),
    ("h2d_bytes_s", "GB/s", 1e9, "pinned host -> GPU copy: weights, cache and activations streamed in"),
    ("d2h_bytes_s", "GB/s", 1e9, "GPU -> pinned host copy: new cache entries and activations written back"),
    ("disk_read_bytes_s", "GB/s", 1e9, "reading --offload-dir through the disk relay, page cache dropped"),
    ("disk_write_bytes_s", "GB/s", 1e9, "writing --offload-dir through the disk relay, until fsync returns"),
    ("gpu_mem_bytes_s", "GB/s", 1e9, "GPU memory (copy: read + write): memory-bound decode kernels"),
    ("gpu_flops", "TFLOP/s", 1e12, "fp16 matmul at 4096^3 (float32 on a CPU device): prefill, batched MLPs"),
    ("gpu_gemv_bytes_s", "GB/s", 1e9, "weights read by a 16-row decode matmul (float32 on a CPU device)"),
    ("gpu_attention_bytes_s", "GB/s", 1e9, "decode attention over a GPU cache, K + V bytes read per second"),
    ("cpu_attention_bytes_s", "GB/s", 1e9, "decode attention over a CPU cache, all cores (--cpu-cache-compute)"),
    ("cpu_packed_attention_bytes_s", "GB/s", 1e9, "the same over a 4-bit cache (--compress-cache), in fp16 bytes"),
    ("cpu_mem_bytes_s", "GB/s", 1e9, "host memory read, all cores: shared by PCIe DMA and CPU attention"),
    ("cpu_attention_dma_bytes_s", "GB/s", 1e9, "CPU attention while pinned memory streams to the GPU (GPU only)"),
    ("h2d_cpu_attention_bytes_s", "GB/s", 1e9, "pinned host -> GPU copy while CPU attention runs (GPU only)"),
    ("layer_overhead_s", "us", 1e-6, "host time per scheduled layer and GPU batch of an eager decode step"),
    ("cpu_attention_call_s", "us", 1e-6, "what attending a layer's GPU batch on the CPU adds: copies and a sync (GPU only)"),
)

DESCRIPTION = """\
Measure this machine and write a hardware profile (JSON) for the policy search: memory per tier,
bandwidths, compute rates and per-layer overhead. Each number is the median of a few timed
repetitions after a warm-up; the whole profile takes under a minute on a GPU machine (--quick:
smaller buffers, fewer repetitions). Raw numbers with units, sizes and anything not measured
(the GPU fields on a CPU-only machine keep their defaults) are recorded under "measured".

fields (what the cost model uses each one for):
""" + "\n".join(f"  {name:<26} {unit:<8} {why}" for name, unit, _, why in FIELDS)

EXAMPLES = """\
examples:
  offload-engine profile --out hw.json
  offload-engine profile --out hw.json --offload-dir /nvme/offload --disk-mib 1024
  offload-engine profile --out hw.json --device cpu --quick
"""


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine and write the hardware profile the policy search reads",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the profile (JSON)")
    p.add_argument("--offload-dir", type=Path, default=Path("offload_dir"),
                   help="the folder whose disk is measured, as the engine would use it (default: ./offload_dir)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="the compute device to profile (default: cuda if present, else cpu)")
    p.add_argument("--disk-mib", type=positive_int, default=None, metavar="MIB",
                   help="size of the disk test file (default: 512 on a GPU, 64 on the CPU; 64 / 16 with --quick)")
    p.add_argument("--quick", action="store_true", help="smaller buffers and fewer repetitions: a few seconds")
    p.set_defaults(execute=execute)


def _device(name: str | None):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for but no CUDA GPU is visible.", "Drop --device or pass cpu.")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def table(profile) -> str:
    """One line per field: value and unit, or why it was not measured; then where it came from."""
    skipped, notes = profile.measured.get("not_measured", {}), profile.measured.get("notes", {})
    lines = [f"hardware profile: {profile.name}"]
    for name, unit, scale, _ in FIELDS:
        value = getattr(profile, name)
        text = (f"not measured (default {value / scale:g} {unit})" if name in skipped
                else f"{value / scale:10.2f} {unit}")
        note = f"  [{notes[name]}]" if name in notes else ""
        lines.append(f"  {name:<22} {text}{note}")
    return "\n".join(lines)


def execute(args: argparse.Namespace):
    from ..hardware_probe import profile_machine, sizes_for
    from ..io.tiers import disk_capacity

    check_output_file(args.out, "--out", "the profile")
    device = _device(args.device)
    sizes = sizes_for(device.type == "cuda", args.quick, args.disk_mib)
    free = disk_capacity(args.offload_dir)
    if free < 2 * sizes.disk_bytes:  # leave the disk as much free space as the test takes
        raise EngineError(f"--offload-dir {args.offload_dir} has {format_size(free)} free; the disk test needs "
                          f"{format_size(2 * sizes.disk_bytes)} (twice its file).",
                          "Lower --disk-mib or point --offload-dir at a disk with more space.")
    profile = profile_machine(device, args.offload_dir, sizes,
                              log=lambda what: print(f"measuring {what} ...", file=sys.stderr))
    profile.measured.update(quick=args.quick, command=args.argv)
    print(table(profile))
    profile.save(args.out)
    print(f"profile written to {args.out} ({profile.measured['elapsed_s']:.1f} s)", file=sys.stderr)
    return profile
