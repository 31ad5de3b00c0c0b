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


def test_copy_to_holds_three_files_however_many_runs(tmp_path, monkeypatch):
    """What a lent machine sends back is a few files: the ledger, the summary and one tarball of
    every run's log, rewritten after each run so a call cut short keeps what ran."""
    import json
    import sys
    import tarfile

    def fake_run(name, out, commit, timeout_s, quiet=True):
        (out / f"{name}.log").write_text(f"{name} ran\n")
        return {"name": name, "commit": commit, "status": "ok", "metrics": {"total_throughput": 1.0}}

    monkeypatch.setattr(bp, "run_one", fake_run)
    runs = ["opt30b-1gpu", "opt30b-2gpu", "opt66b-2gpu"]
    copy = tmp_path / "copy"
    monkeypatch.setattr(sys, "argv", ["bench_pipeline.py", "--out", str(tmp_path / "out"), "--commit", "abc",
                                      "--copy-to", str(copy), "--runs", *runs])
    assert bp.main() == 0
    assert sorted(p.name for p in copy.iterdir()) == ["logs.tar.gz", "runs.jsonl", "summary.json"]
    with tarfile.open(copy / "logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(f"{r}.log" for r in runs)
    assert [json.loads(line)["name"] for line in (copy / "runs.jsonl").read_text().splitlines()] == runs
