"""experiments/replay_cost_model.py: recorded runs re-predicted with the cost model as it is now."""
from __future__ import annotations

import json

import pytest

from experiments import replay_cost_model as replay
from offload_engine.cli import main
from offload_engine.model_zoo import MODEL_CONFIGS
from offload_engine.policies.cost_model import estimate
from offload_engine.policies.hardware import HardwareProfile
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

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


def test_the_searched_command_is_what_search_vs_flexgen_runs():
    """search_vs_flexgen runs the search's printed command line; `run` must parse it back to the
    very policy the search ranked."""
    from experiments.search_vs_flexgen import searched_flags
    from offload_engine.cli import build_parser
    from offload_engine.cli.options import policy_from_args
    from offload_engine.policies.search import SearchSpace, command_line, search

    model, work = MODEL_CONFIGS["opt-1.3b"], Workload(64, 8)
    hw = HardwareProfile(name="h100-like", gpu_mem_bytes=2 << 30, cpu_mem_bytes=16 << 30, disk_free_bytes=16 << 30)
    best = search(model, work, hw, SearchSpace(gpu_batch_sizes=(8, 16), num_gpu_batches=(1, 2)), top=1)[0]
    args = build_parser().parse_args(["run", *searched_flags(command_line("opt-1.3b", work, best))])
    assert policy_from_args(args) == best.policy
    with pytest.raises(ValueError, match="offload-engine run"):
        searched_flags("python -m something else")
