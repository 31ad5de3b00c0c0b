"""OPT configurations: the layer definitions give each published model its parameter count."""
from __future__ import annotations

import json

import pytest

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.model_zoo import OPT_CONFIGS, resolve_model
from offload_engine.errors import EngineError
from offload_engine.models import build_layers

from conftest import tiny_hf_opt

# Parameter counts of the released checkpoints (tied LM head counted once).
PUBLISHED_PARAMS = {"opt-125m": 125.2e6, "opt-350m": 331.2e6, "opt-1.3b": 1.316e9, "opt-2.7b": 2.652e9,
                    "opt-6.7b": 6.658e9, "opt-13b": 12.853e9, "opt-30b": 29.975e9, "opt-66b": 65.7e9,
                    "opt-175b": 175e9}


@pytest.mark.parametrize("name", list(OPT_CONFIGS))
def test_parameter_count(name):
    specs = {s.key: s for layer in build_layers(OPT_CONFIGS[name]) for s in layer.weight_specs()}
    params = sum(s.numel() for s in specs.values())
    assert params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


def test_opt_350m_shape():
    cfg = OPT_CONFIGS["opt-350m"]
    keys = {s.key for layer in build_layers(cfg) for s in layer.weight_specs()}
    assert not cfg.layer_norm_before and not cfg.final_layer_norm and cfg.embed_dim == 512
    assert {"decoder.project_in.weight", "decoder.project_out.weight"} <= keys
    assert "decoder.final_layer_norm.weight" not in keys


@pytest.mark.parametrize("pre_ln", [True, False])
def test_hf_config_roundtrip(tmp_path, pre_ln):
    model = tiny_hf_opt(pre_ln)
    model.config.save_pretrained(tmp_path)
    cfg = from_hf_config(tmp_path)
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    ours = {"model." + s.key for layer in build_layers(cfg) for s in layer.weight_specs()}
    assert ours == expected


def test_resolve_names_and_errors(tmp_path):
    assert resolve_model("opt-6.7b").config is OPT_CONFIGS["opt-6.7b"]
    assert resolve_model("opt-6.7b").source is None
    with pytest.raises(EngineError, match="unknown model"):
        resolve_model("gpt-2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(EngineError, match="'gpt2' model; supported families: opt, llama"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["./opt-1.3b", "./typo/opt-125m", "facebook/opt-125m", "~/nowhere/model.gguf"])
def test_a_path_that_does_not_exist_is_refused(name):
    """Random weights only for a bare published name or --dummy: a missing path never falls back."""
    with pytest.raises(EngineError, match="no such file or folder"):
        resolve_model(name)


def test_dummy_accepts_a_hub_style_name():
    resolved = resolve_model("facebook/opt-125m", dummy=True)
    assert resolved.config is OPT_CONFIGS["opt-125m"] and resolved.source is None
    assert resolved.weights_label == "dummy weights"
