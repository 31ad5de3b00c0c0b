"""Passkey retrieval: can the model find a number hidden in a long prompt, under each KV policy?

  PYTHONPATH=. python experiments/passkey.py --context 8000 --depths 0 0.25 0.5 0.75 1 --trials 2 \
      --out experiments/results/passkey

Each prompt is exactly `--context` tokens: an instruction, a haystack of real English text (the
King James Bible, tests/data/kjv-exodus-matthew-john.txt, consecutive verses from a seeded
random verse onwards, one verse a line; no repeated filler), the key sentence "The pass key is
NNNNN. Remember it. NNNNN is the pass key." inserted between two verses at the requested depth
(0 = before the first verse, 1 = after the last), and the question. The key is a seeded random
5-digit number, one per (trial, depth); a trial's haystack is the same at every depth. By
default the prompt is SmolLM2's chat template (the system line its template adds, the user
turn, and the assistant turn opened with "The pass key is", so the answer is the next tokens);
`--template plain` drops the chat markup. The model answers greedily (`--new-tokens`); an
answer is correct when its text contains the key.

Policies (`--policies`): `full` (dense attention, the cache on the GPU tier); `hip` (HiP's
defaults, the KV cache in the CPU tier and not attended there: decode selects over the
block-start keys and brings the selected blocks into the hot-block cache); `hip-gpu` (HiP with
the cache on the GPU tier: the selection the offloaded path must equal); `h2o` (H2O's default
ratios of the prompt, real eviction); on request `hip-refresh1` (offloaded HiP selecting anew every
decode step instead of reusing a selection for 8 steps), `sink` (the sink + recent baseline:
4 sinks and H2O's budget of recent tokens) and `h2o-decay` (H2O with the engine's default
decay; `h2o` is the paper's sum). Without a GPU the "GPU" tier is the CPU, so every path
runs anywhere. The samples of one policy run as batches of `--batch` prompts (all of one length,
no padding) through one engine.

Writes <out>/passkey_<context>.json (hardware, commit, settings, every sample's answer and
correctness, accuracy per policy and depth; rewritten after each policy, so an interrupted run
keeps the policies it finished) and <out>/passkey_<context>.md (the table).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.checkpoints.tokenizer import Tokenizer  # noqa: E402
from offload_engine.engine import Engine, EngineOptions  # noqa: E402
from offload_engine.metrics import git_commit, hardware, write_json_atomic  # noqa: E402
from offload_engine.policies import H2OConfig, HiPConfig, KVSettings  # noqa: E402
from offload_engine.policies.memory import Workload  # noqa: E402
from offload_engine.policies.placement import Policy  # noqa: E402
from offload_engine.sampling import GenerationConfig  # noqa: E402
from offload_engine.text import resolve_with_tokenizer  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "kjv-exodus-matthew-john.txt"
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_START = "The pass key is"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # what SmolLM2's template adds

# (weight GPU, weight CPU, cache GPU, cache CPU, activations GPU, activations CPU) percent
ON_GPU = (100, 0, 100, 0, 100, 0)
CACHE_ON_CPU = (100, 0, 0, 100, 100, 0)
POLICIES = ("full", "hip", "hip-gpu", "h2o")  # the default set
EXTRA_POLICIES = ("hip-refresh1", "sink", "h2o-decay")  # on request
OFFLOADED = ("hip", "hip-refresh1")  # the KV cache in the CPU tier
NOTES = {"full": "dense attention, KV cache on the GPU tier",
         "hip": "HiP defaults (k=512, window 128, sink 4, refresh 8), KV cache in the CPU tier, hot-block cache",
         "hip-gpu": "the same HiP with the KV cache on the GPU tier",
         "h2o": "H2O, 10% heavy hitters + 10% recent of the prompt, real eviction, the paper's sum (--h2o-decay 1)",
         "hip-refresh1": "HiP defaults but a new selection every decode step (refresh 1), KV cache in the CPU tier",
         "sink": "StreamingLLM's baseline: 4 sink tokens + 20% of the prompt recent (H2O's budget + 4), real eviction",
         "h2o-decay": "H2O's budget with its scores decayed by 1 - 4 / budget a step (the engine's default), "
                      "real eviction"}


@dataclass(frozen=True)
class PasskeySettings:
    context: int = 8000  # prompt tokens, everything included
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 2
    seed: int = 0
    new_tokens: int = 8  # SmolLM2 writes one token a digit: " " + 5 digits + "."
    template: str = "chat"  # "chat" or "plain"


@dataclass
class PasskeySample:
    ids: list[int]  # the whole prompt, exactly `context` tokens
    key: str
    depth: float
    trial: int
    key_start: int  # index in ids of the key sentence's first token
    key_len: int  # tokens of the key sentence
    filler_start: int  # index in ids of the haystack's first token
    filler_tokens: int  # haystack tokens, the key sentence not counted


@dataclass
class Answer:
    policy: str
    trial: int
    depth: float
    key: str
    text: str
    correct: bool
    key_position: float  # key_start / context
    tokens: list[int]  # the generated ids


def frame(template: str) -> tuple[str, str]:
    """The text before and after the haystack."""
    if template == "chat":
        return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{INTRO}\n\n",
                f"\n\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER_START}")
    if template == "plain":
        return f"{INTRO}\n\n", f"\n\n{QUESTION} {ANSWER_START}"
    raise ValueError(f"template must be 'chat' or 'plain', got {template!r}")


class PromptBuilder:
    """Builds passkey prompts of an exact token length from the corpus's verses."""

    def __init__(self, tokenizer: Tokenizer, corpus: Path = CORPUS, template: str = "chat"):
        self.tokenizer = tokenizer
        lines = [line.strip() for line in corpus.read_text().splitlines() if line.strip()]
        self.verses = [tokenizer.encode(line + "\n") for line in lines]  # one verse a line, newline included
        prefix, suffix = frame(template)
        self.prefix, self.suffix = tokenizer.encode(prefix), tokenizer.encode(suffix)

    def key_sentence(self, key: str) -> list[int]:
        return self.tokenizer.encode(f"The pass key is {key}. Remember it. {key} is the pass key.\n")

    def haystack(self, first_verse: int, tokens: int) -> list[list[int]]:
        """Consecutive verses from `first_verse` (wrapping around), the last cut to `tokens` in all."""
        out, total, i = [], 0, first_verse
        while total < tokens:
            verse = self.verses[i % len(self.verses)][: tokens - total]
            out.append(verse)
            total += len(verse)
            i += 1
        return out

    def build(self, context: int, depth: float, key: str, first_verse: int, trial: int = 0) -> PasskeySample:
        """A prompt of exactly `context` tokens with the key sentence at `depth` of the haystack,
        between the two verses whose boundary is nearest to that fraction of its tokens."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        sentence = self.key_sentence(key)
        filler = context - len(self.prefix) - len(self.suffix) - len(sentence)
        if filler < 1:
            raise ValueError(f"context {context} leaves no room for a haystack (the frame takes "
                             f"{context - filler} tokens)")
        verses = self.haystack(first_verse, filler)
        bounds = [0]
        for verse in verses:
            bounds.append(bounds[-1] + len(verse))
        cut = min(range(len(bounds)), key=lambda j: abs(bounds[j] - depth * filler))
        before = [t for verse in verses[:cut] for t in verse]
        after = [t for verse in verses[cut:] for t in verse]
        ids = self.prefix + before + sentence + after + self.suffix
        assert len(ids) == context
        return PasskeySample(ids, key, depth, trial, len(self.prefix) + len(before), len(sentence),
                             len(self.prefix), filler)


def make_samples(builder: PromptBuilder, settings: PasskeySettings) -> list[PasskeySample]:
    """trials x depths prompts; a trial's haystack starts at one seeded verse, each prompt gets its own key."""
    rng = random.Random(settings.seed)
    samples = []
    for trial in range(settings.trials):
        first_verse = rng.randrange(len(builder.verses))
        for depth in settings.depths:
            key = str(rng.randint(10000, 99999))
            samples.append(builder.build(settings.context, depth, key, first_verse, trial))
    return samples


def placement(name: str, batch: int) -> Policy:
    """The engine policy each benchmark policy runs under."""
    kv = {"full": KVSettings(), "hip": KVSettings("hip", hip=HiPConfig()),
          "hip-gpu": KVSettings("hip", hip=HiPConfig()), "h2o": KVSettings("h2o", H2OConfig(decay=1.0)),
          "hip-refresh1": KVSettings("hip", hip=HiPConfig(refresh=1)),
          "sink": KVSettings("sink", H2OConfig(hh_ratio=0.0, recent_ratio=0.2, hh_size=4)),
          "h2o-decay": KVSettings("h2o", H2OConfig())}[name]
    percent = CACHE_ON_CPU if name in OFFLOADED else ON_GPU
    return Policy.from_percent(percent, gpu_batch_size=batch, kv=kv)


def describe(name: str, context: int) -> dict:
    """What a result file records about a policy: its placement and KV settings (H2O's budget in tokens)."""
    policy = placement(name, 1)
    return {"percent": CACHE_ON_CPU if name in OFFLOADED else ON_GPU, "kv": asdict(policy.kv),
            "h2o_budget": policy.kv.kept_tokens(context)}


@dataclass
class PolicyRun:
    answers: list[Answer]
    token_ids: list[list[int]]  # generated ids per sample, in sample order
    seconds: float
    prefill_s: float
    decode_s: float
    extra: dict = field(default_factory=dict)


def run_policy(name: str, samples: list[PasskeySample], tokenizer: Tokenizer, model, options: EngineOptions,
               batch: int, new_tokens: int, progress=None) -> PolicyRun:
    """Every sample through one engine of this policy, `batch` prompts per generate call."""
    context = len(samples[0].ids)
    batch = min(batch, len(samples))
    t0 = time.perf_counter()
    answers, token_ids, prefill_s, decode_s = [], [], 0.0, 0.0
    cfg = GenerationConfig(max_new_tokens=new_tokens)  # greedy, no stop token: every sample decodes alike
    with Engine(model, placement(name, batch), Workload(context, new_tokens), options) as engine:
        for start in range(0, len(samples), batch):
            part = samples[start:start + batch]
            out = engine.generate(torch.tensor([s.ids for s in part]), None, cfg)
            prefill_s, decode_s = prefill_s + out.prefill_s, decode_s + out.decode_s
            for sample, row in zip(part, out.tokens.tolist()):
                text = tokenizer.decode(row)
                token_ids.append(row)
                answers.append(Answer(name, sample.trial, sample.depth, sample.key, text, sample.key in text,
                                      sample.key_start / context, row))
                if progress is not None:
                    progress(answers[-1])
        extra = _hip_stats(engine) if name.startswith("hip") else {}
    return PolicyRun(answers, token_ids, time.perf_counter() - t0, prefill_s, decode_s, extra)


def _hip_stats(engine: Engine) -> dict:
    """The hot-block cache's hit rate and bytes fetched (offloaded HiP only)."""
    hip = engine.kv.policy
    return {"hot_cache_hit_rate": hip.hit_rate(), "hot_cache_fetched_bytes": hip.fetched_bytes()}


def accuracy(answers: list[Answer], depths: tuple[float, ...]) -> dict:
    """Correct fraction per depth and overall."""
    out = {}
    for d in depths:
        hits = [a.correct for a in answers if a.depth == d]
        out[f"{d:g}"] = sum(hits) / len(hits) if hits else None
    out["all"] = sum(a.correct for a in answers) / len(answers) if answers else None
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    depths = [f"{d:g}" for d in s["depths"]]
    lines = [f"{result['model']}, passkey retrieval, {s['context']} prompt tokens, {s['template']} template, "
             f"{s['trials']} trials per depth, greedy, {result['hardware']['gpu'] or 'CPU'}\n",
             "| policy | " + " | ".join(f"depth {d}" for d in depths) + " | all | samples | wall s |",
             "|---|" + "---:|" * (len(depths) + 3)]
    for name, run in result["policies"].items():
        acc = run["accuracy"]
        cells = [f"{acc[d]:.0%}" if acc[d] is not None else "-" for d in depths]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {acc['all']:.0%} | {len(run['answers'])} | "
                     f"{run['seconds']:.0f} |")
    lines.append("")
    lines += [f"- {name}: {NOTES[name]}" for name in result["policies"]]
    if "hip_offloaded_equals_gpu" in result:
        same = result["hip_offloaded_equals_gpu"]
        lines.append(f"\nHiP offloaded and on the GPU tier generate identical tokens: {same}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=8000, help="prompt tokens, everything included")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--trials", type=int, default=2, help="prompts per depth (each its own haystack offset)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES + EXTRA_POLICIES)
    ap.add_argument("--batch", type=int, default=5, help="prompts per engine call (the engine's gpu_batch_size)")
    ap.add_argument("--new-tokens", type=int, default=PasskeySettings.new_tokens)
    ap.add_argument("--template", default="chat", choices=["chat", "plain"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = PasskeySettings(args.context, tuple(args.depths), args.trials, args.seed, args.new_tokens, args.template)
    args.out.mkdir(parents=True, exist_ok=True)
    resolved, tokenizer = resolve_with_tokenizer(args.model)
    samples = make_samples(PromptBuilder(tokenizer, template=settings.template), settings)
    options = EngineOptions(checkpoint=resolved.source, progress=False, device=args.device,
                            dtype=getattr(torch, args.dtype), offload_dir=args.out / "offload")
    result = {"model": resolved.config.name, "corpus": CORPUS.name, "settings": asdict(settings), "batch": args.batch,
              "dtype": args.dtype, "commit": git_commit(), "hardware": hardware(),
              "load_average_start": os.getloadavg(), "policies": {}}
    path = args.out / f"passkey_{settings.context}.json"
    tokens = {}
    for name in args.policies:
        run = run_policy(name, samples, tokenizer, resolved.config, options, args.batch, settings.new_tokens,
                         progress=lambda a: print(f"{a.policy:8s} trial {a.trial} depth {a.depth:4.2f} key {a.key} "
                                                  f"-> {a.text!r} {'ok' if a.correct else 'MISS'}", flush=True))
        tokens[name] = run.token_ids
        result["policies"][name] = {**describe(name, settings.context),
                                    "accuracy": accuracy(run.answers, settings.depths), "seconds": run.seconds,
                                    "prefill_s": run.prefill_s, "decode_s": run.decode_s, **run.extra,
                                    "answers": [asdict(a) for a in run.answers]}
        if "hip" in tokens and "hip-gpu" in tokens:
            result["hip_offloaded_equals_gpu"] = tokens["hip"] == tokens["hip-gpu"]
        result["load_average_end"] = os.getloadavg()
        write_json_atomic(path, result)
        print(f"{name}: accuracy {result['policies'][name]['accuracy']}, {run.seconds:.0f} s", flush=True)
    table = markdown(result)
    (args.out / f"passkey_{settings.context}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
