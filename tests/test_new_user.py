"""What a new user runs into: missing paths, checkpoints that do not match their config, files left
behind, absurd or non-finite numbers, units, and the small things around a run."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offload_engine.cli import main
from offload_engine.cli.options import memory_size
from offload_engine.engine import Engine, EngineOptions
from offload_engine.model_zoo import OPT_CONFIGS
from offload_engine.sampling import GenerationConfig
from offload_engine.io.tiers import reclaim_stale_folders
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from conftest import random_prompts, rel_err, save_checkpoint, transformers

ROOT = Path(__file__).resolve().parent.parent
TINY = OPT_CONFIGS["opt-125m"].__class__(name="tiny", family="opt", num_layers=2, hidden_size=32, num_heads=4,
                                         ffn_dim=64, vocab_size=100, max_positions=64)
DISK = Policy.from_percent([0, 0, 0, 0, 0, 0], gpu_batch_size=2)


def cli_error(capsys, *args) -> str:
    code = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flags,needle", [
    (["--gpu-mem", "nan"], "--gpu-mem"),
    (["--cpu-mem", "inf"], "--cpu-mem"),
    (["--gpu-mem", "-3"], "--gpu-mem"),
    (["--do-sample", "--temperature", "nan"], "--temperature"),
    (["--top-p", "inf"], "--top-p"),
    (["--percent", "nan", "0", "100", "0", "100", "0"], "--percent"),
    (["--percent", "100", "0", "100"], "takes 6 numbers"),
    (["--gen-len", "0"], "--gen-len"),
    (["--num-gpu-batches", "-1"], "--num-gpu-batches"),
])
def test_bad_numbers_are_one_line(capsys, tmp_path, flags, needle):
    line = cli_error(capsys, "run", "--quiet", "--offload-dir", str(tmp_path), *flags)
    assert needle in line


def test_huge_batch_count_is_refused_before_building_anything(capsys, tmp_path):
    t0 = time.perf_counter()
    line = cli_error(capsys, "run", "--quiet", "--num-gpu-batches", "10000000", "--offload-dir", str(tmp_path))
    assert time.perf_counter() - t0 < 5
    assert "does not fit" in line and "GiB" in line


@pytest.mark.parametrize("text,expected", [("16", 16 << 30), ("16GiB", 16 << 30), ("16GB", 16 * 10**9),
                                           ("512MiB", 512 << 20), ("1.5gib", 3 << 29), (" 2 TB ", 2 * 10**12)])
def test_memory_units(text, expected):
    assert memory_size(text) == expected


def test_gpu_mem_units_reach_the_plan(capsys, tmp_path):
    line = cli_error(capsys, "run", "--quiet", "--gpu-mem", "1MiB", "--offload-dir", str(tmp_path))
    assert "1.0 MiB are available" in line


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("offload-engine ")


def test_json_into_a_missing_folder_is_an_error(capsys, tmp_path):
    target = tmp_path / "no" / "such" / "r.json"
    line = cli_error(capsys, "run", "--quiet", "--json", str(target), "--offload-dir", str(tmp_path / "o"))
    assert "does not exist" in line
    assert not (tmp_path / "no").exists()


def test_progress_bar_counts_tokens(capsys, tmp_path):
    with Engine(TINY, Policy(gpu_batch_size=4), Workload(5, 6), EngineOptions(offload_dir=tmp_path)) as engine:
        engine.generate(*random_prompts(3, 5), GenerationConfig(max_new_tokens=6))
    assert "18/18" in capsys.readouterr().err  # 3 prompts x 6 tokens


def engine_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_engine_is_a_context_manager_and_cleans_up_when_collected(tmp_path):
    with Engine(TINY, DISK, Workload(5, 3), EngineOptions(offload_dir=tmp_path / "a", progress=False)):
        assert engine_files(tmp_path / "a")
    assert not engine_files(tmp_path / "a")
    engine = Engine(TINY, DISK, Workload(5, 3), EngineOptions(offload_dir=tmp_path / "b", progress=False))
    assert engine_files(tmp_path / "b")
    del engine  # an API user who never calls close()
    gc.collect()
    assert not engine_files(tmp_path / "b")


def test_stale_folders_of_dead_processes_are_reclaimed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"engine-{int(dead.stdout)}-x1"
    alive = tmp_path / f"engine-{os.getpid()}-x2"
    for folder in (stale, alive):
        folder.mkdir()
        (folder / "w.bin").write_bytes(b"0123")
    with Engine(TINY, DISK, Workload(5, 3), EngineOptions(offload_dir=tmp_path, progress=False)):
        assert not stale.exists() and alive.exists()
    assert reclaim_stale_folders(tmp_path) == []


def test_sigterm_removes_offload_files_and_writes_nothing(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "offload_engine", "run", "--quiet", "--percent", "0", "0", "0", "0", "0", "0",
           "--prompt-len", "64", "--gen-len", "1900", "--gpu-batch-size", "8", "--offload-dir", str(tmp_path / "o"),
           "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 60
        while not engine_files(tmp_path / "o") if (tmp_path / "o").exists() else True:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and not out.exists()
    assert not engine_files(tmp_path / "o")


@pytest.fixture(scope="module")
def untied_opt(tmp_path_factory):
    cfg = transformers.OPTConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    assert not torch.equal(model.lm_head.weight, model.model.decoder.embed_tokens.weight)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("untied"), "safetensors")


def test_untied_head_is_honored(untied_opt, tmp_path):
    from offload_engine.checkpoints.hf import from_hf_config

    model, folder = untied_opt
    ids, mask = random_prompts(2, 6)
    ids = ids % 60
    cfg = from_hf_config(folder)
    assert not cfg.tie_word_embeddings
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    with Engine(cfg, Policy(gpu_batch_size=2), Workload(6, 2), opts) as engine:
        result = engine.generate(ids, mask, GenerationConfig(max_new_tokens=1), collect_logits=True)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits[:, -1]
    assert rel_err(result.step_logits[0], ref) < 1e-5


def test_tensors_the_config_does_not_use_are_refused(capsys, tmp_path, untied_opt):
    _, folder = untied_opt
    copy = tmp_path / "fewer_layers"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # the files hold 2 layers
    (copy / "config.json").write_text(json.dumps(cfg))
    line = cli_error(capsys, "run", "--quiet", "--model", str(copy), "--prompt-len", "4", "--gen-len", "1",
                     "--offload-dir", str(tmp_path / "o"))
    assert "does not use" in line and "decoder.layers.1." in line


def test_disk_full_mid_run_is_one_line_and_leaves_no_files(capsys, tmp_path, monkeypatch):
    """The disk fills up while the KV cache is being written: one clear line, nothing left behind."""
    import errno
    import itertools

    import offload_engine.io.disk_relay as relay

    real_pwrite, counter = relay.os.pwrite, itertools.count(1)  # next() is atomic across workers

    def filling_up(fd, data, offset):
        if next(counter) > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(relay.os, "pwrite", filling_up)
    out = tmp_path / "r.json"
    line = cli_error(capsys, "run", "--quiet", "--percent", "100", "0", "0", "0", "100", "0", "--gen-len", "6",
                     "--offload-dir", str(tmp_path / "o"), "--json", str(out))
    assert "No space left on device" in line and "--offload-dir" in line
    assert not out.exists() and not engine_files(tmp_path / "o")


def test_the_position_limit_counts_the_tokens_the_model_sees(tmp_path):
    """The last generated token is never fed back: prompt + gen - 1 positions must fit."""
    from offload_engine.errors import EngineError

    small = OPT_CONFIGS["opt-125m"].__class__(name="small", family="opt", num_layers=1, hidden_size=32, num_heads=4,
                                              ffn_dim=64, vocab_size=100, max_positions=16)
    opts = EngineOptions(offload_dir=tmp_path, progress=False)
    with Engine(small, Policy(gpu_batch_size=1), Workload(10, 7), opts) as engine:  # positions 0..15
        assert engine.generate(*random_prompts(1, 10), GenerationConfig(max_new_tokens=7)).tokens.shape == (1, 7)
    with pytest.raises(EngineError, match="exceeds small's 16 positions"):
        Engine(small, Policy(gpu_batch_size=1), Workload(10, 8), opts)
