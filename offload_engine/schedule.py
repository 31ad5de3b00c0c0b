"""FlexGen's zig-zag block schedule for one generation step.

For each layer, all GPU batches run back to back so one load of the layer's weights serves
the whole block; while (layer j, batch k) computes, the next layers' weights, the next
batch's KV cache and hidden states are being loaded, and finished results are being stored.

A long prompt is prefilled in chunks of `prefill_chunk` tokens inside each layer (the weights
are still loaded once per layer): each chunk attends the cache so far, and its keys and values
go home as soon as it is done, so the layer's working memory follows the chunk, not the prompt.
"""
from __future__ import annotations

import torch

from .activations import ActivationStore
from .batch import BatchState
from .kv import KVCacheStore
from .models.base import BatchView, Layer, LayerContext
from .profiler import Profiler
from .weight_store import WeightStore


class Scheduler:
    def __init__(self, layers: list[Layer], weights: WeightStore, kv: KVCacheStore, acts: ActivationStore,
                 profiler: Profiler, device: torch.device):
        self.layers, self.weights, self.kv, self.acts = layers, weights, kv, acts
        self.profiler = profiler
        self.prefill_chunk: int | None = None  # tokens per prefill chunk; None: the whole prompt at once
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
                with self.profiler.span("compute", self.compute_stream):
                    if prefill and self._chunked(layer, j, num_new, all_logits):
                        y = self._forward_chunks(layer, x, weights, (j, ids[k]), states[k], views[k], all_logits)
                    else:
                        kv = self.kv.access((j, ids[k]), states[k], prefill) if layer.kv_spec is not None else None
                        y = layer.forward(x, weights, LayerContext(views[k], kv, all_logits))
                if j + 1 < n_layers:
                    self.acts.put(k, y, decode=not prefill)
                else:
                    outputs[k] = y
        if advance:
            for st in states:
                st.advance(num_new)
        return outputs

    def _chunked(self, layer: Layer, j: int, num_new: int, all_logits: bool) -> bool:
        """Whether this prefill runs the layer chunk by chunk (the LM head of the last position
        alone needs no chunks)."""
        if self.prefill_chunk is None or num_new <= self.prefill_chunk:
            return False
        return layer.kv_spec is not None or all_logits or j + 1 < len(self.layers)

    def _forward_chunks(self, layer: Layer, x: torch.Tensor, weights, item, state: BatchState, view: BatchView,
                        all_logits: bool) -> torch.Tensor:
        """The layer over the prompt, `prefill_chunk` tokens at a time, each chunk after the
        cache of the ones before it."""
        s, step = x.shape[1], self.prefill_chunk
        out = None
        for start in range(0, s, step):
            stop = min(start + step, s)
            part = BatchView(positions=view.positions[:, start:stop], prefill=True, memo=view.memo.setdefault(start, {}))
            with state.at(start):
                kv = self.kv.access(item, state, True, chunked=True) if layer.kv_spec is not None else None
                y = layer.forward(x[:, start:stop], weights, LayerContext(part, kv, all_logits))
            if out is None:  # hidden states in, hidden states out: the output replaces the input,
                # chunk by chunk (a chunk reads only its own rows; earlier ones reach it as KV cache)
                same = x.is_floating_point() and x.shape[2:] == y.shape[2:] and x.dtype == y.dtype
                out = x if same else y.new_empty(y.shape[0], s, *y.shape[2:])
            out[:, start:stop] = y
        return out
