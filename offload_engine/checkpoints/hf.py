"""Hugging Face checkpoint folders: config.json, and `*.safetensors` or `pytorch_model*.bin`
weights, single or sharded with an index file. Tensors are read one at a time (memory-mapped),
so loading never holds a second copy of the model in host memory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import ModelConfig, RopeScaling, check_real, check_size
from ..errors import EngineError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def read_config_json(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise EngineError(f"{folder} has no config.json.", "Point --model at a Hugging Face checkpoint folder.") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"{folder / 'config.json'} is not valid JSON ({e}).", "Fix or re-download it.") from None


def _rope_scaling(raw: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either config style: transformers 5's `rope_parameters` or the
    older `rope_theta` + `rope_scaling`."""
    params = raw.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    return theta, RopeScaling(kind, float(scaling.get("factor", 1.0)),
                              float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0)),
                              int(scaling.get("original_max_position_embeddings", 8192)))


def _opt_config(raw: dict, name: str) -> ModelConfig:
    if raw.get("enable_bias", True) is False or raw.get("layer_norm_elementwise_affine", True) is False:
        raise EngineError(f"{name}: OPT variants without biases or LayerNorm affine weights are not supported.")
    hidden = raw["hidden_size"]
    proj = raw.get("word_embed_proj_dim") or hidden
    pre_ln = raw.get("do_layer_norm_before", True)
    return ModelConfig(
        name=name, family="opt", num_layers=raw["num_hidden_layers"], hidden_size=hidden,
        num_heads=raw["num_attention_heads"], ffn_dim=raw["ffn_dim"], vocab_size=raw["vocab_size"],
        max_positions=raw.get("max_position_embeddings", 2048), word_embed_dim=proj if proj != hidden else None,
        layer_norm_before=pre_ln, final_layer_norm=pre_ln and not raw.get("_remove_final_layer_norm", False),
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        pad_token_id=_first(raw.get("pad_token_id"), 1), bos_token_id=_first(raw.get("bos_token_id"), 2),
        eos_token_id=_first(raw.get("eos_token_id"), 2))


def _first(value, default):
    """Token ids may be lists (several EOS tokens): the engine stops on the first."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else value


def _llama_config(raw: dict, name: str) -> ModelConfig:
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise EngineError(f"{name}: Llama variants with {flag} are not supported.")
    if raw.get("hidden_act", "silu") != "silu":
        raise EngineError(f"{name}: activation '{raw['hidden_act']}' is not supported (Llama uses silu).")
    theta, scaling = _rope_scaling(raw)
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    eos = _first(raw.get("eos_token_id"), 2)
    return ModelConfig(
        name=name, family="llama", num_layers=raw["num_hidden_layers"], hidden_size=hidden, num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads, ffn_dim=raw["intermediate_size"],
        head_dim_override=head_dim if head_dim and head_dim != hidden // heads else None,
        vocab_size=raw["vocab_size"], max_positions=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False), rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, bos_token_id=_first(raw.get("bos_token_id"), 1), eos_token_id=eos,
        pad_token_id=_first(raw.get("pad_token_id"), eos))


PARSERS = {"opt": _opt_config, "llama": _llama_config}
# The keys each family reads as sizes (checked by their config.json names, before anything uses them).
SIZE_KEYS = {"opt": ("num_hidden_layers", "hidden_size", "num_attention_heads", "ffn_dim", "vocab_size",
                     "max_position_embeddings", "word_embed_proj_dim"),
             "llama": ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                       "max_position_embeddings", "num_key_value_heads", "head_dim")}
REAL_KEYS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")


def _check_values(raw: dict, kind: str, source: str) -> None:
    """Sizes are whole numbers in range and epsilons real numbers, or one line naming the key."""
    fix = "Fix or re-download the checkpoint's config."
    for key in SIZE_KEYS[kind]:
        if raw.get(key) is not None:
            check_size(raw[key], key, source, fix)
    params = raw.get("rope_parameters")
    for key, value in [(k, raw.get(k)) for k in REAL_KEYS] + \
            [("rope_parameters.rope_theta", params.get("rope_theta") if isinstance(params, dict) else None)]:
        if value is not None:
            check_real(value, key, source, fix)


def config_from_dict(raw: dict, name: str, source: str) -> ModelConfig:
    """A ModelConfig from a Hugging Face style config dict (config.json, or GGUF metadata mapped to it)."""
    if not isinstance(raw, dict):
        raise EngineError(f"{source} is not a JSON object.", "Fix or re-download the checkpoint's config.")
    kind = raw.get("model_type")
    if kind not in PARSERS:
        raise EngineError(f"{source} holds a '{kind}' model; supported families: {', '.join(PARSERS)}.",
                          "Use an OPT or Llama-architecture checkpoint.")
    _check_values(raw, kind, source)
    try:
        cfg = PARSERS[kind](raw, name)
    except KeyError as e:
        raise EngineError(f"{source} lacks the key {e}.", "Fix or re-download the checkpoint's config.") from None
    except (TypeError, ValueError) as e:
        raise EngineError(f"{source} has an invalid value ({e}).", "Fix or re-download the checkpoint's config.") from None
    for field in ("rms_norm_eps", "layer_norm_eps", "rope_theta"):
        if not math.isfinite(getattr(cfg, field)):
            raise EngineError(f"{source}: {field} is not a finite number.")
    return cfg.validate()


def from_hf_config(folder: Path) -> ModelConfig:
    return config_from_dict(read_config_json(folder), folder.name, str(folder / "config.json"))


class HFCheckpoint:
    """Lazy access to the tensors of a checkpoint folder by key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._open: dict[Path, object] = {}
        self.key_to_file = self._index()

    def _index(self) -> dict[str, Path]:
        for name in INDEX_FILES:
            index = self.folder / name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise EngineError(f"{index} is not a valid checkpoint index ({e}).", "Re-download it.") from None
                files = {k: self.folder / f for k, f in weight_map.items()}
                for f in sorted(set(files.values())):
                    if not f.exists():
                        raise EngineError(f"checkpoint shard {f.name} listed in {name} is missing from {self.folder}.",
                                          "Re-download the checkpoint or restore that file.")
                return files
        for name in SINGLE_FILES:
            f = self.folder / name
            if f.exists():
                return {k: f for k in self._handle(f).keys()}
        raise EngineError(f"no weights in {self.folder}: expected {' or '.join(SINGLE_FILES + INDEX_FILES)}.",
                          "Point --model at a checkpoint folder, or pass --dummy for random weights.")

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open
                    self._open[f] = safe_open(str(f), framework="pt")
                else:
                    self._open[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # truncated or corrupt files fail in many library-specific ways
                raise EngineError(f"cannot read checkpoint file {f.name}: {str(e).splitlines()[0][:200]}",
                                  "The file is truncated or corrupt; re-download it.") from None
        return self._open[f]

    def get(self, key: str) -> torch.Tensor | None:
        for k in (key, "model." + key):
            if k in self.key_to_file:
                f = self.key_to_file[k]
                try:
                    h = self._handle(f)
                    return h.get_tensor(k) if f.suffix == ".safetensors" else h[k]
                except EngineError:
                    raise
                except Exception as e:
                    raise EngineError(f"cannot read tensor {k} from {f.name}: {str(e).splitlines()[0][:200]}",
                                      "The file is truncated or corrupt; re-download it.") from None
        return None
