"""Perplexity, defined so that any two tools agree:

tokenize the whole text without special tokens; take the first W non-overlapping windows of N
tokens; perplexity = exp(mean negative log-likelihood of every token of each window given the
tokens before it in that window), i.e. N - 1 predictions per window.

How a KV policy is applied:
- full and HiP: one prefill over the window with every position's logits (HiP selects top-k
  key blocks per query block, as in generation's prefill);
- H2O and the sink + recent baseline: token by token, so every query sees the cache the policy
  kept when it arrived. All windows run as one batch through one prefill in which each
  attention layer scans the window's queries in order, keeping and evicting as decode steps
  would (kv/h2o_scan.py), while the projections, the MLP and the LM head run once over the
  whole window; `decode_steps=True` instead feeds the window one engine decode step per token
  (real eviction, or with `simulate` the paper's masked simulation), the reference the scan
  equals to float rounding;
- a compressed KV cache: token by token too, since only decode steps read the stored (packed)
  cache; a prefill attends over its own full-precision keys (with H2O, the scan attends the
  cache's rounded keys and values as decode steps do).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

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
    window_nll: list[float] = field(default_factory=list)  # mean negative log-likelihood per window

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


Progress = Callable[[int], None]

# Teacher-forced windows share one prefill whose logits (rows, N - 1, vocab) are held at once:
# cap them (2 windows of 2048 tokens over a 49152-token vocabulary in fp32 take 0.8 GiB).
_LOGITS_BYTES = 2 << 30


@dataclass
class _Scored:
    nll: torch.Tensor  # (W,) float64: summed negative log-likelihood of each window's predictions
    plan: object  # the engine's MemoryPlan
    batch: int  # sequences the engine's cache was planned for
    stats: dict | None = None


def perplexity(model: ModelConfig, windows: torch.Tensor, kv: KVSettings, options, placement: Policy | None = None,
               progress: Progress | None = None, decode_steps: bool = False) -> PerplexityResult:
    """Perplexity of `model` (weights from options.checkpoint) over windows (W, N) under a KV policy.

    `progress(tokens)` is told the tokens scored as it goes (while a teacher-forced batch runs, its
    tokens count in equal parts as each layer finishes, the last part once they are scored);
    `decode_steps`: score an evicting policy with one engine decode step per token (the reference
    for the teacher-forced scan; far slower)."""
    w, n = windows.shape
    if n > model.max_positions:
        raise EngineError(f"--context {n} exceeds {model.name}'s {model.max_positions} positions.")
    kv = _budgeted(kv, n)
    compressed = placement is not None and placement.compress_cache is not None
    base = placement or Policy()
    t0 = time.perf_counter()
    if kv.evicts and not decode_steps:
        scored = _teacher_forced(model, windows, kv, base, options, progress)
    elif kv.evicts or compressed:
        scored = _decoded(model, windows, kv, base, options, progress)
    else:
        scored = _prefilled(model, windows, kv, base, options, progress)
    per_window = scored.nll / (n - 1)
    nll = float(scored.nll.sum()) / (w * (n - 1))
    method = "token-by-token" if kv.evicts or compressed else "prefill"
    return PerplexityResult(kv.policy, asdict(kv), method, n, w, w * (n - 1), nll, math.exp(nll),
                            _mean_keys(kv, n, scored.stats), scored.plan.cache_bytes // scored.batch,
                            time.perf_counter() - t0, per_window.tolist())


def _teacher_forced(model: ModelConfig, windows: torch.Tensor, kv: KVSettings, base: Policy, options,
                    progress: Progress | None) -> _Scored:
    """Evicting policies: the windows as one batch (or a few, to bound the logits), each a prompt
    of its first N - 1 tokens whose attention layers scan the queries in order (kv/h2o_scan.py)."""
    from .engine import Engine

    w, n = windows.shape
    rows = _rows_per_batch(w, n, model.vocab_size)
    policy = replace(base, gpu_batch_size=rows, num_gpu_batches=1, kv=kv)
    nll = torch.zeros(w, dtype=torch.float64)
    with Engine(model, policy, Workload(n - 1, 1), options) as engine:
        h2o = engine.kv.policy
        h2o.teacher_forced = True
        for start in range(0, w, rows):
            part = windows[start:start + rows]
            tick = _in_parts(progress, part.shape[0] * (n - 1), model.num_layers + 1)
            h2o.on_scan = tick
            out = engine.generate(part[:, :-1], None, GenerationConfig(max_new_tokens=1), collect_logits=True)
            nll[start:start + part.shape[0]] = _window_nll(out.prompt_logits, part[:, 1:])
            tick()
        return _Scored(nll, engine.plan, policy.batch_size)


def _rows_per_batch(windows: int, context: int, vocab: int) -> int:
    """Windows per teacher-forced batch: all of them if their fp32 logits fit _LOGITS_BYTES, else
    batches as even as possible (a short batch is filled up to the engine's batch size)."""
    fit = max(1, _LOGITS_BYTES // (context * vocab * 4))
    batches = math.ceil(windows / fit)
    return math.ceil(windows / batches)


def _in_parts(progress: Progress | None, tokens: int, parts: int) -> Callable[[], None]:
    """A callable that reports `tokens` to progress in `parts` calls (integers summing to tokens)."""
    done = calls = 0

    def tick() -> None:
        nonlocal done, calls
        calls = min(calls + 1, parts)
        now = tokens * calls // parts
        if progress is not None and now > done:
            progress(now - done)
        done = now

    return tick


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood per window: logits (R, S, V), targets (R, S) -> (R,) float64,
    one window at a time (one window's log-probabilities in memory)."""
    targets = targets.to(logits.device)
    return torch.stack([-row.float().log_softmax(-1).gather(1, target[:, None]).double().sum()
                        for row, target in zip(logits, targets)]).cpu()


def _decoded(model: ModelConfig, windows: torch.Tensor, kv: KVSettings, base: Policy, options,
             progress: Progress | None) -> _Scored:
    """One engine decode step per token, the windows as one batch, fed their own tokens."""
    from .engine import Engine

    w, n = windows.shape
    policy = replace(base, gpu_batch_size=w, num_gpu_batches=1, kv=kv)
    with Engine(model, policy, Workload(1, n - 1), options) as engine:
        targets = windows[:, 1:].to(engine.device)
        total = torch.zeros(w, dtype=torch.float64, device=engine.device)

        def score(step: int, logits: torch.Tensor, _tokens) -> None:
            total.sub_(logits.float().log_softmax(-1).gather(1, targets[:, step:step + 1])[:, 0].double())
            if progress is not None:
                progress(w)

        engine.generate(windows[:, :1], None, GenerationConfig(max_new_tokens=n - 1), forced=windows[:, 1:],
                        on_step=score)
        return _Scored(total.cpu(), engine.plan, policy.batch_size)


def _prefilled(model: ModelConfig, windows: torch.Tensor, kv: KVSettings, base: Policy, options,
               progress: Progress | None) -> _Scored:
    """Full attention and HiP: one prefill per window with every position's logits."""
    from .engine import Engine

    w, n = windows.shape
    policy = replace(base, gpu_batch_size=1, num_gpu_batches=1, kv=kv)
    nll = torch.zeros(w, dtype=torch.float64)
    with Engine(model, policy, Workload(n, 1), options) as engine:
        engine.kv.policy.collect_stats = True  # HiP counts the keys each query attends
        for i, row in enumerate(windows):
            out = engine.generate(row[None], None, GenerationConfig(max_new_tokens=1), collect_logits=True)
            nll[i] = _window_nll(out.prompt_logits[:, :-1], row[None, 1:])[0]
            if progress is not None:
                progress(n - 1)
        return _Scored(nll, engine.plan, policy.batch_size, getattr(engine.kv.policy, "stats", None))
