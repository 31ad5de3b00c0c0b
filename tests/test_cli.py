"""The command line: the default job, checkpoints, --help, and bad input (one clear line on stderr,
exit status 2, no traceback, no result file)."""
from __future__ import annotations

import json

import pytest

from offload_engine.cli import main

from conftest import save_checkpoint, tiny_hf_opt


def run_cli(capsys, tmp_path, *args):
    out = tmp_path / "result.json"
    code = main(["run", "--quiet", "--prompt-len", "8", "--gen-len", "2", "--json", str(out),
                 "--offload-dir", str(tmp_path / "offload"), *args])
    err = capsys.readouterr().err
    return code, err, out


def assert_clean_error(code, err, out, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_hf_opt(seed=5), tmp_path_factory.mktemp("ckpt")


def copy_checkpoint(checkpoint, tmp_path, fmt):
    model, _ = checkpoint
    return save_checkpoint(model, tmp_path / fmt, fmt)


def test_percent_over_100(capsys, tmp_path):
    assert_clean_error(*run_cli(capsys, tmp_path, "--percent", "60", "50", "100", "0", "100", "0"),
                       "weights", "at most 100")


def test_negative_percent(capsys, tmp_path):
    assert_clean_error(*run_cli(capsys, tmp_path, "--percent", "100", "0", "-5", "0", "100", "0"), "KV cache")


def test_unknown_model(capsys, tmp_path):
    assert_clean_error(*run_cli(capsys, tmp_path, "--model", "opt-7b"), "unknown model 'opt-7b'", "opt-6.7b")


def test_missing_shard(capsys, tmp_path, checkpoint):
    folder = copy_checkpoint(checkpoint, tmp_path, "safetensors-sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_clean_error(*run_cli(capsys, tmp_path, "--model", str(folder)), shard.name, "missing")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(capsys, tmp_path, checkpoint, fmt):
    folder = copy_checkpoint(checkpoint, tmp_path, fmt)
    weights = next(folder.glob("*.safetensors" if fmt == "safetensors" else "*.bin"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_clean_error(*run_cli(capsys, tmp_path, "--model", str(folder)), weights.name, "truncated or corrupt")


def test_config_weight_shape_mismatch(capsys, tmp_path, checkpoint):
    folder = copy_checkpoint(checkpoint, tmp_path, "safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["ffn_dim"] = 80
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(*run_cli(capsys, tmp_path, "--model", str(folder)), "fc1.weight", "shape", "config.json")


def test_no_weights_in_folder(capsys, tmp_path, checkpoint):
    folder = copy_checkpoint(checkpoint, tmp_path, "safetensors")
    (folder / "model.safetensors").unlink()
    assert_clean_error(*run_cli(capsys, tmp_path, "--model", str(folder)), "no weights", "--dummy")


def test_unwritable_offload_dir(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "result.json"
    code = main(["run", "--quiet", "--prompt-len", "8", "--gen-len", "2", "--json", str(out),
                 "--percent", "0", "0", "100", "0", "100", "0", "--offload-dir", str(blocker / "offload")])
    assert_clean_error(code, capsys.readouterr().err, out, "offload directory", "--offload-dir")


def test_policy_too_large_for_gpu_cap(capsys, tmp_path):
    code, err, out = run_cli(capsys, tmp_path, "--gpu-mem", "0.1")
    assert_clean_error(code, err, out, "GPU tier needs", "102.4 MiB are available", "--gpu-mem", "short", "To fix")


def test_policy_too_large_for_cpu_cap(capsys, tmp_path):
    code, err, out = run_cli(capsys, tmp_path, "--percent", "0", "100", "100", "0", "100", "0", "--cpu-mem", "0.05")
    assert_clean_error(code, err, out, "CPU tier needs", "--cpu-mem")


def test_interrupted_run_writes_nothing(capsys, tmp_path, monkeypatch):
    import offload_engine.engine as engine_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module.Engine, "generate", interrupt)
    code, err, out = run_cli(capsys, tmp_path)
    assert code == 130 and "interrupted" in err and not out.exists()
    assert not list(tmp_path.glob(".result.json*"))


def test_default_command_and_json(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "--quiet", "--gen-len", "3", "--json", str(out), "--offload-dir", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "total throughput:" in printed and "prefill latency:" in printed
    data = json.loads(out.read_text())
    m = data["metrics"]
    assert m["total_throughput"] == pytest.approx(m["batch_size"] * m["gen_len"] / (m["prefill_s"] + m["decode_s"]))
    assert data["model"] == "opt-125m" and data["policy"]["gpu_batch_size"] == 4 and data["commit"]
    assert {"hardware", "workload", "peak_memory", "planned_gib"} <= set(data)
    startup = data["startup_s"]  # the engine's construction, of which pinning host memory (none without a GPU)
    assert startup["total"] > 0 and 0 <= startup["pinning"] <= startup["total"]


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--percent", "rest of each goes to disk", "--num-gpu-batches", "--cpu-cache-compute", "examples:"):
        assert phrase in text


@pytest.mark.parametrize("dummy", [False, True])
def test_run_from_checkpoint_folder(capsys, tmp_path, checkpoint, dummy):
    folder = copy_checkpoint(checkpoint, tmp_path, "safetensors")
    out = tmp_path / "r.json"
    args = ["run", "--quiet", "--model", str(folder), "--prompt-len", "8", "--gen-len", "3", "--json", str(out)]
    assert main(args + (["--dummy"] if dummy else [])) == 0
    data = json.loads(out.read_text())
    assert data["weights"] == ("dummy weights" if dummy else f"checkpoint {folder}")
    assert data["model"] == folder.name and data["metrics"]["gen_len"] == 3


def test_unwritable_json_path(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "result.json"
    code = main(["run", "--quiet", "--gen-len", "2", "--json", str(out), "--offload-dir", str(tmp_path / "o")])
    assert_clean_error(code, capsys.readouterr().err, out, "cannot write results", "--json")


def test_unknown_device(capsys, tmp_path):
    assert_clean_error(*run_cli(capsys, tmp_path, "--device", "tpu7"), "device", "cpu, cuda")


def test_offload_files_removed_when_construction_fails(capsys, tmp_path, checkpoint):
    folder = copy_checkpoint(checkpoint, tmp_path, "safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["ffn_dim"] = 80
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(*run_cli(capsys, tmp_path, "--model", str(folder), "--percent", "0", "0", "0", "0", "0", "0"),
                       "shape")
    assert not [p for p in (tmp_path / "offload").rglob("*") if p.is_file()]


def test_cut_gen_len_extrapolates_and_is_recorded(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["run", "--quiet", "--gen-len", "6", "--cut-gen-len", "3", "--json", str(out),
                 "--offload-dir", str(tmp_path / "o")]) == 0
    data = json.loads(out.read_text())
    m = data["metrics"]
    assert data["cut_gen_len"] == 3 and m["gen_len"] == 6  # throughput counts the extrapolated tokens
    assert m["total_throughput"] == pytest.approx(m["batch_size"] * 6 / (m["prefill_s"] + m["decode_s"]))
    capsys.readouterr()
    code = main(["run", "--quiet", "--gen-len", "4", "--cut-gen-len", "9", "--json", str(out)])
    assert code == 2 and "--cut-gen-len 9" in capsys.readouterr().err


def test_disk_relay_flags_reach_the_engine_and_the_json(capsys, tmp_path):
    code, err, out = run_cli(capsys, tmp_path, "--percent", "0", "50", "0", "50", "100", "0",
                             "--disk-threads", "3", "--disk-chunk-mib", "1", "--direct-io")
    assert code == 0, err
    data = json.loads(out.read_text())
    relay, on_disk = data["disk_relay"], int(data["planned_gib"]["disk"] * (1 << 30))
    assert relay["threads"] == 3 and relay["direct"] is True
    # the ring is fitted to the few bytes on disk: at most the asked 4 chunks a thread, 12 MiB
    assert relay["ring_bytes"] <= min(12 << 20, -(-on_disk // 4096) * 4096) and relay["chunk_bytes"] <= 1 << 20
    code, err, out = run_cli(capsys, tmp_path)  # nothing on disk: no relay
    assert code == 0 and json.loads(out.read_text())["disk_relay"] is None
    out.unlink()
    code, err, out = run_cli(capsys, tmp_path, "--disk-threads", "0")
    assert_clean_error(code, err, out, "--disk-threads")


def test_disk_flag_defaults_are_the_engines():
    from offload_engine.cli import build_parser
    from offload_engine.cli.options import disk_relay_settings
    from offload_engine.io.disk_relay import DiskRelaySettings

    args = build_parser().parse_args(["run"])
    assert disk_relay_settings(args) == DiskRelaySettings()
