"""Which 4/2-bit KV cache keeps perplexity: simulated quantization schemes on the real model.

  PYTHONPATH=. python experiments/kv_quant_simulation.py --context 1024 --windows 2 \
      --out experiments/results/kv_quant_simulation

transformers' SmolLM2-135M (from the packaged GGUF, fp32, eager attention) scores KJV windows
while every attention layer sees its keys and values round-tripped through a scheme (keys after
rotation, as the engine caches them); the `recent` newest tokens of each query stay exact, as a
16-bit residual would keep them. Schemes (asymmetric, round to nearest):
  token   keys and values grouped per token along the head dimension, groups of 64: the
          engine's codec today (FlexGen's)
  kivi    keys grouped per channel over blocks of 32 tokens, values per token (KIVI)
  chan    keys centred and scaled per channel (from the first 32 tokens), then per token
This is a probe of the codec's design, not the engine's path: the engine's own numbers are in
experiments/results/accuracy. Writes <out>/kv_quant_simulation_<context>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.checkpoints.gguf import find_packaged_gguf  # noqa: E402
from offload_engine.metrics import git_commit, hardware, write_json_atomic  # noqa: E402
from offload_engine.perplexity import text_windows  # noqa: E402
from offload_engine.text import resolve_with_tokenizer  # noqa: E402

SCHEMES = [("exact", 16, 0), ("token", 4, 1), ("token", 4, 32), ("kivi", 4, 1), ("kivi", 4, 32), ("kivi", 4, 128),
           ("chan", 4, 1), ("chan", 4, 32), ("token", 2, 128), ("kivi", 2, 32), ("kivi", 2, 128)]


def round_trip(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """x quantized in groups of `group` along `dim` (min/max, 2^bits levels) and back."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    g = F.pad(x, (0, (-n) % group)).unflatten(-1, (-1, group))
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((high - low) / (2 ** bits - 1)).clamp_min(1e-8)
    g = ((g - low) / step).round().clamp(0, 2 ** bits - 1) * step + low
    return g.flatten(-2)[..., :n].movedim(-1, dim)


def quantized_kv(key, value, scheme: str, bits: int):
    if scheme == "exact":
        return key, value
    if scheme == "token":
        return round_trip(key, bits, 64, -1), round_trip(value, bits, 64, -1)
    if scheme == "chan":  # per-channel centre and scale from the first 32 tokens, then per token
        first = key[:, :, :32]
        centre = first.mean(2, keepdim=True)
        scale = (first - centre).abs().amax(2, keepdim=True).clamp_min(1e-4)
        return round_trip((key - centre) / scale, bits, 64, -1) * scale + centre, round_trip(value, bits, 64, -1)
    full = key.shape[2] // 32 * 32  # kivi: the last partial block is the residual
    k = key.clone()
    k[:, :, :full] = round_trip(key[:, :, :full], bits, 32, 2)
    return k, round_trip(value, bits, 64, -1)


def attention_with(scheme: str, bits: int, recent: int):
    """An eager attention for transformers' Llama: the `recent` newest keys of each query exact,
    the older ones through the scheme."""
    def forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        kq, vq = quantized_kv(key, value, scheme, bits)
        group = query.shape[1] // key.shape[1]
        k, v, kq, vq = (x.repeat_interleave(group, 1) for x in (key, value, kq, vq))
        t = query.shape[2]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        near = (i - j < recent) & (j <= i)
        scores = torch.where(near, query @ k.transpose(-1, -2), query @ kq.transpose(-1, -2)) * scaling
        probs = scores.masked_fill(j > i, float("-inf")).softmax(-1)
        return ((probs * near) @ v + (probs * ~near) @ vq).transpose(1, 2).contiguous(), None
    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import transformers
    from transformers.models.llama import modeling_llama

    torch.set_grad_enabled(False)
    path = find_packaged_gguf()
    model = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    _, tokenizer = resolve_with_tokenizer("smollm2-135m")
    text = (ROOT / "tests" / "data" / "kjv-exodus-matthew-john.txt").read_text()
    windows = text_windows(tokenizer.encode(text), args.context, args.windows)
    rows = []
    for scheme, bits, recent in SCHEMES:
        modeling_llama.ALL_ATTENTION_FUNCTIONS["eager"] = attention_with(scheme, bits, recent)
        start, nll = time.time(), 0.0
        for w in windows:
            nll += F.cross_entropy(model(w[None]).logits[0, :-1].float(), w[1:], reduction="sum").item()
        ppl = math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))
        rows.append({"scheme": scheme, "bits": bits, "recent_exact": recent, "ppl": ppl, "seconds": time.time() - start})
        print(f"{scheme:>6} {bits:>2}-bit, {recent:>3} recent exact: ppl {ppl:.4f} "
              f"({ppl / rows[0]['ppl'] - 1:+.1%})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"kv_quant_simulation_{args.context}.json",
                      {"model": "smollm2-135m", "context": args.context, "windows": args.windows, "rows": rows,
                       "hardware": hardware(), "commit": git_commit(), "command": sys.argv})


if __name__ == "__main__":
    main()
