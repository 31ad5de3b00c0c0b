"""OPT (Zhang et al., 2022): learned positions with an offset of 2, pre- or post-LayerNorm,
ReLU MLP, LM head tied to the token embedding (or a separate `lm_head.weight` when untied)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from .base import KVSpec, Layer, LayerContext, WeightSpec
from .ops import (embedding, layer_norm as _layer_norm, linear as _linear, linear_relu, linear_specs as _linear_specs,
                  lm_head)

POSITION_OFFSET = 2  # OPT's learned position table starts two rows in


def _norm_specs(name: str, key: str, dim: int) -> list[WeightSpec]:
    return [WeightSpec(f"{name}.weight", f"{key}.weight", (dim,), "norm_weight"),
            WeightSpec(f"{name}.bias", f"{key}.bias", (dim,), "bias")]


@dataclass
class InputEmbed(Layer):
    cfg: ModelConfig
    name: str = "embed"

    def weight_specs(self):
        c = self.cfg
        specs = [WeightSpec("tokens", "decoder.embed_tokens.weight", (c.vocab_size, c.embed_dim)),
                 WeightSpec("positions", "decoder.embed_positions.weight",
                            (c.max_positions + POSITION_OFFSET, c.hidden_size))]
        if c.word_embed_dim:
            specs += _linear_specs("project_in", "decoder.project_in", c.hidden_size, c.embed_dim, bias=False)
        return specs

    def forward(self, ids, w, ctx):
        x = embedding(ids, w["tokens"])
        if self.cfg.word_embed_dim:
            x = _linear(x, w, "project_in")
        return x + embedding(ctx.batch.positions + POSITION_OFFSET, w["positions"])

    def working_bytes(self, batch, seq, itemsize):
        return batch * seq * (self.cfg.embed_dim + 2 * self.cfg.hidden_size) * itemsize


@dataclass
class SelfAttention(Layer):
    cfg: ModelConfig
    index: int
    name: str = ""

    def __post_init__(self):
        self.name = f"attn{self.index}"
        self.kv_spec = KVSpec(self.cfg.kv_heads, self.cfg.head_dim, self.cfg.num_heads)

    def weight_specs(self):
        h, key = self.cfg.hidden_size, f"decoder.layers.{self.index}"
        specs = []
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += _linear_specs(proj, f"{key}.self_attn.{proj}", h, h)
        return specs + _norm_specs("attn_norm", f"{key}.self_attn_layer_norm", h)

    def forward(self, x, w, ctx: LayerContext):
        c = self.cfg
        b, s, _ = x.shape
        h = _layer_norm(x, w, "attn_norm", c.layer_norm_eps) if c.layer_norm_before else x
        q = _linear(h, w, "q_proj") * c.head_dim ** -0.5
        k = _linear(h, w, "k_proj")
        v = _linear(h, w, "v_proj")
        shape = (b, s, c.num_heads, c.head_dim)
        out = ctx.kv.attend(q.view(shape), k.view(shape), v.view(shape))
        x = x + _linear(out.reshape(b, s, c.hidden_size), w, "out_proj")
        return x if c.layer_norm_before else _layer_norm(x, w, "attn_norm", c.layer_norm_eps)

    def working_bytes(self, batch, seq, itemsize):
        return 8 * batch * seq * self.cfg.hidden_size * itemsize


@dataclass
class MLP(Layer):
    cfg: ModelConfig
    index: int
    name: str = ""
    fuses_after_attention = True

    def __post_init__(self):
        self.name = f"mlp{self.index}"

    def weight_specs(self):
        c, key = self.cfg, f"decoder.layers.{self.index}"
        return (_linear_specs("fc1", f"{key}.fc1", c.ffn_dim, c.hidden_size)
                + _linear_specs("fc2", f"{key}.fc2", c.hidden_size, c.ffn_dim)
                + _norm_specs("mlp_norm", f"{key}.final_layer_norm", c.hidden_size))

    def forward(self, x, w, ctx):
        c = self.cfg
        h = _layer_norm(x, w, "mlp_norm", c.layer_norm_eps) if c.layer_norm_before else x
        h = linear_relu(h, w, "fc1")
        x = x + _linear(h, w, "fc2")
        return x if c.layer_norm_before else _layer_norm(x, w, "mlp_norm", c.layer_norm_eps)

    def working_bytes(self, batch, seq, itemsize):
        return batch * seq * (4 * self.cfg.hidden_size + self.cfg.ffn_dim) * itemsize


@dataclass
class OutputEmbed(Layer):
    cfg: ModelConfig
    name: str = "lm_head"

    def weight_specs(self):
        c = self.cfg
        specs = _norm_specs("final_norm", "decoder.final_layer_norm", c.hidden_size) if c.final_layer_norm else []
        if c.word_embed_dim:
            specs += _linear_specs("project_out", "decoder.project_out", c.embed_dim, c.hidden_size, bias=False)
        head = "decoder.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        return specs + [WeightSpec("tokens", head, (c.vocab_size, c.embed_dim))]

    def forward(self, x, w, ctx):
        c = self.cfg
        if not ctx.all_logits:
            x = x[:, -1:]
        if c.final_layer_norm:
            x = _layer_norm(x, w, "final_norm", c.layer_norm_eps)
        if c.word_embed_dim:
            x = _linear(x, w, "project_out")
        return lm_head(x, w["tokens"])

    def working_bytes(self, batch, seq, itemsize):
        # Only the last position reaches the LM head during generation.
        return batch * (self.cfg.vocab_size * (itemsize + 4) + 2 * self.cfg.hidden_size * itemsize)


def build_layers(cfg: ModelConfig) -> list[Layer]:
    layers: list[Layer] = [InputEmbed(cfg)]
    for i in range(cfg.num_layers):
        layers += [SelfAttention(cfg, i), MLP(cfg, i)]
    return layers + [OutputEmbed(cfg)]
