"""`run --dry-run`: the plan for the caps given (which may describe another machine), nothing
allocated, exit 0 when it fits and 2 when not; its numbers are what a real engine allocates.
And `--max-positions`, which the million-token plans use."""
from __future__ import annotations

import json

import pytest
import torch

from offload_engine.cli import main
from offload_engine.engine import Engine, EngineOptions
from offload_engine.errors import EngineError
from offload_engine.io.tiers import Tier
from offload_engine.model_zoo import MODEL_CONFIGS
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from conftest import save_checkpoint, tiny_hf_opt

GiB = 1 << 30
MIXED = ("30", "30", "34", "33", "50", "50")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tiny_hf_opt(seed=3), tmp_path_factory.mktemp("tiny"), "safetensors")


def test_dry_run_numbers_are_what_a_real_engine_allocates(tiny, tmp_path, capsys):
    out = tmp_path / "plan.json"
    offload = tmp_path / "offload"
    rc = main(["run", "--model", str(tiny), "--dummy", "--prompt-len", "16", "--gen-len", "4", "--percent", *MIXED,
               "--gpu-batch-size", "3", "--num-gpu-batches", "2", "--offload-dir", str(offload), "--dry-run",
               "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "fits: nothing was allocated" in printed and "gpu:" in printed
    assert not offload.exists()  # nothing allocated, no offload folder left
    planned = json.loads(out.read_text())["planned_parts_gib"]
    from offload_engine.checkpoints.hf import from_hf_config
    policy = Policy.from_percent([float(p) for p in MIXED], gpu_batch_size=3, num_gpu_batches=2)
    with Engine(from_hf_config(tiny), policy, Workload(16, 4), EngineOptions(offload_dir=offload, progress=False)) \
            as engine:
        allocated = engine.allocated_bytes()
    for tier in Tier:
        parts = planned[tier.value]
        persistent = (parts["weights"] + parts["kv_cache"] + parts["activations"] + parts["buffers"]
                      + parts["hot_cache"]) * GiB
        assert allocated[tier] == pytest.approx(persistent, rel=0.02, abs=8 << 20), tier


def test_dry_run_plans_for_another_machine_and_exits_2_when_it_does_not_fit(capsys):
    """Caps far beyond this machine are taken as given (a dry run describes the machine planned
    for); a plan over them prints, then exits 2 with the refusal."""
    common = ["run", "--model", "llama-3.1-8b", "--prompt-len", "128000", "--gen-len", "32", "--dtype", "float16",
              "--cpu-mem", "120GiB", "--dry-run"]
    assert main(common + ["--gpu-batch-size", "3", "--gpu-mem", "78GiB"]) == 0
    fits = capsys.readouterr()
    assert "fits" in fits.out and "KV cache" in fits.out
    assert main(common + ["--gpu-batch-size", "4", "--gpu-mem", "78GiB"]) == 2
    refused = capsys.readouterr()
    assert "plan for batch 4x1" in refused.out and "error: policy does not fit" in refused.err


def test_dry_run_sizes_hip_with_a_4bit_host_cache_and_its_hot_cache(capsys):
    args = ["run", "--model", "llama-3.1-8b", "--max-positions", "1048576", "--prompt-len", "1000000",
            "--gen-len", "16", "--percent", "100", "0", "0", "100", "0", "100", "--kv-policy", "hip", "--compress-cache",
            "--gpu-batch-size", "1", "--gpu-mem", "78GiB", "--cpu-mem", "120GiB", "--dtype", "float16", "--dry-run"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "HiP hot cache" in printed and "prefill chunk" in printed and "whole prompt" not in printed


def test_max_positions_stretches_rope_scaling_and_refuses_a_checkpoint(tiny, capsys):
    cfg = MODEL_CONFIGS["llama-3.1-8b"]
    long = cfg.with_max_positions(4 * cfg.max_positions)
    assert long.max_positions == 4 * cfg.max_positions
    assert long.rope_scaling.factor == pytest.approx(4 * cfg.rope_scaling.factor)
    assert long.rope_scaling.original_max_positions == cfg.rope_scaling.original_max_positions
    assert main(["run", "--model", str(tiny), "--max-positions", "4096", "--dry-run"]) == 2
    assert "--max-positions is for random weights" in capsys.readouterr().err
    with pytest.raises(EngineError, match="exceeds"):
        Engine(cfg, Policy(gpu_batch_size=1), Workload(cfg.max_positions, 4), EngineOptions(dry_run=True))
    Engine(long, Policy(gpu_batch_size=1), Workload(cfg.max_positions, 4),
           EngineOptions(dry_run=True, gpu_mem_bytes=1 << 50, cpu_mem_bytes=1 << 50, dtype=torch.float16))
