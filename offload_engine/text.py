"""Text in, text out: an engine with the checkpoint's tokenizer, and generation from strings.

    engine = Engine.from_pretrained("smollm2-135m", Policy(gpu_batch_size=4))
    out = engine.generate(["In the beginning", "And God said"])
    print(out.texts)

The CLI's `generate` command runs exactly these functions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from .checkpoints.tokenizer import Tokenizer, load_tokenizer
from .errors import EngineError
from .model_zoo import ResolvedModel, resolve_model
from .sampling import GenerationConfig


@dataclass
class TextResult:
    texts: list[str]  # the generated continuation of each prompt, cut at the stop token
    token_ids: list[list[int]]  # the generated ids, cut the same way
    prompt_tokens: list[int]  # prompt length in tokens, per prompt
    prefill_s: float = 0.0
    decode_s: float = 0.0


def resolve_with_tokenizer(model: str | Path) -> tuple[ResolvedModel, Tokenizer]:
    resolved = resolve_model(str(model))
    if resolved.source is None:
        raise EngineError(f"--model {model} has no tokenizer: random weights cannot produce text.",
                          "Use a checkpoint folder with its tokenizer files, a .gguf file, or smollm2-135m.")
    return resolved, load_tokenizer(resolved.source)


def encode_prompts(tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    if not prompts:
        raise EngineError("no prompts given.", "Pass --prompt TEXT (repeatable) or --prompts FILE.")
    encoded = [tokenizer.encode(p) for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise EngineError(f"prompt {empty[0] + 1} is empty.", "Give every prompt some text.")
    return encoded


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def plan_workload(config, prompt_len: int, max_new_tokens: int) -> Workload:
    if prompt_len + max_new_tokens - 1 > config.max_positions:  # the last new token is never fed back
        raise EngineError(f"the longest prompt ({prompt_len} tokens) + {max_new_tokens} new tokens exceed "
                          f"{config.name}'s {config.max_positions} positions.", "Shorten the prompt or --max-new-tokens.")
    return Workload(prompt_len, max_new_tokens)


def from_pretrained(model: str | Path, policy: Policy | None = None, max_prompt_len: int = 512,
                    max_new_tokens: int = 128, options=None):
    """An Engine for a checkpoint (folder, .gguf or smollm2-135m) with its tokenizer attached,
    planned for prompts of up to `max_prompt_len` tokens and `max_new_tokens` new ones."""
    from .engine import Engine, EngineOptions

    resolved, tokenizer = resolve_with_tokenizer(model)
    workload = plan_workload(resolved.config, max_prompt_len, max_new_tokens)
    opts = dataclasses.replace(options or EngineOptions(), checkpoint=resolved.source)
    engine = Engine(resolved.config, policy or Policy(gpu_batch_size=1), workload, opts)
    engine.tokenizer = tokenizer
    return engine


def generate_text(engine, prompts: list[str], config: GenerationConfig | None = None, on_step=None) -> TextResult:
    """Generate for any number of prompts, in batches of the policy's batch size."""
    tokenizer: Tokenizer | None = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise EngineError("this engine has no tokenizer.", "Build it with Engine.from_pretrained, or pass token ids.")
    encoded = encode_prompts(tokenizer, prompts)
    stop = tokenizer.eos_token_id
    cfg = config or GenerationConfig(max_new_tokens=engine.workload.gen_len, stop_token_id=stop)
    batch = engine.policy.batch_size
    result = TextResult([], [], [len(e) for e in encoded])
    for start in range(0, len(encoded), batch):
        rows = encoded[start:start + batch]
        ids, mask = left_pad(rows, engine.model.pad_token_id)
        out = engine.generate(ids, mask, cfg, on_step=on_step)
        result.prefill_s += out.prefill_s
        result.decode_s += out.decode_s
        for row in out.tokens.tolist():
            if cfg.stop_token_id is not None and cfg.stop_token_id in row:
                row = row[:row.index(cfg.stop_token_id)]
            result.token_ids.append(row)
            result.texts.append(tokenizer.decode(row))
    return result
