"""experiments/replay_cost_model.py: recorded runs re-predicted with the cost model as it is now."""
from __future__ import annotations

import json

import pytest

from experiments import replay_cost_model as replay
from offload_engine.cli import main
from offload_engine.model_zoo import MODEL_CONFIGS
from policies.cost_model import estimate
from policies.hardware import HardwareProfile
from policies.memory import Workload
from policies.placement import Policy

HW = HardwareProfile(name="cpu, 2 cores", cpu_mem_bytes=8 << 30, disk_free_bytes=8 << 30, measured={"device": "cpu"})


def test_a_recorded_run_is_predicted_from_its_own_command(tmp_path, capsys):
    out = tmp_path / "run.json"
    argv = ["--model", "opt-125m", "--dummy", "--prompt-len", "8", "--gen-len", "3", "--percent", "60", "40", "100",
            "0", "100", "0", "--gpu-batch-size", "2", "--num-gpu-batches", "2", "--device", "cpu", "--quiet",
            "--offload-dir", str(tmp_path / "o"), "--json", str(out)]
    assert main(["run", *argv]) == 0
    measured = json.loads(out.read_text())["metrics"]["total_throughput"]
    ledger = tmp_path / "sweep.jsonl"  # the same run as a sweep records it, beside a failed point
    ledger.write_text(json.dumps({"status": "ok", "result": json.loads(out.read_text())}) + "\n"
                      + json.dumps({"status": "no_fit", "result": None}) + "\n")
    runs = replay.measured_runs(out) + replay.measured_runs(ledger)
    assert [m for _, m in runs] == [measured, measured]
    row = replay.replay(runs[0][0], HW)
    policy = Policy.from_percent((60, 40, 100, 0, 100, 0), gpu_batch_size=2, num_gpu_batches=2)
    expected = estimate(MODEL_CONFIGS["opt-125m"], policy, Workload(8, 3), HW).throughput
    assert row["predicted_token_s"] == pytest.approx(expected, rel=1e-12)
    assert row["percent"] == "60 40 100 0 100 0" and row["batch"] == "2x2"
