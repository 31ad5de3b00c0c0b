"""The memory plan's limits: caps against the device, host memory shared by the GPU and CPU tiers
without a GPU, absurd model configs, what `search` prints being what `run` accepts, the flags named
in refusals, and sweeps whose points all fail or whose model names are wrong."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from offload_engine.cli import main
from offload_engine.config import replace
from offload_engine.engine import Engine, EngineOptions, describe_gpu_tier
from offload_engine.errors import EngineError
from offload_engine.models import build_layers
from offload_engine.policies import Compression
from offload_engine.policies.hardware import HardwareProfile
from offload_engine.policies.memory import Workload, plan_memory
from offload_engine.policies.placement import Policy
from offload_engine.io.tiers import Tier
from offload_engine.sampling import GenerationConfig
from offload_engine.sweep import grid

from conftest import random_prompts
from test_new_user import TINY, cli_error

GiB = 1 << 30


def write_config(folder: Path, **changes) -> Path:
    """A small OPT config.json (no weights: run it with --dummy)."""
    raw = dict(model_type="opt", num_hidden_layers=4, hidden_size=256, num_attention_heads=4, ffn_dim=1024,
               vocab_size=1000, max_position_embeddings=64, word_embed_proj_dim=256)
    raw.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.fixture
def host_24gib(monkeypatch):
    """This machine as a 24 GiB host without a GPU (23 GiB available)."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=24 * GiB, available=23 * GiB))


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if a plan is accepted: these runs must be refused before anything is allocated."""
    plan = Engine._plan

    def refused_or_fail(self, opts):
        plan(self, opts)
        raise AssertionError("the plan was accepted")
    monkeypatch.setattr(Engine, "_plan", refused_or_fail)


# --- 1. caps, the shared host pool, the start-up line ------------------------------------------------

def test_opt_6_7b_over_host_memory_is_refused_before_allocating(capsys, tmp_path, host_24gib, no_allocation):
    t0 = time.perf_counter()
    line = cli_error(capsys, "run", "--quiet", "--model", "opt-6.7b", "--percent", "55", "45", "100", "0", "100", "0",
                     "--gpu-mem", "16GiB", "--offload-dir", str(tmp_path))
    assert time.perf_counter() - t0 < 5
    assert "does not fit" in line and "--gpu-mem" in line, line


def test_gpu_and_cpu_tiers_share_host_memory_without_a_gpu(capsys, tmp_path, host_24gib, no_allocation):
    # 5% of the weights on disk: each tier fits its own cap, their sum does not fit the host.
    line = cli_error(capsys, "run", "--quiet", "--model", "opt-6.7b", "--percent", "55", "40", "100", "0", "100", "0",
                     "--gpu-mem", "16GiB", "--offload-dir", str(tmp_path))
    assert "share host memory" in line and "short" in line and "--percent" in line, line


@pytest.mark.parametrize("flag", ["--gpu-mem", "--cpu-mem"])
def test_a_cap_above_the_machine_is_refused(capsys, tmp_path, host_24gib, no_allocation, flag):
    line = cli_error(capsys, "run", "--quiet", flag, "1TB", "--offload-dir", str(tmp_path))
    assert f"{flag} 931.32 GiB is more than the 24.00 GiB" in line and f"Lower {flag}" in line, line


def test_startup_line_names_the_gpu_tier(capsys, tmp_path, monkeypatch):
    assert main(["run", "--quiet", "--model", str(write_config(tmp_path / "m")), "--dummy", "--prompt-len", "4",
                 "--gen-len", "2", "--gpu-batch-size", "1", "--offload-dir", str(tmp_path / "o")]) == 0
    assert "GPU tier: the CPU (no GPU found; shares host memory with the CPU tier)" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_024_079_872))
    assert describe_gpu_tier(None) == "GPU tier: NVIDIA H100 80GB HBM3 (79.18 GiB)"
    assert describe_gpu_tier("cpu") == "GPU tier: the CPU (--device cpu; shares host memory with the CPU tier)"


# --- 2. absurd configs ----------------------------------------------------------------------------

def test_config_of_the_wrong_type_is_one_line_naming_the_field(capsys, tmp_path):
    folder = write_config(tmp_path / "m", **{"hidden_size": "sixty-four"})
    line = cli_error(capsys, "run", "--quiet", "--model", str(folder), "--dummy", "--offload-dir", str(tmp_path / "o"))
    assert "hidden_size" in line and "sixty-four" in line, line
    with pytest.raises(EngineError, match="num_layers must be a whole number"):
        Engine(replace(TINY, num_layers=2.5), Policy(), Workload(4, 2), EngineOptions(offload_dir=tmp_path))


def test_gguf_metadata_of_the_wrong_type_names_the_key(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from offload_engine.checkpoints.gguf import read_gguf_config

    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_string("llama.embedding_length", "sixty-four")
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EngineError, match="llama.embedding_length must be a whole number"):
        read_gguf_config(tmp_path / "bad.gguf")


def test_a_billion_layers_is_refused_by_the_plan_without_building_them(capsys, tmp_path, monkeypatch, cpu_profile):
    def small_only(cfg, sep_layer=True):
        assert cfg.num_layers <= 1000, f"built {cfg.num_layers} layers"
        return build_layers(cfg, sep_layer)
    monkeypatch.setattr("offload_engine.engine.build_layers", small_only)
    monkeypatch.setattr("offload_engine.models.build_layers", small_only, raising=False)
    folder = write_config(tmp_path / "m", num_hidden_layers=1_000_000_000)
    t0 = time.perf_counter()
    line = cli_error(capsys, "run", "--quiet", "--model", str(folder), "--dummy", "--offload-dir", str(tmp_path / "o"))
    assert time.perf_counter() - t0 < 5
    assert "does not fit" in line and "1000000000 layers" in line, line
    # The search too: no layer list per combination of knobs.
    monkeypatch.setattr("offload_engine.policies.search.build_layers", small_only)
    line = cli_error(capsys, "search", "--model", str(folder), "--dummy", "--hardware", str(cpu_profile))
    assert "no policy fits" in line and "alone need" in line, line


# --- 3. what search prints, run accepts -------------------------------------------------------------

@pytest.fixture
def cpu_profile(tmp_path) -> Path:
    """This machine as a profile without a GPU (rates are the defaults: only the memory matters here)."""
    path = tmp_path / "hw.json"
    HardwareProfile(name="cpu", cpu_mem_bytes=psutil.virtual_memory().available,
                    disk_free_bytes=psutil.disk_usage(str(tmp_path)).free, measured={"device": "cpu"}).save(path)
    return path


# The model's weights: 50 MiB in float32 (the CPU's dtype), 25 MiB in float16; the GPU tier's
# working memory takes 64 MiB: at these caps float32 weights must be split between the tiers.
CAPS = ["--gpu-mem", "100MiB", "--cpu-mem", "40MiB"]
WIDE = dict(hidden_size=512, ffn_dim=2048, word_embed_proj_dim=512)


class PlanAccepted(Exception):
    """Raised where the engine would start allocating: the run was not refused."""


@pytest.fixture
def plan_only(monkeypatch):
    """Stop a run once its plan is accepted (what these tests check), before it allocates and runs."""
    plan = Engine._plan

    def accepted(self, opts):
        raise PlanAccepted(plan(self, opts))
    monkeypatch.setattr(Engine, "_plan", accepted)


def test_the_command_search_prints_runs_as_printed(capsys, tmp_path, cpu_profile, monkeypatch, plan_only):
    model = write_config(tmp_path / "m", **WIDE)
    assert main(["search", "--model", str(model), "--dummy", "--prompt-len", "4", "--gen-len", "2",
                 "--hardware", str(cpu_profile), "--max-batch", "2", "--top", "1", "--json", str(tmp_path / "s.json"),
                 *CAPS]) == 0
    cmd = json.loads((tmp_path / "s.json").read_text())["policies"][0]["command"]
    assert "--gpu-mem 100MiB --cpu-mem 40MiB" in cmd and "--percent 100 0" not in cmd, cmd
    monkeypatch.chdir(tmp_path)  # the printed command's default offload folder lands here
    with pytest.raises(PlanAccepted) as accepted:
        main(shlex.split(cmd)[1:])
    plan = accepted.value.args[0]
    assert plan.tiers[Tier.GPU].total <= 100 << 20 and plan.tiers[Tier.CPU].total <= 40 << 20


def test_run_policy_auto_is_sized_at_the_dtype_it_runs(capsys, tmp_path, cpu_profile, monkeypatch, plan_only):
    from offload_engine.cli import run

    search_args = run._search_args
    monkeypatch.setattr(run, "_search_args", lambda args: argparse.Namespace(**{**vars(search_args(args)),
                                                                                "max_batch": 2}))
    with pytest.raises(PlanAccepted):
        main(["run", "--quiet", "--model", str(write_config(tmp_path / "m", **WIDE)), "--dummy", "--policy", "auto",
              "--hardware", str(cpu_profile), "--prompt-len", "4", "--gen-len", "2", *CAPS,
              "--offload-dir", str(tmp_path / "o")])
    assert "searched policy" in capsys.readouterr().err


# --- 4. the flag at fault -------------------------------------------------------------------------

def test_weight_buffers_is_named_when_its_slots_do_not_fit(capsys, tmp_path):
    line = cli_error(capsys, "run", "--quiet", "--weight-buffers", "99", "--percent", "0", "100", "100", "0", "100",
                     "0", "--gpu-mem", "1GiB", "--offload-dir", str(tmp_path))
    assert "lower --weight-buffers" in line and "99 staging slots" in line, line


def test_a_quant_group_longer_than_a_row_is_one_group_per_row(tmp_path):
    work, layers = Workload(8, 4), build_layers(TINY)  # rows of 32 and 64 values, heads of 8
    plans = [plan_memory(layers, Policy(compress_weight=Compression(4, g), compress_cache=Compression(4, g)), work,
                         torch.float32, TINY.hidden_size) for g in (10**6, 64)]
    assert plans[0].model_bytes == plans[1].model_bytes and plans[0].cache_bytes == plans[1].cache_bytes
    tokens = []
    for g in (10**6, 64):
        policy = Policy(gpu_batch_size=2, compress_weight=Compression(4, g), compress_cache=Compression(4, g))
        with Engine(TINY, policy, work, EngineOptions(offload_dir=tmp_path, progress=False)) as engine:
            ids = random_prompts(2, 8)[0] % TINY.vocab_size
            tokens.append(engine.generate(ids, None, GenerationConfig(max_new_tokens=4)).tokens)
    assert torch.equal(tokens[0], tokens[1])


def test_hip_dense_layers_beyond_the_model_is_refused(capsys, tmp_path):
    line = cli_error(capsys, "run", "--quiet", "--kv-policy", "hip", "--hip-dense-layers", "100",
                     "--offload-dir", str(tmp_path))
    assert "--hip-dense-layers 100" in line and "12 attention layers" in line, line


# --- 5. sweeps --------------------------------------------------------------------------------------

@pytest.fixture
def failing_points(monkeypatch):
    """Every point's process fails at once, the way a refused run does."""
    fail = "import sys; print('error: policy does not fit: the GPU tier needs 9 GiB.'); sys.exit(2)"
    monkeypatch.setattr(grid.Point, "command", lambda self, json_path: [sys.executable, "-c", fail])


def test_a_sweep_whose_points_all_fail_exits_non_zero(capsys, tmp_path, failing_points):
    out = tmp_path / "out"
    line = cli_error(capsys, "sweep", "--out", str(out), "--gpu-batch-size", "1", "2")
    assert "all 2 points run now failed (2 no_fit)" in line and str(out / "logs") in line, line
    assert len(list((out / "logs").glob("*.log"))) == 2


def test_a_wrong_model_name_in_a_grid_stops_the_sweep_before_it_starts(capsys, tmp_path, failing_points):
    out = tmp_path / "out"
    line = cli_error(capsys, "sweep", "--out", str(out), "--model", "opt-125m", "opt-13x")
    assert "opt-13x" in line and "opt-125m, opt-350m" in line, line
    assert not out.exists()
