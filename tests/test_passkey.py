"""The passkey benchmark (experiments/passkey.py): the prompt builder, and retrieval on the real model."""
from __future__ import annotations

import pytest
import torch

from conftest import require_smollm2

require_smollm2()

from experiments import passkey as pk  # noqa: E402
from offload_engine.engine import Engine, EngineOptions  # noqa: E402
from offload_engine.policies import HiPConfig, KVSettings  # noqa: E402
from offload_engine.policies.memory import Workload  # noqa: E402
from offload_engine.policies.placement import Policy  # noqa: E402
from offload_engine.sampling import GenerationConfig  # noqa: E402
from offload_engine.text import resolve_with_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return resolve_with_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def builder(model):
    return pk.PromptBuilder(model[1])


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_key_sits_at_the_requested_depth(builder, depth):
    s = builder.build(1000, depth, "48213", first_verse=17)
    assert len(s.ids) == 1000
    assert s.ids[s.key_start:s.key_start + s.key_len] == builder.key_sentence("48213")
    assert s.ids[:s.filler_start] == builder.prefix and s.ids[-len(builder.suffix):] == builder.suffix
    offset = s.key_start - s.filler_start  # haystack tokens before the key
    longest_verse = max(len(v) for v in builder.verses[17:40])
    assert abs(offset - depth * s.filler_tokens) <= longest_verse / 2  # the nearest verse boundary
    assert builder.tokenizer.decode(s.ids).count("48213") == 2  # only the key sentence names it


def test_the_ends_are_exact_and_the_haystack_is_the_corpus(builder):
    first = builder.build(600, 0.0, "11111", first_verse=3)
    last = builder.build(600, 1.0, "11111", first_verse=3)
    assert first.key_start == first.filler_start
    assert last.key_start == last.filler_start + last.filler_tokens
    haystack = last.ids[last.filler_start:last.key_start]
    assert haystack[:len(builder.verses[3])] == builder.verses[3]
    assert haystack == first.ids[first.key_start + first.key_len:-len(builder.suffix)]  # same text, key moved


def test_samples_are_seeded(builder):
    settings = pk.PasskeySettings(context=400, depths=(0.0, 1.0), trials=2, seed=5)
    a, b = pk.make_samples(builder, settings), pk.make_samples(builder, settings)
    assert [s.ids for s in a] == [s.ids for s in b]
    keys = [s.key for s in a]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) == 4
    other = pk.make_samples(builder, pk.PasskeySettings(context=400, depths=(0.0, 1.0), trials=2, seed=6))
    assert [s.key for s in other] != keys


def _generate(model, policy: Policy, samples, tmp_path) -> tuple[list[list[int]], int]:
    resolved, _ = model
    opts = EngineOptions(checkpoint=resolved.source, progress=False, offload_dir=tmp_path / "offload")
    new_tokens = 6  # " " and the 5 digits, one token each
    with Engine(resolved.config, policy, Workload(len(samples[0].ids), new_tokens), opts) as engine:
        out = engine.generate(torch.tensor([s.ids for s in samples]), None, GenerationConfig(max_new_tokens=new_tokens))
        hip = engine.kv.policy if policy.kv.policy == "hip" else None
        fetched = hip.fetched_bytes() if hip is not None else 0
    return out.tokens.tolist(), fetched


def test_full_attention_retrieves_the_key(model, builder, tmp_path):
    samples = [builder.build(256, 0.25, "70364", first_verse=100), builder.build(256, 0.75, "52817", first_verse=900)]
    tokens, _ = _generate(model, Policy(gpu_batch_size=2), samples, tmp_path)
    for sample, row in zip(samples, tokens):
        assert sample.key in model[1].decode(row)


def test_hip_offloaded_selects_what_hip_on_the_gpu_tier_selects(model, builder, tmp_path):
    """k well below the prompt and a new selection every step: the selection prunes (about 100 of
    256 keys; the second answer then differs from full attention's, so the tokens depend on what is
    selected), and every decode step brings its blocks through the hot-block cache."""
    hip = KVSettings("hip", hip=HiPConfig(k=64, window=32, refresh=1))
    samples = [builder.build(256, 0.5, "70364", first_verse=100), builder.build(256, 0.1, "52817", first_verse=900)]
    offloaded, fetched = _generate(model, Policy.from_percent(pk.CACHE_ON_CPU, gpu_batch_size=2, kv=hip), samples,
                                   tmp_path)
    on_gpu, fetched_gpu = _generate(model, Policy.from_percent(pk.ON_GPU, gpu_batch_size=2, kv=hip), samples, tmp_path)
    assert fetched > 0 and fetched_gpu == 0  # the offloaded run read its blocks from the CPU-tier home
    assert offloaded == on_gpu
