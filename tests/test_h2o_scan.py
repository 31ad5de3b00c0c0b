"""Teacher-forced H2O (kv/h2o_scan.py): perplexity of an evicting policy scored in one prefill
per batch of windows equals scoring it with one engine decode step per token (the windows
batched, or each alone), per window, to float rounding, on every tier, for H2O, the sink
baseline and the masked simulation."""
from __future__ import annotations

import pytest
import torch

from offload_engine import perplexity as ppl
from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.errors import EngineError
from offload_engine.kernels import h2o_scan_block as kernel
from offload_engine.kernels.cpu_attention import use_cpp
from offload_engine.kernels.cpu_decode_job import run_job as h2o_job_run
from offload_engine.kv import h2o_scan
from offload_engine.perplexity import perplexity
from offload_engine.policies import Compression, H2OConfig, KVSettings
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy
from offload_engine.sampling import GenerationConfig

from conftest import VOCAB, save_checkpoint, tiny_hf_llama, tiny_hf_opt

CONTEXT, WINDOWS = 40, 3
TIERS = {"gpu": ((100, 0, 100, 0, 100, 0), False), "cpu-attention": ((0, 100, 0, 100, 0, 100), True),
         "disk": ((0, 0, 0, 0, 0, 0), False)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 4 queries, so a 40-token window runs through ten of them."""
    monkeypatch.setattr(h2o_scan, "_MIN_BLOCK", 4)
    monkeypatch.setattr(h2o_scan, "_BLOCK_ELEMS", 0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"llama": save_checkpoint(tiny_hf_llama(seed=5), tmp_path_factory.mktemp("llama"), "safetensors"),
            "opt": save_checkpoint(tiny_hf_opt(seed=6), tmp_path_factory.mktemp("opt"), "safetensors")}


def windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (WINDOWS, CONTEXT), generator=torch.Generator().manual_seed(seed))


def options(folder, tmp_path, **kw) -> EngineOptions:
    return EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32, **kw)


def both(folder, tmp_path, kv: KVSettings, placement: Policy | None = None, **kw):
    """(teacher-forced scan, engine decode steps) on the same windows."""
    cfg, opts, rows = from_hf_config(folder), options(folder, tmp_path, **kw), windows()
    return (perplexity(cfg, rows, kv, opts, placement),
            perplexity(cfg, rows, kv, opts, placement, decode_steps=True))


def assert_windows_equal(scan, decoded, tol=1e-5):
    assert scan.method == decoded.method == "token-by-token"
    assert scan.tokens_scored == decoded.tokens_scored == WINDOWS * (CONTEXT - 1)
    assert len(scan.window_nll) == WINDOWS
    for a, b in zip(scan.window_nll, decoded.window_nll):
        assert a == pytest.approx(b, rel=tol)
    assert scan.kv_bytes_per_sequence == decoded.kv_bytes_per_sequence


@pytest.mark.parametrize("family,kind,decay", [("llama", "h2o", 1.0), ("opt", "h2o", 1.0), ("llama", "sink", 1.0),
                                               ("opt", "sink", 1.0), ("llama", "h2o", 0.7), ("opt", "h2o", 0.0)])
def test_scan_equals_decode_steps(checkpoints, tmp_path, family, kind, decay):
    """H2O's sum (decay 1), an exponential moving sum and TOVA's last step (decay 0), the sink baseline."""
    kv = KVSettings(kind, H2OConfig(hh_size=3, recent_size=4, decay=decay))
    scan, decoded = both(checkpoints[family], tmp_path, kv)
    assert_windows_equal(scan, decoded)
    full = perplexity(from_hf_config(checkpoints[family]), windows(), KVSettings(),
                      options(checkpoints[family], tmp_path))
    assert abs(scan.nll / full.nll - 1) > 1e-3  # the budget of 7 keys changes what is predicted


def test_batched_scan_equals_each_window_decoded_alone(checkpoints, tmp_path):
    folder, kv = checkpoints["llama"], KVSettings("h2o", H2OConfig(hh_size=2, recent_size=3))
    rows, opts = windows(seed=1), options(folder, tmp_path)
    batched = perplexity(from_hf_config(folder), rows, kv, opts)
    for i, row in enumerate(rows):
        alone = perplexity(from_hf_config(folder), row[None], kv, opts, decode_steps=True)
        assert batched.window_nll[i] == pytest.approx(alone.window_nll[0], rel=1e-5)


@pytest.mark.parametrize("tier,decay", [("cpu-attention", 1.0), ("disk", 1.0), ("cpu-attention", 0.5)])
def test_scan_equals_decode_steps_off_the_gpu(checkpoints, tmp_path, tier, decay):
    """The decode steps' cache on the CPU (its C++ job attends and evicts) or on disk."""
    percent, cpu_compute = TIERS[tier]
    placement = Policy.from_percent(percent, cpu_cache_compute=cpu_compute)
    kv = KVSettings("h2o", H2OConfig(hh_size=4, recent_size=2, decay=decay))
    assert_windows_equal(*both(checkpoints["llama"], tmp_path, kv, placement))


@pytest.mark.parametrize("exact_tokens", [6, 11])
def test_scan_equals_masked_simulation_and_packed_cache(checkpoints, tmp_path, monkeypatch, exact_tokens):
    """The packed cache's rounding, with the newest tokens of each query read exact (a window
    shorter than the blocks of 4 queries plus the budget, and one longer)."""
    from offload_engine.kv import recent

    monkeypatch.setattr(recent, "RECENT_EXACT", exact_tokens)
    sim = KVSettings("h2o", H2OConfig(hh_size=5, recent_size=3, simulate=True))
    assert_windows_equal(*both(checkpoints["llama"], tmp_path, sim))
    packed = Policy(compress_cache=Compression(4, 16))  # decode steps attend the 4-bit cache's rounding
    kv = KVSettings("h2o", H2OConfig(hh_size=5, recent_size=3))
    scan, decoded = both(checkpoints["llama"], tmp_path, kv, packed)
    assert_windows_equal(scan, decoded, tol=1e-4)
    plain = perplexity(from_hf_config(checkpoints["llama"]), windows(), kv, options(checkpoints["llama"], tmp_path))
    assert abs(scan.nll / plain.nll - 1) > 1e-4  # older tokens are read rounded


@pytest.mark.skipif(not use_cpp(), reason="C++ kernel did not build here")
def test_packed_cache_attended_on_the_cpu_scores_as_the_scan(checkpoints, tmp_path, monkeypatch):
    """Decode steps over a 4-bit cache attended on the CPU, where one C++ job per item reads the
    records and the exact ring (kernels/cpu_decode_job.py), score as the scan does."""
    from offload_engine.kv import h2o, recent

    monkeypatch.setattr(recent, "RECENT_EXACT", 6)
    jobs = []
    monkeypatch.setattr(h2o, "run_job", lambda job: (jobs.append(job.bits), h2o_job_run(job)))
    percent, cpu_compute = TIERS["cpu-attention"]
    placement = Policy.from_percent(percent, cpu_cache_compute=cpu_compute, compress_cache=Compression(4, 16))
    kv = KVSettings("h2o", H2OConfig(hh_size=5, recent_size=3))
    assert_windows_equal(*both(checkpoints["llama"], tmp_path, kv, placement), tol=1e-4)
    assert jobs and set(jobs) == {4}


def test_exact_newest_tokens_covering_the_window_give_the_unpacked_result(checkpoints, tmp_path, monkeypatch):
    from offload_engine.kv import recent

    monkeypatch.setattr(recent, "RECENT_EXACT", CONTEXT)
    kv = KVSettings("h2o", H2OConfig(hh_size=5, recent_size=3))
    packed, plain = (both(checkpoints["llama"], tmp_path, kv, Policy(compress_cache=c)) for c in
                     (Compression(4, 16), None))
    for a, b in zip(packed, plain):  # scan and decode steps alike
        assert a.window_nll == pytest.approx(b.window_nll, rel=1e-5)


def test_chunked_prefill_and_split_batches_score_the_same(checkpoints, tmp_path, monkeypatch):
    """The scan carried across prefill chunks, and the windows over two engine batches, give
    the one-batch, one-prefill result."""
    folder, kv = checkpoints["llama"], KVSettings("h2o", H2OConfig(hh_size=3, recent_size=4))
    whole = perplexity(from_hf_config(folder), windows(), kv, options(folder, tmp_path))
    chunked = perplexity(from_hf_config(folder), windows(), kv, options(folder, tmp_path, prefill_chunk=16))
    assert chunked.window_nll == pytest.approx(whole.window_nll, rel=1e-5)
    monkeypatch.setattr(ppl, "_LOGITS_BYTES", 2 * CONTEXT * VOCAB * 4)  # two windows' logits per batch
    assert ppl._rows_per_batch(WINDOWS, CONTEXT, VOCAB) == 2
    split = perplexity(from_hf_config(folder), windows(), kv, options(folder, tmp_path))
    assert split.window_nll == pytest.approx(whole.window_nll, rel=1e-5)


def test_progress_counts_the_tokens_scored(checkpoints, tmp_path):
    folder = checkpoints["llama"]
    for kv, steps in ((KVSettings("h2o", H2OConfig(hh_size=3, recent_size=4)), False),
                      (KVSettings("sink", H2OConfig(hh_size=2, recent_size=4)), True), (KVSettings(), False)):
        counts: list[int] = []
        result = perplexity(from_hf_config(folder), windows(), kv, options(folder, tmp_path), progress=counts.append,
                            decode_steps=steps)
        assert sum(counts) == result.tokens_scored == WINDOWS * (CONTEXT - 1) and min(counts) > 0
        assert len(counts) > 1  # the bar moves during a batch, not only at its end


def test_teacher_forced_prompts_must_be_unpadded(checkpoints, tmp_path):
    folder = checkpoints["llama"]
    policy = Policy(gpu_batch_size=2, kv=KVSettings("h2o", H2OConfig(hh_size=3, recent_size=4)))
    with Engine(from_hf_config(folder), policy, Workload(8, 1), options(folder, tmp_path)) as engine:
        engine.kv.policy.teacher_forced = True
        ids = torch.randint(3, VOCAB, (2, 8))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, :2] = 0
        with pytest.raises(EngineError, match="unpadded"):
            engine.generate(ids, mask, GenerationConfig(max_new_tokens=1))


def block_state(seed: int, k0: int, b=2, hkv=3, rep=2, n=7, before=20):
    """A block of n queries after `before` positions of which k0 are kept, random logits and scores."""
    g = torch.Generator().manual_seed(seed)
    kept_pos = torch.stack([torch.randperm(before, generator=g)[:k0].sort().values for _ in range(b * hkv)])
    pos = torch.cat([kept_pos.view(b, hkv, k0), torch.arange(before, before + n).expand(b, hkv, n)], -1)
    kept = torch.cat([torch.ones(b, hkv, k0, dtype=torch.bool), torch.zeros(b, hkv, n, dtype=torch.bool)], -1)
    score = torch.cat([torch.rand(b, hkv, k0, generator=g) * 3, torch.zeros(b, hkv, n)], -1)
    logits = torch.randn(b, hkv, n, rep, k0 + n, generator=g) * 3
    return logits, kept, score, pos.contiguous()


@pytest.mark.skipif(not use_cpp(), reason="the C++ kernel could not be built here")
@pytest.mark.parametrize("sinks,decay", [(False, 1.0), (True, 1.0), (False, 0.6), (False, 0.0)])
@pytest.mark.parametrize("budget, recent", [(9, 3), (9, 9), (12, 1), (30, 4)])
def test_cpp_block_equals_torch_block(sinks, decay, budget, recent):
    """Softmax over the kept columns, scores and evictions of a block of 7 after 20 positions."""
    k0 = min(20, budget)
    logits, kept, score, pos = block_state(budget + recent, k0)
    if sinks:
        score = -pos.float() * kept
    ref_kept, ref_score = kept.clone(), score.clone()
    ref = kernel.scan_block_torch(logits, ref_kept, ref_score, pos, k0, budget, recent, sinks, decay)
    out = kernel.scan_block_cpp(logits, kept, score, pos, k0, budget, recent, sinks, decay)
    assert torch.equal(kept, ref_kept)
    assert torch.allclose(score, ref_score, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert bool((kept.sum(-1) == min(27, budget)).all())  # the budget, once past it
    assert bool(kept[pos >= 27 - recent].all())  # the recent window is never evicted
    assert bool((out.sum(-1) - 1).abs().max() < 1e-5)  # each query row is a distribution
