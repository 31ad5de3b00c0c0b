"""`offload-engine generate`: text from a real checkpoint, with every placement and KV policy flag."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EngineError
from ..metrics import check_output_file, git_commit, hardware, write_json_atomic
from ..sampling import GenerationConfig
from .options import (add_model_args, add_policy_args, add_resource_args, add_sampling_args, engine_options,
                      policy_from_args, positive_int)
from .run import print_kv_budget

EXAMPLES = """\
examples:
  offload-engine generate --model smollm2-135m --prompt "In the beginning God created"
  offload-engine generate --model ./my-llama --prompts prompts.txt --gpu-batch-size 8 --max-new-tokens 64
  offload-engine generate --model smollm2-135m --prompt "And it came to pass" --kv-policy h2o --do-sample
"""


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (a folder, a .gguf file or smollm2-135m)",
                       description="Generate text. One prompt streams its continuation as it is generated; "
                                   "several are batched and printed at the end, one block per prompt.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default="smollm2-135m")
    t = p.add_argument_group("prompts")
    t.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    t.add_argument("--prompts", type=Path, default=None, metavar="FILE", help="a file of prompts, one per line")
    t.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default: 64)")
    add_policy_args(p)
    add_resource_args(p)
    add_sampling_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write prompts and outputs as JSON")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(execute=execute, gpu_batch_size=1)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts is not None:
        try:
            text = args.prompts.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"cannot read --prompts {args.prompts} ({getattr(e, 'strerror', None) or e}).",
                              "Give a UTF-8 text file, one prompt per line.") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise EngineError("no prompts given.", "Pass --prompt TEXT (repeatable) or --prompts FILE.")
    return prompts


def execute(args: argparse.Namespace) -> dict:
    from dataclasses import asdict

    from ..engine import Engine
    from ..text import encode_prompts, generate_text, plan_workload, resolve_with_tokenizer

    prompts = read_prompts(args)
    if args.json is not None:
        check_output_file(args.json)
    resolved, tokenizer = resolve_with_tokenizer(args.model)
    policy = policy_from_args(args)
    longest = max(len(ids) for ids in encode_prompts(tokenizer, prompts))
    work = plan_workload(resolved.config, longest, args.max_new_tokens)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed,
                           stop_token_id=tokenizer.eos_token_id if args.stop_token is None else args.stop_token)
    gen.check_vocab(resolved.config.vocab_size)
    print_kv_budget(policy, work)
    stream = _Streamer(tokenizer) if len(prompts) == 1 else None
    with Engine(resolved.config, policy, work, engine_options(args, resolved.source)) as engine:
        engine.tokenizer = tokenizer
        if stream:
            engine.options.progress = False  # a bar on the terminal would draw over the streamed text
            print(prompts[0], end="", flush=True)
        result = generate_text(engine, prompts, gen, on_step=stream)
        dtype, device = str(engine.dtype).replace("torch.", ""), str(engine.device)
    if stream:
        stream.finish(result.token_ids[0])
    else:
        for prompt, text in zip(prompts, result.texts):
            print(f"### {prompt}\n{prompt}{text}\n")
    data = {"model": resolved.config.name, "weights": resolved.weights_label, "dtype": dtype, "device": device,
            "policy": asdict(policy), "workload": asdict(work), "kv_budget": policy.kv.kept_tokens(work.prompt_len),
            "generation": asdict(gen),
            "outputs": [{"prompt": p, "text": t, "token_ids": ids, "prompt_tokens": n}
                        for p, t, ids, n in zip(prompts, result.texts, result.token_ids, result.prompt_tokens)],
            "prefill_s": result.prefill_s, "decode_s": result.decode_s, "hardware": hardware(), "commit": git_commit(),
            "command": args.argv}
    if args.json:
        write_json_atomic(args.json, data)
    return data


class _Streamer:
    """Prints the decoded text of one sequence as tokens arrive (decoding the whole sequence each
    time, so multi-token characters appear whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, step, logits, tokens) -> None:
        token = int(tokens[0])
        if token == self.tokenizer.eos_token_id:
            return
        self.ids.append(token)
        self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self, ids: list[int]) -> None:
        self._show(self.tokenizer.decode(ids))
        print()
