"""Llama (Touvron et al., 2023) and its descendants (Llama 2/3.1, SmolLM2): RMSNorm, rotary
positions, grouped-query attention, SwiGLU MLP, tied or separate LM head.

Keys are cached after rotation, so a KV policy that evicts or skips tokens never shifts the
positions of the tokens it keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .base import KVSpec, Layer, LayerContext, WeightSpec
from .ops import apply_rope, embedding, linear, linear_specs, lm_head, rms_norm, rope_cos_sin, rope_inv_freq


def _norm_spec(name: str, key: str, dim: int) -> WeightSpec:
    return WeightSpec(f"{name}.weight", f"{key}.weight", (dim,), "norm_weight")


@dataclass
class InputEmbed(Layer):
    cfg: ModelConfig
    name: str = "embed"

    def weight_specs(self):
        return [WeightSpec("tokens", "embed_tokens.weight", (self.cfg.vocab_size, self.cfg.hidden_size))]

    def forward(self, ids, w, ctx):
        return embedding(ids, w["tokens"])

    def working_bytes(self, batch, seq, itemsize):
        return 2 * batch * seq * self.cfg.hidden_size * itemsize


@dataclass
class SelfAttention(Layer):
    cfg: ModelConfig
    index: int
    name: str = ""
    inv_freq: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.name = f"attn{self.index}"
        self.kv_spec = KVSpec(self.cfg.kv_heads, self.cfg.head_dim, self.cfg.num_heads)
        self.inv_freq = rope_inv_freq(self.cfg)

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The frequencies on the compute device, copied once (a captured step cannot copy)."""
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def weight_specs(self):
        c, key = self.cfg, f"layers.{self.index}"
        q_dim, kv_dim = c.num_heads * c.head_dim, c.kv_heads * c.head_dim
        return (linear_specs("q_proj", f"{key}.self_attn.q_proj", q_dim, c.hidden_size, bias=False)
                + linear_specs("k_proj", f"{key}.self_attn.k_proj", kv_dim, c.hidden_size, bias=False)
                + linear_specs("v_proj", f"{key}.self_attn.v_proj", kv_dim, c.hidden_size, bias=False)
                + linear_specs("o_proj", f"{key}.self_attn.o_proj", c.hidden_size, q_dim, bias=False)
                + [_norm_spec("attn_norm", f"{key}.input_layernorm", c.hidden_size)])

    def forward(self, x, w, ctx: LayerContext):
        c = self.cfg
        b, s, _ = x.shape
        h = rms_norm(x, w["attn_norm.weight"], c.rms_norm_eps)
        q = linear(h, w, "q_proj").view(b, s, c.num_heads, c.head_dim)
        k = linear(h, w, "k_proj").view(b, s, c.kv_heads, c.head_dim)
        v = linear(h, w, "v_proj").view(b, s, c.kv_heads, c.head_dim)
        cos, sin = ctx.batch.cached("rope", lambda: rope_cos_sin(self._inv_freq_on(x.device), ctx.batch.positions,
                                                                 x.dtype))
        q = apply_rope(q, cos, sin) * c.head_dim ** -0.5
        k = apply_rope(k, cos, sin)
        out = ctx.kv.attend(q, k, v)
        return x + linear(out.reshape(b, s, c.num_heads * c.head_dim), w, "o_proj")

    def working_bytes(self, batch, seq, itemsize):
        c = self.cfg
        qkv = (c.num_heads + 2 * c.kv_heads) * c.head_dim
        return batch * seq * (3 * c.hidden_size + 2 * qkv + 2 * c.num_heads * c.head_dim) * itemsize


@dataclass
class MLP(Layer):
    cfg: ModelConfig
    index: int
    name: str = ""
    fuses_after_attention = True

    def __post_init__(self):
        self.name = f"mlp{self.index}"

    def weight_specs(self):
        c, key = self.cfg, f"layers.{self.index}"
        return (linear_specs("gate_proj", f"{key}.mlp.gate_proj", c.ffn_dim, c.hidden_size, bias=False)
                + linear_specs("up_proj", f"{key}.mlp.up_proj", c.ffn_dim, c.hidden_size, bias=False)
                + linear_specs("down_proj", f"{key}.mlp.down_proj", c.hidden_size, c.ffn_dim, bias=False)
                + [_norm_spec("mlp_norm", f"{key}.post_attention_layernorm", c.hidden_size)])

    def forward(self, x, w, ctx):
        h = rms_norm(x, w["mlp_norm.weight"], self.cfg.rms_norm_eps)
        h = F.silu(linear(h, w, "gate_proj")) * linear(h, w, "up_proj")
        return x + linear(h, w, "down_proj")

    def working_bytes(self, batch, seq, itemsize):
        return batch * seq * (3 * self.cfg.hidden_size + 3 * self.cfg.ffn_dim) * itemsize


@dataclass
class OutputEmbed(Layer):
    cfg: ModelConfig
    name: str = "lm_head"

    def weight_specs(self):
        c = self.cfg
        head = "embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        return [_norm_spec("final_norm", "norm", c.hidden_size),
                WeightSpec("tokens", head, (c.vocab_size, c.hidden_size))]

    def forward(self, x, w, ctx):
        if not ctx.all_logits:
            x = x[:, -1:]
        return lm_head(rms_norm(x, w["final_norm.weight"], self.cfg.rms_norm_eps), w["tokens"])

    def working_bytes(self, batch, seq, itemsize):
        return batch * (self.cfg.vocab_size * (itemsize + 4) + 2 * self.cfg.hidden_size * itemsize)


def build_layers(cfg: ModelConfig) -> list[Layer]:
    layers: list[Layer] = [InputEmbed(cfg)]
    for i in range(cfg.num_layers):
        layers += [SelfAttention(cfg, i), MLP(cfg, i)]
    return layers + [OutputEmbed(cfg)]
