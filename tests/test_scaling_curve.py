"""experiments/scaling_curve.py on canned bench_pipeline.py folders: points per call, the best
variant per GPU count, speed-up and efficiency against the same call's one-GPU point only."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import scaling_curve as sc

ROOT = Path(__file__).resolve().parent.parent


def record(name: str, model: str, gpus: int, tput: float | None, status: str = "ok", seqs: int = 48) -> dict:
    command = ["python3", "-m", "offload_engine", "run", "--model", model, "--percent", "20", "80", "0", "100", "0",
               "100"] + (["--pipeline", str(gpus)] if gpus > 1 else [])
    return {"name": name, "status": status, "command": command,
            "metrics": {"total_throughput": tput, "batch_size": seqs} if tput else {},
            "pipeline": {"stages": gpus, "micro_batches": gpus} if gpus > 1 else {}}


def write_call(folder: Path, records: list[dict], gpu: str = "NVIDIA H200") -> Path:
    folder.mkdir(parents=True)
    (folder / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut short')
    (folder / "summary.json").write_text(json.dumps({"hardware": {"gpu": gpu}, "runs": records}))
    return folder


def test_points_speedup_and_best_variant(tmp_path):
    rng = random.Random(3)
    one, two, two_4mb, four = (rng.uniform(10, 40) for _ in range(4))
    call = write_call(tmp_path / "a", [
        record("opt30b-1gpu", "opt-30b", 1, one),
        record("opt30b-2gpu", "opt-30b", 2, min(two, two_4mb)),
        record("opt30b-2gpu-4mb", "opt-30b", 2, max(two, two_4mb), seqs=192),
        record("opt30b-4gpu", "opt-30b", 4, four),
        record("opt30b-4gpu-any-core", "opt-30b", 4, None, status="timeout"),
        record("opt66b-4gpu", "opt-66b", 4, 7.5),  # no one-GPU point in this call
        record("flexgen-opt30b-2gpu", "facebook/opt-30b", 1, 99.0),  # FlexGen's: not on this curve
    ])
    points = {(p.model, p.gpus): p for p in sc.read_call(call)}
    assert set(points) == {("opt-30b", 1), ("opt-30b", 2), ("opt-30b", 4), ("opt-66b", 4)}
    p2 = points[("opt-30b", 2)]
    assert p2.run == "opt30b-2gpu-4mb" and p2.token_s == max(two, two_4mb) and p2.sequences == 192
    assert p2.speedup == pytest.approx(max(two, two_4mb) / one) and p2.efficiency == pytest.approx(p2.speedup / 2)
    assert points[("opt-30b", 4)].efficiency == pytest.approx(four / one / 4)
    assert points[("opt-66b", 4)].speedup is None and points[("opt-66b", 4)].efficiency is None
    assert points[("opt-30b", 1)].percent == "20 80 0 100 0 100" and points[("opt-30b", 1)].card == "NVIDIA H200"


def test_cli_writes_json_csv_md_png(tmp_path):
    a = write_call(tmp_path / "a", [record("opt66b-1gpu", "opt-66b", 1, 13.8), record("opt66b-4gpu", "opt-66b", 4, 51.2)])
    b = write_call(tmp_path / "b", [record("opt66b-1gpu", "opt-66b", 1, 20.0), record("opt66b-2gpu", "opt-66b", 2, 30.0)],
                   gpu="NVIDIA H100 80GB HBM3")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "experiments/scaling_curve.py", "--runs", str(a), str(b), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "scaling.json").read_text())["points"]
    by = {(r["call"], r["gpus"]): r for r in rows}
    assert by[(str(a), 4)]["speedup"] == pytest.approx(51.2 / 13.8)  # against its own call's one GPU,
    assert by[(str(b), 2)]["speedup"] == pytest.approx(1.5)  # not the other call's
    with open(out / "scaling.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| 3.71 |" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").stat().st_size > 0
    assert not list(out.glob(".*"))  # no temporary left behind


def test_folder_without_runs_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "experiments/scaling_curve.py", "--runs", str(tmp_path), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "has no runs.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
