"""Each stage's CPU threads on the cores next to its GPU.

A stage's host work (CPU attention over its KV cache, copies into and out of pinned memory) reads
memory it allocated itself, and Linux places a page on the NUMA node of the thread that first
touches it. On a host with GPUs on two sockets, stages left to float over every core read part of
their cache across the socket link and crowd each other's cores. Binding a stage to its GPU's
node (the cores sysfs lists as local to the GPU's PCI device), shared evenly among the stages on
that node with hyperthread siblings kept together, keeps its cache, its pinned weights and its
DMA on one node. Where a GPU's cores are not known, the stages of unknown locality split the
allowed cores evenly. A process already confined to part of the machine (a launcher's binding,
numactl) keeps the cores it was given.
"""
from __future__ import annotations

from pathlib import Path

import torch

SYSFS_PCI = Path("/sys/bus/pci/devices")
SYSFS_CPU = Path("/sys/devices/system/cpu")


def parse_cpulist(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11} (the kernel's cpulist format)."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def compact_cpulist(cores: set[int]) -> str:
    """{0, 1, 2, 3, 8} -> '0-3,8': the inverse of parse_cpulist."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def gpu_local_cpus(index: int, sysfs: Path = SYSFS_PCI) -> set[int] | None:
    """The cores sysfs lists as local to CUDA device `index`, or None where that is not known."""
    props = torch.cuda.get_device_properties(index)
    fields = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if None in fields:
        return None
    return local_cpus("{:04x}:{:02x}:{:02x}.0".format(*fields), sysfs)


def local_cpus(pci_address: str, sysfs: Path = SYSFS_PCI) -> set[int] | None:
    """The cores local to a PCI device ('0000:1b:00.0'), or None without a readable entry."""
    try:
        return parse_cpulist((sysfs / pci_address / "local_cpulist").read_text()) or None
    except (OSError, ValueError):
        return None


def online_cpus(sysfs: Path = SYSFS_CPU) -> set[int]:
    """Every core the kernel runs (what a process not confined by anyone may use)."""
    try:
        return parse_cpulist((sysfs / "online").read_text())
    except (OSError, ValueError):
        import os
        return set(range(os.cpu_count() or 1))


def physical_core(cores: set[int], sysfs: Path = SYSFS_CPU) -> dict[int, int]:
    """Core -> the first of its hyperthread siblings (itself where sysfs does not say)."""
    out = {}
    for c in cores:
        try:
            out[c] = min(parse_cpulist((sysfs / f"cpu{c}" / "topology" / "thread_siblings_list").read_text()))
        except (OSError, ValueError):
            out[c] = c
    return out


def stage_cores(local_rank: int, allowed: set[int], local: list[set[int] | None], online: set[int] | None = None,
                physical: dict[int, int] | None = None) -> set[int]:
    """The cores of stage `local_rank` of this host: the allowed cores local to its GPU, in equal
    shares among the stages whose GPUs have the same local cores, siblings of one physical core in
    the same share. All allowed cores where its GPU's are unknown or none of them is allowed; the
    allowed cores untouched where the process is confined to part of the `online` ones."""
    if online is not None and allowed != online:
        return set(allowed)
    near = allowed & local[local_rank] if local[local_rank] else set()
    physical = physical or {}
    pool = sorted(near or allowed, key=lambda c: (physical.get(c, c), c))
    peers = [r for r in range(len(local)) if local[r] == local[local_rank]]
    if len(pool) < len(peers):
        return set(pool)  # fewer cores than stages: they share
    share, index = len(pool) // len(peers), peers.index(local_rank)
    return set(pool[index * share:(index + 1) * share])
