"""KIVI's KV codec (kernels/quant/kivi.py, kv/recent.py): keys per channel over blocks of 32
tokens, values per token, the unfinished block exact. Against float64 references: the format's
rounding bound, the packed attention kernels, the merge with the exact tokens, and the engine
against transformers running the same rounding in its attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.engine import Engine, EngineOptions
from offload_engine.kernels.quant.attention import (attention_with_recent, quant_decode_attention,
                                                    quant_decode_attention_reference, quant_decode_attention_triton)
from offload_engine.kernels.quant.kivi import (BLOCK, dequantize_keys, dequantize_keys_reference, encode_keys,
                                               encode_values, kivi_spec)
from offload_engine.kernels.quant.pack import dequantize_reference, quantize_reference
from offload_engine.kv.recent import RecentTokens
from offload_engine.policies import Compression
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy
from offload_engine.sampling import GenerationConfig

from conftest import random_prompts, rel_err, save_checkpoint, transformers

SPEC = kivi_spec(4)


def outlier_keys(t: int, b: int, h: int, d: int, seed: int = 0) -> torch.Tensor:
    """Gaussian keys with a few large channels and channel offsets, as trained models' keys have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, b, h, d, generator=g)
    x[..., 3] *= 25.0
    x[..., d // 2 + 1] += 12.0
    x[..., d - 5] *= -8.0
    return x


def left_padding(b: int, t: int, pads: list[int]) -> torch.Tensor:
    valid = torch.ones(b, t, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return valid


def channel_params(keys: torch.Tensor, valid: torch.Tensor):
    """float64 (scale, min) of every (block, row, head, channel), from the block's real tokens only."""
    t, b, h, d = keys.shape
    x = keys.double().reshape(t // BLOCK, BLOCK, b, h, d).permute(0, 2, 3, 4, 1)   # (n, B, H, D, token)
    ok = valid.T.reshape(t // BLOCK, BLOCK, b).permute(0, 2, 1)[:, :, None, None, :]
    lo = torch.where(ok, x, float("inf")).amin(-1)
    hi = torch.where(ok, x, float("-inf")).amax(-1)
    return lo, hi


@pytest.mark.parametrize("pads", [[0, 0], [0, 37], [5, 64]])
@pytest.mark.parametrize("bits", [4, 2])
def test_keys_round_trip_within_half_a_step_of_their_channel(pads, bits):
    t, b, h, d = 96, 2, 3, 64
    spec = kivi_spec(bits)
    keys, valid = outlier_keys(t, b, h, d), left_padding(b, t, pads)
    keys[~valid.T] = 1000.0  # padding far outside every range: it must not widen one
    packed = encode_keys(keys, spec, valid)
    assert packed.shape == (t, b, h, d // BLOCK, spec.record_bytes)
    back = dequantize_keys_reference(packed, spec)
    assert (dequantize_keys(packed, spec).double() - back).abs().max() < 1e-5
    lo, hi = channel_params(keys, valid)
    step = ((hi - lo) / spec.levels)                                               # (n, B, H, D)
    step = step[:, None].expand(-1, BLOCK, -1, -1, -1).reshape(t, b, h, d)
    err = (back - keys.double()).abs()
    real = valid.T[..., None, None].expand_as(err)
    assert (err[real] <= step[real] * 0.5 * (1 + 1e-3) + 1e-3).all()
    # One group per channel and block: grouping along the head dimension does far worse here.
    per_token = dequantize_reference(quantize_reference(keys, spec), spec, d)
    assert err[real].mean() < 0.5 * (per_token - keys.double()).abs()[real].mean()


def test_key_records_hold_each_channel_as_one_pack_group():
    """A block's record (i, g) carries channel 32g + i's scale and min: pack.py's parameters of that
    channel's 32 values, bit for bit."""
    keys = outlier_keys(BLOCK, 1, 1, 64, seed=3)
    packed = encode_keys(keys, SPEC)
    along_tokens = quantize_reference(keys[:, 0, 0].T.contiguous(), SPEC)         # (64 channels, 1, R)
    for channel in (0, 3, 33, 63):
        g, i = divmod(channel, BLOCK)
        assert torch.equal(packed[i, 0, 0, g, :4], along_tokens[channel, 0, :4])


@pytest.mark.parametrize("length,pads,splits,bits", [(32, [0, 0], 1, 4), (96, [0, 41], 2, 4), (160, [70, 3], 3, 4),
                                                    (96, [0, 41], 2, 2)])
def test_packed_attention_equals_attention_over_the_dequantized_cache(length, pads, splits, bits):
    b, hkv, hq, d = 2, 2, 4, 64
    spec = kivi_spec(bits)
    keys, values = outlier_keys(length, b, hkv, d, seed=1), torch.randn(length, b, hkv, d)
    valid = left_padding(b, length, pads)
    kp, vp = encode_keys(keys, spec, valid), encode_values(values, spec)
    q = torch.randn(b, hq, d) * 0.1
    ref, _ = quant_decode_attention_reference(q, kp, vp, spec, d, length, valid, keys_per_channel=True)
    out = quant_decode_attention_triton(q, kp, vp, spec, d, length, valid, num_splits=splits, keys_per_channel=True)
    assert (out.double() - ref).abs().max() < 1e-5
    head_major = (kp.permute(1, 2, 0, 3, 4).contiguous().permute(2, 0, 1, 3, 4),
                  vp.permute(1, 2, 0, 3, 4).contiguous().permute(2, 0, 1, 3, 4))
    recent_k, recent_v = torch.randn(3, b, hkv, d), torch.randn(3, b, hkv, d)
    with_recent = torch.cat([valid, torch.ones(b, 3, dtype=torch.bool)], 1)
    merged = attention_with_recent(q, *head_major, spec, d, length, recent_k, recent_v, with_recent)
    k_all = torch.cat([dequantize_keys_reference(kp, spec), recent_k.double()]).repeat_interleave(2, 2)
    v_all = torch.cat([dequantize_reference(vp, spec, d), recent_v.double()]).repeat_interleave(2, 2)
    scores = torch.einsum("bhd,tbhd->bht", q.double(), k_all).masked_fill(~with_recent[:, None], float("-inf"))
    assert (merged.double() - torch.einsum("bht,tbhd->bhd", scores.softmax(-1), v_all)).abs().max() < 1e-5


def test_a_row_without_packed_keys_attends_its_recent_tokens_alone():
    b, hkv, d = 2, 1, 32
    kp = encode_keys(outlier_keys(BLOCK, b, hkv, d), SPEC)
    vp = encode_values(torch.randn(BLOCK, b, hkv, d), SPEC)
    valid = left_padding(b, BLOCK + 2, [0, BLOCK])  # row 1: all of the packed block is padding
    q, rk, rv = torch.randn(b, 2, d), torch.randn(2, b, hkv, d), torch.randn(2, b, hkv, d)
    out = attention_with_recent(q, kp, vp, SPEC, d, BLOCK, rk, rv, valid)
    alone = F.scaled_dot_product_attention(q[1:, :, None], rk[:, 1:].permute(1, 2, 0, 3).expand(1, 2, 2, d),
                                           rv[:, 1:].permute(1, 2, 0, 3).expand(1, 2, 2, d), scale=1.0)
    assert torch.isfinite(out).all()
    assert (out[1] - alone[0, :, 0]).abs().max() < 1e-5


def test_recent_tokens_hand_over_whole_blocks_in_order():
    b, h, d = 2, 1, 4
    stream = torch.randn(150, b, h, d)
    recent, written, t = RecentTokens(b, h, d, torch.float32, torch.device("cpu")), [], 0
    for s in (40, 1, 1, 30, 7, 1, 64, 6):
        k_now, _ = recent.with_new(t, stream[t:t + s], stream[t:t + s])
        assert torch.equal(k_now, stream[RecentTokens.block_start(t):t + s])
        done = recent.append(t, stream[t:t + s], stream[t:t + s])
        if done is not None:
            start, k, v = done
            assert start == sum(x.shape[0] for x in written) and k.shape[0] % BLOCK == 0
            written.append(k)
        t += s
    assert torch.equal(torch.cat(written), stream[:t // BLOCK * BLOCK])


# ----------------------------------------------------------------------------- the engine

PROMPT, GEN = 44, 30
TIERS = {"gpu": ((100, 0, 100, 0, 100, 0), False), "cpu-attention": ((0, 100, 0, 100, 0, 100), True),
         "cpu-streamed": ((0, 100, 0, 100, 0, 100), False), "disk": ((0, 0, 0, 0, 0, 0), False)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A small Llama with head dimension 64 (KIVI groups 32 channels), GQA, random weights."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_theta=1000.0, pad_token_id=1, bos_token_id=2,
                                   eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.2)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("llama64"), "safetensors")


def kivi_eager_attention(spec):
    """transformers' eager attention over the cache as KIVI stores it with `spec`: in a decode
    step, the whole blocks before the new token's block are rounded (float64 reference rules),
    the rest exact."""
    return lambda *args, **kw: _kivi_eager(spec, *args, **kw)


def _kivi_eager(spec, module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    if query.shape[2] == 1:
        t = key.shape[2] - 1
        flushed = t - t % BLOCK
        valid = attention_mask[:, 0, 0, :] == 0 if attention_mask is not None else None
        if flushed:
            k_tok = key[:, :, :flushed].permute(2, 0, 1, 3)
            ok = valid[:, :flushed] if valid is not None else None
            k_q = dequantize_keys_reference(encode_keys(k_tok, spec, ok), spec).float()
            v_q = dequantize_reference(quantize_reference(value[:, :, :flushed], spec), spec, value.shape[-1]).float()
            key = torch.cat([k_q.permute(1, 2, 0, 3), key[:, :, flushed:]], 2)
            value = torch.cat([v_q, value[:, :, flushed:]], 2)
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[2]]
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


def engine_run(folder, tmp_path, tier, chunk=None, bits=4):
    percent, cpu_compute = TIERS[tier]
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, cpu_cache_compute=cpu_compute,
                                 compress_cache=Compression(bits, keys_per_channel=True))
    ids, mask = random_prompts(4, PROMPT, seed=3)
    mask[1, :30], ids[1, :30] = 0, 1  # one row whose first block is nearly all padding
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32,
                         prefill_chunk=chunk)
    with Engine(from_hf_config(folder), policy, Workload(PROMPT, GEN), opts) as engine:
        return engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True), ids, mask


@pytest.mark.parametrize("tier,bits", [(tier, 4) for tier in TIERS] + [("gpu", 2)])
def test_engine_equals_transformers_attending_the_same_rounded_cache(llama, tmp_path, tier, bits, monkeypatch):
    from transformers.models.llama import modeling_llama

    model, folder = llama
    result, ids, mask = engine_run(folder, tmp_path, tier, bits=bits)
    monkeypatch.setitem(modeling_llama.ALL_ATTENTION_FUNCTIONS, "eager", kivi_eager_attention(kivi_spec(bits)))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=GEN, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=1)
    assert torch.equal(result.tokens, ref.sequences[:, PROMPT:])
    for ours, theirs in zip(result.step_logits, ref.logits):
        assert rel_err(ours, theirs) < 1e-4


def test_chunked_prefill_writes_the_same_blocks(llama, tmp_path):
    whole, _, _ = engine_run(llama[1], tmp_path, "gpu")
    chunked, _, _ = engine_run(llama[1], tmp_path, "cpu-streamed", chunk=20)
    assert torch.equal(whole.tokens, chunked.tokens)
    for a, b in zip(whole.step_logits, chunked.step_logits):
        assert rel_err(a, b) < 1e-5


def test_the_codec_flags_say_what_to_change(capsys):
    from offload_engine.cli import main

    common = ["run", "--model", "opt-125m", "--dry-run", "--prompt-len", "64", "--gen-len", "8"]
    assert main(common + ["--cache-codec", "kivi"]) == 2
    assert "--cache-codec applies to a compressed KV cache" in capsys.readouterr().err
    assert main(common + ["--compress-cache", "--cache-codec", "kivi", "--kv-policy", "h2o"]) == 2
    err = capsys.readouterr().err
    assert "--cache-codec token" in err and "Traceback" not in err


def test_default_codec_follows_the_kv_policy():
    from offload_engine.cli import build_parser
    from offload_engine.cli.options import policy_from_args

    parser = build_parser()
    full = policy_from_args(parser.parse_args(["run", "--model", "opt-125m", "--compress-cache"]))
    h2o = policy_from_args(parser.parse_args(["run", "--model", "opt-125m", "--compress-cache", "--kv-policy", "h2o"]))
    assert full.compress_cache.keys_per_channel and not h2o.compress_cache.keys_per_channel
