"""FlexGen's zig-zag block schedule for one generation step.

For each layer, all GPU batches run back to back so one load of the layer's weights serves
the whole block; while (layer j, batch k) computes, the next layers' weights, the next
batch's KV cache and hidden states are being loaded, and finished results are being stored.
"""
from __future__ import annotations

import torch

from .activations import ActivationStore
from .batch import BatchState
from .kv import KVCacheStore
from .models.base import Layer, LayerContext
from .profiler import Profiler
from .weight_store import WeightStore


class Scheduler:
    def __init__(self, layers: list[Layer], weights: WeightStore, kv: KVCacheStore, acts: ActivationStore,
                 profiler: Profiler, device: torch.device):
        self.layers, self.weights, self.kv, self.acts = layers, weights, kv, acts
        self.profiler = profiler
        self.compute_stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def step(self, inputs: list[torch.Tensor], states: list[BatchState], all_logits: bool = False,
             advance: bool = True, batch_ids: list[int] | None = None) -> list[torch.Tensor]:
        """Run every layer on every GPU batch; `inputs` are the first layer's inputs per batch
        (token ids (B, s), or hidden states on a later pipeline stage); returns the last layer's outputs.

        `advance=False` leaves the states' lengths alone (a captured step advances them outside);
        `batch_ids`: which KV items the batches own (a pipeline stage runs one block of several)."""
        num_new = inputs[0].shape[1]
        prefill = states[0].length == 0
        views = [st.view(num_new, prefill) for st in states]
        n_layers, n_batches = len(self.layers), len(states)
        outputs: list[torch.Tensor] = [None] * n_batches  # type: ignore[list-item]
        ids = batch_ids if batch_ids is not None else range(n_batches)
        weights = None
        for j, layer in enumerate(self.layers):
            for k in range(n_batches):
                if k == 0:
                    weights = self.weights.get(j)  # also starts loading the next streamed layers
                nj, nk = (j, k + 1) if k + 1 < n_batches else (j + 1, 0)
                if nj < n_layers:
                    if self.layers[nj].kv_spec is not None:
                        self.kv.prefetch((nj, ids[nk]), states[nk], prefill)
                    if nj > 0:
                        self.acts.prefetch(nk)
                x = inputs[k] if j == 0 else self.acts.get(k)
                kv = self.kv.access((j, ids[k]), states[k], prefill) if layer.kv_spec is not None else None
                ctx = LayerContext(views[k], kv, all_logits)
                with self.profiler.span("compute", self.compute_stream):
                    y = layer.forward(x, weights, ctx)
                if j + 1 < n_layers:
                    self.acts.put(k, y)
                else:
                    outputs[k] = y
        if advance:
            for st in states:
                st.advance(num_new)
        return outputs
