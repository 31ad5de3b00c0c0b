"""Each stage's CPU threads on the cores next to its GPU.

A stage's host work (CPU attention over its KV cache, copies into and out of pinned memory) reads
memory it allocated itself, and Linux places a page on the NUMA node of the thread that first
touches it. On a host with GPUs on two sockets, stages left to float over every core read part of
their cache across the socket link and crowd each other's cores. Binding a stage to its GPU's
node (the cores sysfs lists as local to the GPU's PCI device), shared evenly among the stages on
that node, keeps its cache, its pinned weights and its DMA on one node. Where the information is
missing (no sysfs entry, a CPU device), the stage keeps the cores it was given.
"""
from __future__ import annotations

from pathlib import Path

import torch

SYSFS_PCI = Path("/sys/bus/pci/devices")


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


def stage_cores(local_rank: int, allowed: set[int], local: list[set[int] | None]) -> set[int]:
    """The cores of stage `local_rank` of this host: the allowed cores local to its GPU, split in
    contiguous, equal shares among the stages whose GPUs share those cores (all allowed cores
    where its GPU's are unknown or none of them is allowed)."""
    def pool(rank: int) -> tuple[int, ...]:
        near = allowed & local[rank] if local[rank] else set()
        return tuple(sorted(near or allowed))

    mine = pool(local_rank)
    peers = [r for r in range(len(local)) if pool(r) == mine]
    if len(mine) < len(peers):
        return set(mine)  # fewer cores than stages: they share
    share, index = len(mine) // len(peers), peers.index(local_rank)
    return set(mine[index * share:(index + 1) * share])
