"""`offload-engine search` and `run --policy auto` on this machine's own profile."""
from __future__ import annotations

import json
import time

import pytest
import torch

from offload_engine.cli import main
from offload_engine.engine import Engine, EngineOptions
from offload_engine.hardware_probe import profile_machine, sizes_for
from offload_engine.model_zoo import MODEL_CONFIGS
from offload_engine.sampling import GenerationConfig
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy
from offload_engine.policies.search import SearchSpace, search

from conftest import random_prompts

SMALL = MODEL_CONFIGS["opt-125m"].__class__(name="small", family="opt", num_layers=4, hidden_size=128, num_heads=4,
                                            ffn_dim=512, vocab_size=96, max_positions=64)


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hw")
    hw = profile_machine(torch.device("cpu"), folder / "offload", sizes_for(False, quick=True), log=lambda *_: None)
    path = folder / "hw.json"
    hw.save(path)
    return hw, path


def test_search_command_prints_and_writes_runnable_policies(capsys, tmp_path, profile):
    _, path = profile
    out = tmp_path / "search.json"
    assert main(["search", "--model", "opt-125m", "--prompt-len", "32", "--gen-len", "8", "--hardware", str(path),
                 "--top", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["policies"]) == 3 and all(p["predicted_throughput"] > 0 for p in data["policies"])
    assert data["policies"][0]["command"] in printed


def test_run_policy_auto_records_its_prediction(capsys, tmp_path, profile):
    _, path = profile
    out = tmp_path / "auto.json"
    assert main(["run", "--quiet", "--policy", "auto", "--hardware", str(path), "--prompt-len", "16",
                 "--gen-len", "4", "--json", str(out), "--offload-dir", str(tmp_path / "o")]) == 0
    data = json.loads(out.read_text())
    assert data["predicted"]["total_throughput"] > 0 and data["metrics"]["total_throughput"] > 0
    assert "searched policy" in capsys.readouterr().err


def measured_throughput(policy: Policy, work: Workload, tmp_path) -> float:
    opts = EngineOptions(offload_dir=tmp_path, progress=False, device="cpu")
    with Engine(SMALL, policy, work, opts) as engine:
        ids = random_prompts(policy.batch_size, work.prompt_len)[0]
        engine.generate(ids, None, GenerationConfig(max_new_tokens=2))  # warm-up, as `run` does
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            engine.generate(ids, None, GenerationConfig(max_new_tokens=work.gen_len))
            best = max(best, policy.batch_size * work.gen_len / (time.perf_counter() - t0))
    return best


def test_the_searched_policy_is_among_the_best_of_a_measured_grid(tmp_path, profile):
    hw, work = profile[0].tiers_as_the_engine_sees_them(), Workload(16, 8)
    space = SearchSpace(gpu_batch_sizes=(1, 4, 16, 48), num_gpu_batches=(1, 2), cpu_attention=(False,))
    chosen = search(SMALL, work, hw, space, top=1, dtype=torch.float32)[0].policy
    grid = [Policy(gpu_batch_size=b, num_gpu_batches=k) for b in (1, 4, 16, 48) for k in (1, 2)]
    measured = {(p.gpu_batch_size, p.num_gpu_batches): measured_throughput(p, work, tmp_path) for p in grid}
    ranking = sorted(measured, key=measured.get, reverse=True)
    assert ranking.index((chosen.gpu_batch_size, chosen.num_gpu_batches)) < 3, (chosen, measured)
