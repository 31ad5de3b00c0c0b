"""Perplexity, defined so that any two tools agree:

tokenize the whole text without special tokens; take the first W non-overlapping windows of N
tokens; perplexity = exp(mean negative log-likelihood of every token of each window given the
tokens before it in that window), i.e. N - 1 predictions per window.

How a KV policy is applied:
- full and HiP: one prefill over the window with every position's logits (HiP selects top-k
  key blocks per query block, as in generation's prefill);
- H2O and the sink + recent baseline: token by token (decode steps fed the window's tokens), so
  every query sees the cache the policy kept: real eviction, or with `simulate` the paper's
  masked simulation (dense attention over a full cache with the H2O mask);
- a compressed KV cache: token by token too, since only decode steps read the stored (packed)
  cache; a prefill attends over its own full-precision keys.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from offload_engine.policies.kv_policy import KVSettings
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from .config import ModelConfig
from .errors import EngineError
from .sampling import GenerationConfig


@dataclass
class PerplexityResult:
    kv_policy: str
    settings: dict
    method: str  # "prefill" or "token-by-token"
    context: int
    windows: int
    tokens_scored: int
    nll: float  # mean negative log-likelihood, nats
    ppl: float
    mean_keys_attended: float  # per query, averaged over the scored positions
    kv_bytes_per_sequence: int  # the KV cache the policy holds for one sequence, all layers
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def text_windows(ids: list[int], context: int, windows: int) -> torch.Tensor:
    """The first `windows` non-overlapping windows of `context` tokens, (W, N)."""
    if context < 2:
        raise EngineError("--context must be at least 2 tokens (one to condition on, one to predict).")
    available = len(ids) // context
    if available < 1:
        raise EngineError(f"the text has {len(ids)} tokens, fewer than one window of {context}.",
                          "Give a longer text or a smaller --context.")
    if available < windows:
        raise EngineError(f"the text holds {available} windows of {context} tokens, not {windows}.",
                          f"Pass --windows {available} or less, or a longer text.")
    return torch.tensor(ids[: windows * context]).view(windows, context)


def _budgeted(kv: KVSettings, context: int) -> KVSettings:
    """H2O ratios are fractions of the window (the prompt is the window here): fix them as sizes."""
    if kv.h2o is None:
        return kv
    hh, recent = kv.h2o.sizes(context)
    return replace(kv, h2o=replace(kv.h2o, hh_size=hh, recent_size=recent))


def _mean_keys(kv: KVSettings, context: int, hip_stats: dict | None) -> float:
    queries = range(context - 1)  # the positions whose next token is predicted
    if kv.evicts:
        budget = kv.h2o.budget(context)
        return sum(min(i, budget) + 1 for i in queries) / len(queries)
    if kv.policy == "hip" and hip_stats and hip_stats.get("queries"):
        return hip_stats["keys"] / hip_stats["queries"]
    return sum(i + 1 for i in queries) / len(queries)


def perplexity(model: ModelConfig, windows: torch.Tensor, kv: KVSettings, options, placement: Policy | None = None,
               progress=None) -> PerplexityResult:
    """Perplexity of `model` (weights from options.checkpoint) over windows (W, N) under a KV policy."""
    from .engine import Engine

    w, n = windows.shape
    if n > model.max_positions:
        raise EngineError(f"--context {n} exceeds {model.name}'s {model.max_positions} positions.")
    kv = _budgeted(kv, n)
    token_by_token = kv.evicts or (placement is not None and placement.compress_cache is not None)
    base = placement or Policy()
    t0 = time.perf_counter()
    nll_sum, scored = 0.0, 0
    if token_by_token:
        policy = replace(base, gpu_batch_size=w, num_gpu_batches=1, kv=kv)
        with Engine(model, policy, Workload(1, n - 1), options) as engine:
            targets = windows[:, 1:].to(engine.device)
            total = torch.zeros((), dtype=torch.float64, device=engine.device)

            def score(step: int, logits: torch.Tensor, _tokens) -> None:
                nonlocal total
                total = total - logits.float().log_softmax(-1).gather(1, targets[:, step:step + 1]).double().sum()

            engine.generate(windows[:, :1], None, GenerationConfig(max_new_tokens=n - 1), forced=windows[:, 1:],
                            on_step=score)
            nll_sum, scored = float(total), w * (n - 1)
            plan, stats = engine.plan, None
    else:
        policy = replace(base, gpu_batch_size=1, num_gpu_batches=1, kv=kv)
        with Engine(model, policy, Workload(n, 1), options) as engine:
            engine.kv.policy.collect_stats = True  # HiP counts the keys each query attends
            for row in windows:
                out = engine.generate(row[None], None, GenerationConfig(max_new_tokens=1), collect_logits=True)
                logp = out.prompt_logits[0, :-1].float().log_softmax(-1)
                nll_sum -= float(logp.gather(1, row[1:, None]).double().sum())
                scored += n - 1
                if progress:
                    progress()
            plan, stats = engine.plan, getattr(engine.kv.policy, "stats", None)
    nll = nll_sum / scored
    return PerplexityResult(kv.policy, asdict(kv), "token-by-token" if token_by_token else "prefill", n, w, scored,
                            nll, math.exp(nll), _mean_keys(kv, n, stats), plan.cache_bytes // policy.batch_size,
                            time.perf_counter() - t0)
