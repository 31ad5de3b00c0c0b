"""What a machine can do, as the cost model needs it: bandwidths, compute rates, memory per tier.

`offload-engine profile` measures a machine and writes this as JSON; `search` reads it. A profile
can be reused on the machine it describes (or one of the same kind). Rates are in bytes or
FLOP per second; sizes in bytes.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from offload_engine.errors import EngineError

GB = 1e9


@dataclass(frozen=True)
class HardwareProfile:
    name: str = "unnamed"  # e.g. the GPU's name and the host's core count
    gpu_mem_bytes: int = 0  # free GPU memory (0: no GPU)
    cpu_mem_bytes: int = 0  # available host memory
    disk_free_bytes: int = 0  # free space in the offload directory
    h2d_bytes_s: float = 25 * GB  # pinned host -> GPU
    d2h_bytes_s: float = 25 * GB  # GPU -> pinned host
    disk_read_bytes_s: float = 1 * GB  # the offload directory, through the disk relay (page cache cold)
    disk_write_bytes_s: float = 0.5 * GB
    gpu_mem_bytes_s: float = 1000 * GB  # HBM: what memory-bound kernels (decode GEMVs, attention) reach
    gpu_flops: float = 100e12  # fp16 matmul rate at prefill shapes
    # Weight bytes/s a decode matmul (a few rows against a weight matrix) reads: below the copy
    # rate (0: not measured; then gpu_mem_bytes_s stands in).
    gpu_gemv_bytes_s: float = 0.0
    gpu_attention_bytes_s: float = 500 * GB  # decode attention reading a GPU cache
    cpu_attention_bytes_s: float = 20 * GB  # decode attention reading a CPU cache, all cores
    # The same over a 4-bit packed cache, in fp16 bytes (2 per cached element): dequantizing makes
    # it compute-bound (0: not measured; then a packed element costs what an fp16 one does).
    cpu_packed_attention_bytes_s: float = 0.0
    cpu_mem_bytes_s: float = 40 * GB  # a host-memory read stream (shared by DMA and CPU attention)
    # Both at once, each while the other runs (0: not measured; then the two share cpu_mem_bytes_s):
    cpu_attention_dma_bytes_s: float = 0.0  # CPU attention while pinned memory streams to the GPU
    h2d_cpu_attention_bytes_s: float = 0.0  # pinned host -> GPU while CPU attention runs
    layer_overhead_s: float = 20e-6  # host time per layer and GPU batch in an eager step (launches)
    # What a CPU-attended (attention layer, GPU batch) adds beyond that: q/k/v out, the wait for
    # them, the output back (0: not measured, or no GPU).
    cpu_attention_call_s: float = 0.0
    measured: dict = field(default_factory=dict)  # the raw measurements behind the numbers

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value) or value < 0:
                    raise EngineError(f"hardware profile: {f.name} = {value} is not a finite non-negative number.",
                                      "Re-run `offload-engine profile`.")

    @property
    def cpu_device(self) -> bool:
        """A profile measured with the CPU as the compute device (no GPU: no CUDA graphs, and
        weights are read from host memory)."""
        return self.measured.get("device") == "cpu"

    @property
    def weight_read_bytes_s(self) -> float:
        """The rate decode matmuls read weights at: measured where it was, else the memory's."""
        return self.gpu_gemv_bytes_s or (self.cpu_mem_bytes_s if self.cpu_device else self.gpu_mem_bytes_s)

    @property
    def contention_measured(self) -> bool:
        return self.cpu_attention_dma_bytes_s > 0 and self.h2d_cpu_attention_bytes_s > 0

    def tiers_as_the_engine_sees_them(self) -> "HardwareProfile":
        """On a machine without a GPU the engine's "GPU" tier is host memory: the two tiers share it
        (half each, as the engine's default caps there)."""
        if self.gpu_mem_bytes:
            return self
        from dataclasses import replace
        return replace(self, gpu_mem_bytes=self.cpu_mem_bytes // 2, cpu_mem_bytes=self.cpu_mem_bytes // 2)

    def save(self, path: Path) -> None:
        from offload_engine.metrics import write_json_atomic
        write_json_atomic(Path(path), asdict(self))

    @classmethod
    def load(cls, path: Path) -> "HardwareProfile":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise EngineError(f"no hardware profile at {path}.", "Run `offload-engine profile --out FILE` first.") from None
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not a valid hardware profile ({e}).", "Re-run `offload-engine profile`.") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise EngineError(f"{path} has fields this version does not know: {', '.join(unknown)}.",
                              "Re-run `offload-engine profile` with this version.")
        return cls(**raw)
