"""`offload-engine profile` and the measurements behind it (offload_engine/hardware_probe.py): the
JSON it writes loads as a HardwareProfile, every measured number is positive and finite, the GPU
fields of a CPU-only machine are marked as not measured, the per-layer overhead comes from a real
engine step, the disk read is checked for coldness, and bad input is one line with nothing written."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import statistics
from dataclasses import fields

import pytest
import torch

from offload_engine.cli import main
from offload_engine.cli.profile import FIELDS
from offload_engine.config import ModelConfig
from offload_engine.hardware_probe import GPU_ONLY, cached_fraction
from offload_engine.step_probe import eager_layer_overhead
from offload_engine.models import build_layers
from offload_engine.policies.hardware import HardwareProfile

NO_GPU = not torch.cuda.is_available()
RATE_UNITS = ("_GB_s", "_TFLOP_s", "_ms", "_us")  # raw measurements in `measured`, by their unit suffix


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One quick profile for the whole module: (exit code, stdout, stderr, out path, offload dir)."""
    folder = tmp_path_factory.mktemp("profile")
    out, offload = folder / "hw.json", folder / "offload"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["profile", "--out", str(out), "--offload-dir", str(offload), "--quick"])
    return code, stdout.getvalue(), stderr.getvalue(), out, offload


def run_error(capsys, *args):
    code = main(["profile", *args])
    return code, capsys.readouterr().err


def assert_one_error_line(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_profile_writes_a_loadable_json(profiled):
    code, stdout, _, out, offload = profiled
    assert code == 0
    raw = json.loads(out.read_text())
    assert set(raw) == {f.name for f in fields(HardwareProfile)}
    profile = HardwareProfile.load(out)
    assert profile.measured == raw["measured"]
    assert profile.name.endswith(f"{profile.measured['cpu_cores']} cores")
    for name, *_ in FIELDS:  # the printed table names every field
        assert name in stdout
    assert not offload.exists(), "the disk test file, or the folder made for it, was left behind"


def test_every_measured_number_is_positive_and_finite(profiled):
    profile = HardwareProfile.load(profiled[3])
    skipped = profile.measured["not_measured"]
    measured = [f for f, *_ in FIELDS if f not in skipped]
    assert {"cpu_mem_bytes", "disk_free_bytes", "disk_read_bytes_s", "disk_write_bytes_s", "gpu_flops",
            "cpu_attention_bytes_s", "cpu_packed_attention_bytes_s", "cpu_mem_bytes_s",
            "layer_overhead_s"} <= set(measured)
    for name in measured:
        value = getattr(profile, name)
        floor_ok = value >= 0 if name == "cpu_attention_call_s" else value > 0  # a difference of two steps
        assert math.isfinite(value) and floor_ok, (name, value)
    raw = {k: v for k, v in profile.measured.items() if k.endswith(RATE_UNITS)}
    assert len(raw) >= 7, raw
    for key, value in raw.items():
        floor_ok = value >= 0 if key == "cpu_attention_call_us" else value > 0  # cpu_attention_call_s's raw value
        assert math.isfinite(value) and floor_ok, (key, value)
    # the derived fields are the raw numbers in bytes / FLOP per second
    assert profile.cpu_mem_bytes_s == pytest.approx(profile.measured["cpu_read_GB_s"] * 1e9)
    assert profile.layer_overhead_s == pytest.approx(profile.measured["layer_overhead_us"] * 1e-6)
    assert profile.cpu_packed_attention_bytes_s == pytest.approx(
        profile.measured["cpu_packed_decode_attention_fp16_GB_s"] * 1e9)


@pytest.mark.skipif(not NO_GPU, reason="a CPU-only machine's profile")
def test_cpu_only_machine_marks_the_gpu_fields_not_measured(profiled):
    _, stdout, _, out, _ = profiled
    profile, defaults = HardwareProfile.load(out), HardwareProfile()
    assert set(profile.measured["not_measured"]) == set(GPU_ONLY)
    for name in GPU_ONLY:
        assert getattr(profile, name) == getattr(defaults, name), name
        assert f"{name:<22} not measured" in stdout
    assert profile.gpu_mem_bytes == 0 and profile.name.startswith("cpu,")
    assert "cpu_matmul_fp32_TFLOP_s" in profile.measured and "float32" in profile.measured["notes"]["gpu_flops"]


def test_disk_read_coldness_is_checked(profiled, tmp_path):
    m = HardwareProfile.load(profiled[3]).measured
    fraction = m["disk_read_cached_fraction"]
    assert m["disk_read_cold"] == (None if fraction is None else fraction < 0.05)
    if not m["disk_read_cold"]:
        assert "disk_read_bytes_s" in m["notes"]
    # mincore sees pages that were just read as cached: the check can tell cold from warm
    path = tmp_path / "warm.bin"
    path.write_bytes(os.urandom(1 << 20))
    path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        warm = cached_fraction(fd, 1 << 20)
    finally:
        os.close(fd)
    assert warm is None or warm > 0.9


def test_cpu_attention_call_overhead_compares_two_real_engine_steps(tmp_path):
    """The same tiny engine with its cache attended on the CPU, against the step already measured
    with the cache on the device: the difference spread over its (attention layer, GPU batch) items."""
    from offload_engine.step_probe import cpu_attention_call_overhead

    on_device = {"step_s": 0.0}  # a free device step: every second of the CPU-cache step counts
    calls = cpu_attention_call_overhead(torch.device("cpu"), tmp_path, steps=4, reps=2, on_device=on_device)
    assert calls["step_s"] > 0 and calls["per_call_s"] == pytest.approx(calls["step_s"] / 2)  # 2 attention layers
    slower = cpu_attention_call_overhead(torch.device("cpu"), tmp_path, steps=4, reps=2,
                                         on_device={"step_s": 10.0})
    assert slower["per_call_s"] == 0  # never negative


def test_layer_overhead_comes_from_a_real_engine_step(tmp_path, monkeypatch):
    from offload_engine.engine import Engine

    calls, generate = [], Engine.generate

    def spy(self, *args, **kw):
        result = generate(self, *args, **kw)
        calls.append((len(self.layers), result.decode_s))
        return result
    monkeypatch.setattr(Engine, "generate", spy)
    step = eager_layer_overhead(torch.device("cpu"), tmp_path, steps=4, reps=2)
    assert len(calls) == 3  # one untimed, two timed
    tiny = ModelConfig(name="t", family="opt", num_layers=2, hidden_size=64, num_heads=4, ffn_dim=256)
    assert step["layers"] == calls[0][0] == len(build_layers(tiny, True))  # embedding, 2 x (attention, MLP), head
    assert step["step_s"] == pytest.approx(statistics.median(d / 3 for _, d in calls[1:]))  # 3 decode steps
    assert 0 < step["per_layer_s"] < 1
    assert step["per_layer_s"] == pytest.approx(step["step_s"] / step["layers"])


def test_out_into_a_missing_folder_is_one_line_and_writes_nothing(capsys, tmp_path):
    out, offload = tmp_path / "missing" / "hw.json", tmp_path / "offload"
    code, err = run_error(capsys, "--out", str(out), "--offload-dir", str(offload), "--quick")
    assert_one_error_line(code, err, "does not exist", str(out.parent))
    assert not out.exists() and not out.parent.exists()
    assert not offload.exists(), "the offload dir was touched before --out was checked"
    assert "measuring" not in err


@pytest.mark.parametrize("args,needles", [(["--disk-mib", "0"], ["--disk-mib", "at least 1"]),
                                          (["--device", "tpu"], ["--device", "tpu"])])
def test_bad_flags_are_one_line(capsys, tmp_path, args, needles):
    out = tmp_path / "hw.json"
    code, err = run_error(capsys, "--out", str(out), *args)
    assert_one_error_line(code, err, *needles)
    assert not out.exists()


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    out = tmp_path / "hw.json"
    code, err = run_error(capsys, "--out", str(out), "--device", "cuda", "--offload-dir", str(tmp_path / "o"))
    assert_one_error_line(code, err, "--device cuda", "no CUDA GPU")
    assert not out.exists()


def test_help_says_what_each_number_is_for(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name, unit, _, why in FIELDS:
        assert name in text and why.split(":")[0] in text, name
