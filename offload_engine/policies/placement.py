"""The placement policy (FlexGen's knobs) and the rule that maps percentages to tensors."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from offload_engine.errors import EngineError, require_int, require_number
from offload_engine.io.tiers import Tier

from .kv_policy import Compression, KVSettings


@dataclass(frozen=True)
class Policy:
    """Where things live and how the batch is cut.

    Percentages are of bytes; what is not on the GPU or CPU goes to disk.
    The effective batch is gpu_batch_size * num_gpu_batches: a "block" of GPU batches shares
    one load of each layer's weights.
    """

    weight_gpu_percent: float = 100
    weight_cpu_percent: float = 0
    cache_gpu_percent: float = 100
    cache_cpu_percent: float = 0
    act_gpu_percent: float = 100
    act_cpu_percent: float = 0
    gpu_batch_size: int = 4
    num_gpu_batches: int = 1
    overlap: bool = True
    pin_weight: bool = True
    cpu_cache_compute: bool = False
    sep_layer: bool = True
    weight_buffers: int = 0  # GPU staging slots for streamed weights; 0: 3 if they fit, else 2
    cuda_graphs: bool = True  # capture the decode step where the placement allows it
    compress_weight: Compression | None = None  # 2-D weights stored 4/8-bit in every tier
    compress_cache: Compression | None = None  # KV cache stored 4/8-bit in every tier
    kv: KVSettings = KVSettings()

    @classmethod
    def from_percent(cls, percent: Sequence[float], **kw) -> "Policy":
        if len(percent) != 6:
            raise EngineError(f"--percent takes 6 numbers, got {len(percent)}.",
                              "Give weights, KV cache, activations on GPU and CPU, e.g. --percent 100 0 100 0 100 0.")
        return cls(*percent, **kw)

    def __post_init__(self) -> None:
        self._check_types()
        for kind, gpu, cpu in self._pairs():
            if not (math.isfinite(gpu) and math.isfinite(cpu)):
                raise EngineError(f"--percent for {kind}: GPU {gpu:g} and CPU {cpu:g} must be finite numbers.",
                                  "Give percentages between 0 and 100.")
            if min(gpu, cpu) < 0 or gpu + cpu > 100:
                raise EngineError(
                    f"--percent for {kind}: GPU {gpu:g} + CPU {cpu:g} must be between 0 and 100 each and sum to at most 100.",
                    "The rest goes to disk; lower one of the two.")
        if self.weight_buffers == 1 or self.weight_buffers < 0:
            raise EngineError("--weight-buffers must be 0 (automatic) or at least 2 (double buffering).")
        if self.compress_weight is not None and self.compress_weight.bits == 2:
            raise EngineError("2-bit storage is for the KV cache: weights are stored 4 or 8-bit.",
                              "Pass --quant-bits 2 with --compress-cache alone.")
        if self.compress_cache is not None and self.compress_cache.bits == 2 and self.kv.policy == "hip":
            raise EngineError("HiP's hot cache reads a 4 or 8-bit host cache, not 2-bit.", "Pass --quant-bits 4 or 8.")
        if self.compress_cache is not None and self.compress_cache.keys_per_channel and self.kv.policy != "full":
            raise EngineError(f"the KIVI cache codec (keys per channel) works with --kv-policy full, not "
                              f"{self.kv.policy}: H2O's evictions and HiP's gathers need records that stand alone.",
                              "Pass --cache-codec token with --compress-cache, or --kv-policy full.")

    def _check_types(self) -> None:
        """Python callers can pass anything: a wrong type is named here, not as a TypeError deep inside."""
        for name in ("weight_gpu_percent", "weight_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                     "act_gpu_percent", "act_cpu_percent"):
            require_number(getattr(self, name), f"--percent (Policy.{name})")
        require_int(self.gpu_batch_size, "--gpu-batch-size (Policy.gpu_batch_size)", 1)
        require_int(self.num_gpu_batches, "--num-gpu-batches (Policy.num_gpu_batches)", 1)
        require_int(self.weight_buffers, "--weight-buffers (Policy.weight_buffers)", 0)
        for name in ("overlap", "pin_weight", "cpu_cache_compute", "sep_layer", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise EngineError(f"Policy.{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("compress_weight", "compress_cache"):
            if not isinstance(getattr(self, name), (Compression, type(None))):
                raise EngineError(f"Policy.{name} must be a Compression or None, got {getattr(self, name)!r}.")
        if not isinstance(self.kv, KVSettings):
            raise EngineError(f"Policy.kv must be a KVSettings, got {self.kv!r}.")

    def _pairs(self):
        return [("weights", self.weight_gpu_percent, self.weight_cpu_percent),
                ("KV cache", self.cache_gpu_percent, self.cache_cpu_percent),
                ("activations", self.act_gpu_percent, self.act_cpu_percent)]

    @property
    def batch_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def uses_disk(self) -> bool:
        return any(gpu + cpu < 100 for _, gpu, cpu in self._pairs())

    @property
    def percent(self) -> tuple[float, ...]:
        return tuple(x for _, g, c in self._pairs() for x in (g, c))


def _tier_of_midpoint(mid: float, gpu_percent: float, cpu_percent: float) -> Tier:
    if mid < gpu_percent:
        return Tier.GPU
    return Tier.CPU if mid < gpu_percent + cpu_percent else Tier.DISK


@dataclass(frozen=True)
class EvenSplit:
    """`assign_tiers` for `count` items of equal size, in O(1) per item and without a list:
    a plan with a million GPU batches is sized (and refused) without building a million entries."""

    count: int
    gpu_percent: float
    cpu_percent: float

    def tier(self, n: int) -> Tier:
        return _tier_of_midpoint(100.0 * (n + 0.5) / self.count, self.gpu_percent, self.cpu_percent)

    def counts(self) -> dict[Tier, int]:
        """Items per tier: item n is on the GPU iff (n + 0.5) / count < gpu%, and so on."""
        def mid(n: int) -> float:  # the same arithmetic as tier(), so the two always agree
            return 100.0 * (n + 0.5) / self.count

        def below(pct: float) -> int:  # items whose midpoint is < pct
            n = min(self.count, max(0, math.ceil(pct * self.count / 100.0 - 0.5)))
            while n > 0 and mid(n - 1) >= pct:
                n -= 1
            while n < self.count and mid(n) < pct:
                n += 1
            return n
        gpu, gpu_cpu = below(self.gpu_percent), below(self.gpu_percent + self.cpu_percent)
        return {Tier.GPU: gpu, Tier.CPU: gpu_cpu - gpu, Tier.DISK: self.count - gpu_cpu}


def assign_tiers(sizes: Sequence[int], gpu_percent: float, cpu_percent: float) -> list[Tier]:
    """Tier of each item (in layer order): the GPU's items first, the CPU's and disk's interleaved.

    An item is on the GPU when its byte midpoint falls in the first `gpu_percent` of the model's
    bytes: the resident layers stay together, which measured faster than spreading them evenly
    (experiments/results/h100_2026-11-25_spread: host memory bandwidth is shared by weight
    streaming and CPU attention, and running both at once slows both).
    The streamed items are split between the CPU and the disk by bytes, evenly along the layers:
    an item goes to disk while the disk is more than half the item behind its share of the bytes
    streamed so far. Every streamed layer then reads part of its weights from disk, so the disk
    relay works through the whole step beside the PCIe copies from the CPU, instead of idling
    through a CPU half and then holding up a disk half. The percentages hold for the whole
    model up to one item's size (FlexGen applies them within each layer).
    """
    total = sum(sizes) or 1
    streamed_percent = 100.0 - gpu_percent
    disk_share = max(0.0, streamed_percent - cpu_percent) / streamed_percent if streamed_percent > 0 else 0.0
    tiers, cum, streamed, on_disk = [], 0, 0, 0
    for size in sizes:
        if 100.0 * (cum + size / 2) / total < gpu_percent:
            tiers.append(Tier.GPU)
        else:
            streamed += size
            if disk_share * streamed - on_disk > size / 2:
                tiers.append(Tier.DISK)
                on_disk += size
            else:
                tiers.append(Tier.CPU)
        cum += size
    return tiers
