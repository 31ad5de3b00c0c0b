"""Model families. Each builds an ordered list of `Layer`s from a `ModelConfig`."""
from __future__ import annotations

from ..config import ModelConfig
from . import llama, opt
from .base import FusedLayer, Layer

FAMILIES = {"opt": opt.build_layers, "llama": llama.build_layers}


def build_layers(config: ModelConfig, sep_layer: bool = True) -> list[Layer]:
    """The layer list; without `sep_layer`, each attention layer is fused with the MLP after it."""
    layers = FAMILIES[config.family](config)
    if sep_layer:
        return layers
    fused: list[Layer] = []
    for layer in layers:
        follows_attention = fused and fused[-1].kv_spec is not None and not isinstance(fused[-1], FusedLayer)
        if follows_attention and getattr(layer, "fuses_after_attention", False):
            fused[-1] = FusedLayer([fused[-1], layer])
        else:
            fused.append(layer)
    return fused
