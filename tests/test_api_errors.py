"""What a new user of the Python API and of `generate` runs into: a closed engine, limits and types
that were not checked, H2O's budget on short prompts and flags that do not apply, text files that
are not UTF-8, what `generate --json` records, and the terminal output around progress bars."""
from __future__ import annotations

import contextlib
import io
import json
import string
from pathlib import Path

import pytest

from offload_engine.checkpoints.tokenizer import Tokenizer
from offload_engine.cli import main
from offload_engine.engine import Engine, EngineOptions
from offload_engine.errors import EngineError
from offload_engine.policies import H2OConfig, KVSettings
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy
from offload_engine.sampling import GenerationConfig

from conftest import VOCAB, random_prompts, save_checkpoint, tiny_hf_opt
from test_new_user import DISK, TINY, cli_error


def char_tokenizer():
    """One token per character, VOCAB ids in all (the tiny models' vocabulary), eos = 2."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    chars = (" " + string.ascii_letters + string.digits + string.punctuation)[:VOCAB - 3]
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   bos_token="</s>")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """A tiny OPT checkpoint folder with a tokenizer: `generate --model FOLDER` runs in a second."""
    folder = save_checkpoint(tiny_hf_opt(), tmp_path_factory.mktemp("text_opt"), "safetensors")
    char_tokenizer().save_pretrained(folder)
    return folder


def tiny_engine(tmp_path, policy=Policy(gpu_batch_size=2), work=Workload(5, 4)) -> Engine:
    engine = Engine(TINY, policy, work, EngineOptions(offload_dir=tmp_path, progress=False))
    engine.tokenizer = Tokenizer(char_tokenizer())
    return engine


def generate_cli(folder: Path, tmp_path: Path, *flags: str) -> int:
    return main(["generate", "--model", str(folder), "--dtype", "float32", "--offload-dir", str(tmp_path / "o"),
                 *flags])


# --- the Python API -----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", [Policy(gpu_batch_size=2), DISK], ids=["gpu", "disk"])
def test_a_closed_engine_refuses_to_generate(tmp_path, policy):
    engine = tiny_engine(tmp_path, policy)
    engine.close()
    with pytest.raises(EngineError, match="this engine is closed"):
        engine.generate(*random_prompts(2, 5))
    with pytest.raises(EngineError, match="this engine is closed"):
        engine.generate(["abc"])


def test_more_new_tokens_than_planned_are_refused_naming_the_limit(tmp_path):
    with tiny_engine(tmp_path) as engine:
        for call in (lambda cfg: engine.generate(*random_prompts(2, 5), cfg), lambda cfg: engine.generate(["ab"], cfg)):
            with pytest.raises(EngineError) as refused:
                call(GenerationConfig(max_new_tokens=50))
            message = str(refused.value)
            assert "planned for 4 new tokens" in message and "gen_len" in message and "max_new_tokens" in message
        # A config given after the prompts is honoured, text or token ids.
        assert [len(ids) for ids in engine.generate(["ab"], GenerationConfig(max_new_tokens=2)).token_ids] == [2]
        assert engine.generate(*random_prompts(2, 5), GenerationConfig(max_new_tokens=3)).tokens.shape == (2, 3)


@pytest.mark.parametrize("make,needle", [
    (lambda: Policy(gpu_batch_size=2.5), "gpu_batch_size"),
    (lambda: Policy(num_gpu_batches=0), "num_gpu_batches"),
    (lambda: Policy(weight_gpu_percent="100"), "weight_gpu_percent"),
    (lambda: Policy(overlap="no"), "overlap"),
    (lambda: Workload(0, 0), "prompt_len"),
    (lambda: Workload(5, 0), "gen_len"),
    (lambda: Workload(5.5, 2), "prompt_len"),
    (lambda: GenerationConfig(max_new_tokens="4"), "max_new_tokens"),
    (lambda: GenerationConfig(stop_token_id=-1), "stop"),
])
def test_policy_workload_and_config_values_are_checked(make, needle):
    with pytest.raises(EngineError, match=needle):
        make()


@pytest.mark.parametrize("prompts", [[123], "In the beginning", [[1, 2, 3]], 7])
def test_generate_says_what_it_takes(tmp_path, prompts):
    with tiny_engine(tmp_path) as engine:
        with pytest.raises(EngineError) as refused:
            engine.generate(prompts)
    assert "list of strings" in str(refused.value) and "2-D" in str(refused.value)


def test_stop_token_outside_the_vocabulary_is_refused(tmp_path, capsys):
    with tiny_engine(tmp_path) as engine:
        with pytest.raises(EngineError, match="--stop-token 100"):
            engine.generate(*random_prompts(2, 5), GenerationConfig(max_new_tokens=2, stop_token_id=100))
    line = cli_error(capsys, "run", "--quiet", "--stop-token", "-1", "--offload-dir", str(tmp_path))
    assert "--stop-token" in line
    line = cli_error(capsys, "run", "--quiet", "--stop-token", "50272", "--offload-dir", str(tmp_path))
    assert "--stop-token 50272" in line and "50272" in line


# --- H2O's budget ---------------------------------------------------------------------------------

def test_ratio_budget_has_a_floor_and_sizes_are_taken_as_given():
    assert H2OConfig().sizes(5) == (16, 16)  # a short prompt is kept whole
    assert H2OConfig().sizes(1000) == (100, 100)
    assert H2OConfig(0.5, 0.01).sizes(100) == (50, 16)
    assert H2OConfig(hh_ratio=0.0).sizes(100) == (0, 16)  # no heavy hitters asked for: none
    assert H2OConfig(hh_size=2, recent_size=3).sizes(5) == (2, 3)
    assert KVSettings("h2o").cache_len(5, 9) == 9  # the whole sequence fits the floor: nothing is evicted


def test_score_decay_defaults_to_a_quarter_of_the_budget_and_is_checked(capsys, tmp_path):
    assert H2OConfig().score_decay(1000) == pytest.approx(1 - 4 / 200)
    assert H2OConfig(hh_size=1, recent_size=2).score_decay(10) == 0.0  # below 4 tokens: the last step alone
    assert H2OConfig(decay=1.0).score_decay(1000) == 1.0  # H2O's sum, as given
    with pytest.raises(EngineError, match="--h2o-decay"):
        H2OConfig(decay=-0.5)
    line = cli_error(capsys, "run", "--quiet", "--kv-policy", "h2o", "--h2o-decay", "2", "--offload-dir", str(tmp_path))
    assert "--h2o-decay" in line and "between 0 and 1" in line


@pytest.mark.parametrize("flags", [["--hh-size", "0", "--recent-size", "0"],
                                   ["--hh-ratio", "0", "--recent-ratio", "0"]])
def test_a_zero_budget_is_refused(capsys, tmp_path, flags):
    line = cli_error(capsys, "run", "--quiet", "--kv-policy", "h2o", *flags, "--offload-dir", str(tmp_path))
    assert flags[0] in line and "0 tokens" in line


@pytest.mark.parametrize("policy,flags,needs", [
    ("full", ["--hh-ratio", "0.2"], "--kv-policy h2o"),
    ("full", ["--recent-size", "4"], "--kv-policy h2o"),
    ("hip", ["--h2o-simulate"], "--kv-policy h2o"),
    ("hip", ["--hh-size", "8"], "--kv-policy h2o"),
    ("full", ["--hip-k", "64"], "--kv-policy hip"),
    ("h2o", ["--hip-window", "8"], "--kv-policy hip"),
])
def test_kv_flags_need_their_policy(capsys, tmp_path, policy, flags, needs):
    line = cli_error(capsys, "run", "--quiet", "--kv-policy", policy, *flags, "--offload-dir", str(tmp_path))
    assert flags[0] in line and needs in line


def test_h2o_budget_is_printed_and_recorded_in_tokens(text_model, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--quiet", "--model", str(text_model), "--prompt-len", "8", "--gen-len", "2",
                 "--kv-policy", "h2o", "--offload-dir", str(tmp_path / "o"), "--json", str(out)]) == 0
    assert "H2O budget: 16 heavy hitters + 16 recent = 32 tokens" in capsys.readouterr().err
    assert json.loads(out.read_text())["kv_budget"] == {"heavy_hitters": 16, "recent": 16, "tokens": 32,
                                                        "score_decay": 1 - 4 / 32}
    assert generate_cli(text_model, tmp_path, "--quiet", "--prompt", "In the beginning", "--max-new-tokens", "2",
                        "--kv-policy", "h2o", "--hh-size", "3", "--recent-size", "2", "--json", str(out)) == 0
    assert "H2O budget: 3 heavy hitters + 2 recent = 5 tokens" in capsys.readouterr().err
    assert json.loads(out.read_text())["kv_budget"] == {"heavy_hitters": 3, "recent": 2, "tokens": 5,
                                                        "score_decay": 1 - 4 / 5}


def test_sweep_points_drop_kv_flags_their_policy_does_not_read():
    from offload_engine.sweep.grid import expand

    points = expand({"kv-policy": ["full", "h2o"]}, {"hh-ratio": 0.2, "prompt-len": 8})
    argv = {p.settings["kv-policy"]: p.argv for p in points}
    assert "--hh-ratio=0.2" in argv["h2o"] and not any(a.startswith("--hh-ratio") for a in argv["full"])


# --- generate: text files and the result file ---------------------------------------------------

def test_a_prompts_file_that_is_not_utf8_is_one_line(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("In the beginning\n".encode("utf-16"))
    line = cli_error(capsys, "generate", "--quiet", "--prompts", str(prompts), "--offload-dir", str(tmp_path))
    assert "--prompts" in line and "UTF-8" in line


def test_generate_json_records_the_command_and_settings(text_model, tmp_path, capsys):
    out = tmp_path / "g.json"
    argv = ["--quiet", "--prompt", "In the", "--prompt", "And", "--max-new-tokens", "3", "--do-sample",
            "--temperature", "0.7", "--top-p", "0.9", "--seed", "5", "--json", str(out)]
    assert generate_cli(text_model, tmp_path, *argv) == 0
    data = json.loads(out.read_text())
    assert data["command"][0] == "offload-engine" and data["command"][1:3] == ["generate", "--model"]
    assert data["command"][-len(argv):] == argv
    assert data["generation"] == {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                  "seed": 5, "stop_token_id": 2}
    assert data["dtype"] == "float32" and data["device"] == "cpu" and data["workload"]["gen_len"] == 3


# --- terminal output ------------------------------------------------------------------------------

def test_streamed_text_is_not_drawn_over_by_a_progress_bar(text_model, tmp_path):
    """stdout and stderr into one stream, as on a terminal: the prompt and its continuation stay whole."""
    out, terminal = tmp_path / "g.json", io.StringIO()
    with contextlib.redirect_stdout(terminal), contextlib.redirect_stderr(terminal):
        assert generate_cli(text_model, tmp_path, "--prompt", "In the beginning", "--max-new-tokens", "6",
                            "--json", str(out)) == 0
    text = json.loads(out.read_text())["outputs"][0]["text"]
    assert "In the beginning" + text + "\n" in terminal.getvalue()
    assert "load weights" in terminal.getvalue()  # loading, before the text, keeps its bar


def test_interrupted_message_starts_its_own_line(text_model, tmp_path, capsys, monkeypatch):
    import offload_engine.engine as engine_module

    calls, real = [], engine_module.sample

    def interrupt_at_the_third_token(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(engine_module, "sample", interrupt_at_the_third_token)
    assert main(["run", "--model", str(text_model), "--prompt-len", "4", "--gen-len", "4", "--offload-dir",
                 str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "generate:" in err and "interrupted: no results written" in err.splitlines()


def test_run_help_prints_its_examples_as_written(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--gpu-batch-size 24 \\\n      --gpu-mem 16GiB" in out
    assert "--nproc-per-node 1 \\\n      -m offload_engine run" in out
    lines = out.splitlines()
    assert all(lines[i + 1].startswith("      ") for i, line in enumerate(lines) if line.endswith("\\"))
