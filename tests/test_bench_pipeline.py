"""experiments/bench_pipeline.py: every run's first batch fits what it will be given, so no device
time goes to a run the plan refuses (each stage's GPU under the 16 GiB cap, the stages' host
memory under the host's)."""
from __future__ import annotations

import pytest

from experiments import bench_pipeline as bp

GiB = 1 << 30
HOST_GIB = {2: 240, 4: 480, 8: 530}  # hosts of 2 / 4 / 8 GPUs: 256 / 504 / 560 GiB, less headroom


def gpus(flags: list[str]) -> int:
    return int(flags[flags.index("--pipeline") + 1]) if "--pipeline" in flags else 1


@pytest.mark.parametrize("name", sorted(bp.RUNS))
def test_first_batch_fits_the_cap_and_the_host(name):
    flags, batches = bp.RUNS[name]
    stages = bp.stage_plans(flags, batches[0])
    assert len(stages) == gpus(flags)
    cap = 16 * GiB
    assert all(gpu <= cap for gpu, _ in stages), [round(gpu / GiB, 2) for gpu, _ in stages]
    host = sum(cpu for _, cpu in stages) / GiB
    smallest_host = 2 if name in bp.TWO_GPUS else max(4, gpus(flags))
    assert host <= HOST_GIB[smallest_host], host


def test_fallback_batches_shrink():
    for name, (_, batches) in bp.RUNS.items():
        sizes = [b * n for b, n in batches]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), name
