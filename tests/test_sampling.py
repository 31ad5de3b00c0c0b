"""Greedy decoding, temperature and top-p sampling, seeds and the stop token."""
from __future__ import annotations

import pytest
import torch

from offload_engine.model_zoo import OPT_CONFIGS
from offload_engine.engine import Engine, EngineOptions
from offload_engine.sampling import GenerationConfig, sample
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy


def random_logits(rows: int, vocab: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax():
    logits = random_logits(50)
    assert torch.equal(sample(logits, GenerationConfig(), None), logits.argmax(-1))


def test_tiny_top_p_is_greedy():
    logits = random_logits(50, seed=1)
    cfg = GenerationConfig(do_sample=True, top_p=1e-6)
    assert torch.equal(sample(logits, cfg, torch.Generator().manual_seed(0)), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_follows_softmax(temperature):
    logits = random_logits(1, seed=2)
    n = 40000
    cfg = GenerationConfig(do_sample=True, temperature=temperature)
    draws = sample(logits.expand(n, -1), cfg, torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=logits.shape[1]).double() / n
    expected = (logits[0].double() / temperature).softmax(-1)
    assert (freq - expected).abs().max() < 4 * (expected * (1 - expected) / n).sqrt().max() + 1e-3


def test_top_p_keeps_the_nucleus_renormalised():
    logits = random_logits(1, seed=4)
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    top_p = float(cum[2]) - 1e-4  # the nucleus is exactly the top 3 tokens
    n = 30000
    draws = sample(logits.expand(n, -1), GenerationConfig(do_sample=True, top_p=top_p), torch.Generator().manual_seed(5))
    assert set(draws.tolist()) == set(order[:3].tolist())
    freq = torch.bincount(draws, minlength=probs.numel()).double()[order[:3]] / n
    expected = probs[order[:3]].double() / probs[order[:3]].sum()
    assert (freq - expected).abs().max() < 0.015


def test_seeded_sampling_is_reproducible():
    logits = random_logits(64, vocab=50, seed=6)
    cfg = GenerationConfig(do_sample=True, temperature=1.5)
    a = sample(logits, cfg, torch.Generator().manual_seed(7))
    b = sample(logits, cfg, torch.Generator().manual_seed(7))
    c = sample(logits, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = OPT_CONFIGS["opt-125m"].__class__(name="tiny", family="opt", num_layers=2, hidden_size=64, num_heads=4,
                                            ffn_dim=128, vocab_size=40, max_positions=64)
    e = Engine(cfg, Policy(gpu_batch_size=4), Workload(6, 10),
               EngineOptions(offload_dir=tmp_path_factory.mktemp("off"), progress=False, seed=1))
    yield e
    e.close()


def prompts(seed=0):
    return torch.randint(3, 40, (4, 6), generator=torch.Generator().manual_seed(seed))


def test_stop_token_ends_sequences(engine):
    ids = prompts()
    free = engine.generate(ids, None, GenerationConfig(max_new_tokens=10)).tokens
    stop = int(free[0, 2])
    stopped = engine.generate(ids, None, GenerationConfig(max_new_tokens=10, stop_token_id=stop)).tokens
    for row in range(4):
        hits = (free[row] == stop).nonzero()
        if len(hits):  # identical up to and including the first stop token, padding after it
            first = int(hits[0])
            assert torch.equal(stopped[row, :first + 1], free[row, :first + 1])
            assert (stopped[row, first + 1:] == engine.model.pad_token_id).all()
        else:
            assert torch.equal(stopped[row, :stopped.shape[1]], free[row, :stopped.shape[1]])


def test_engine_sampling_seeded(engine):
    ids = prompts(1)
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.9, seed=11)
    a = engine.generate(ids, None, cfg).tokens
    b = engine.generate(ids, None, cfg).tokens
    c = engine.generate(ids, None, GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.3, seed=12)).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dummy_weights_are_seeded_and_not_constant(tmp_path):
    cfg = OPT_CONFIGS["opt-125m"].__class__(name="tiny", family="opt", num_layers=2, hidden_size=32, num_heads=4,
                                            ffn_dim=64, vocab_size=40, max_positions=64)
    def build(seed):
        return Engine(cfg, Policy(), Workload(4, 2), EngineOptions(offload_dir=tmp_path, progress=False, seed=seed))
    a, b, c = build(0), build(0), build(1)
    for key, (_, wa) in a.weights.homes.items():
        assert torch.equal(wa, b.weights.homes[key][1])
        assert not torch.equal(wa, c.weights.homes[key][1])
        assert wa.unique().numel() > wa.numel() // 2  # random, not a constant fill
    for e in (a, b, c):
        e.close()
