"""`offload-engine ppl`: perplexity of a checkpoint on a text, under a KV policy or a sweep of budgets."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from ..errors import EngineError
from ..metrics import check_output_file, git_commit, hardware, write_json_atomic
from .options import (add_model_args, add_policy_args, add_resource_args, engine_options, finite_float,
                      kv_settings_from_args, policy_from_args, positive_int)

DESCRIPTION = """\
Perplexity: tokenize the whole text without special tokens, take the first W non-overlapping
windows of N tokens, and report exp(mean negative log-likelihood of every token of each window
given the tokens before it in that window). Full attention and HiP run one prefill per window;
H2O and the sink baseline run token by token, so every query sees the cache the policy kept
when it arrived (real eviction, or --h2o-simulate for the paper's masked simulation): all
windows as one batch, in one prefill whose attention layers step through the queries in order.
One progress bar counts the tokens scored over every window and budget.
"""

EXAMPLES = """\
examples:
  offload-engine ppl --model smollm2-135m --text corpus.txt --context 2048 --windows 3
  offload-engine ppl --model smollm2-135m --text corpus.txt --kv-policy h2o --hh-ratio 0.1 --recent-ratio 0.1
  offload-engine ppl --model smollm2-135m --text corpus.txt --kv-policy h2o --sweep 0.05 0.1 0.2 0.5 \\
      --json h2o.json          # also writes h2o.png: perplexity against the KV budget
"""


def add_parser(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity of a checkpoint on a text file, under a KV policy",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default="smollm2-135m")
    t = p.add_argument_group("text")
    t.add_argument("--text", type=Path, required=True, metavar="FILE", help="a UTF-8 text file")
    t.add_argument("--context", type=positive_int, default=2048, help="tokens per window (default: 2048)")
    t.add_argument("--windows", type=positive_int, default=3, help="windows scored (default: 3)")
    t.add_argument("--sweep", nargs="+", type=finite_float, default=None, metavar="BUDGET",
                   help="run several budgets: for h2o and sink, total KV budgets as fractions of the context "
                        "(split evenly between heavy hitters and recent tokens, e.g. 0.05 0.1 0.2 0.5); for hip, "
                        "values of k; full attention is always run as the reference")
    add_policy_args(p)
    add_resource_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write the results as JSON (with --sweep, also a plot beside it, FILE with .png)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(execute=execute, gpu_batch_size=1)


def read_windows(args, tokenizer):
    from ..perplexity import text_windows

    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(f"cannot read --text {args.text} ({getattr(e, 'strerror', None) or e}).") from None
    return text_windows(tokenizer.encode(text), args.context, args.windows)


def sweep_settings(args, base):
    """One KVSettings per budget of the sweep."""
    from offload_engine.policies import HiPConfig

    out = []
    for budget in args.sweep:
        if base.policy in ("h2o", "sink"):
            if not 0 < budget <= 1:
                raise EngineError(f"--sweep {budget:g}: H2O budgets are fractions of the context in (0, 1].")
            size = int(budget * args.context)
            hh = 4 if base.policy == "sink" else size // 2
            out.append(replace(base, h2o=replace(base.h2o, hh_size=hh, recent_size=max(1, size - hh))))
        elif base.policy == "hip":
            out.append(replace(base, hip=replace(base.hip or HiPConfig(), k=int(budget))))
        else:
            raise EngineError("--sweep needs --kv-policy h2o, sink or hip.")
    return out


def execute(args: argparse.Namespace) -> dict:
    from offload_engine.policies import KVSettings

    from ..perplexity import perplexity
    from ..text import resolve_with_tokenizer

    if args.json is not None:
        check_output_file(args.json)
    resolved, tokenizer = resolve_with_tokenizer(args.model)
    windows = read_windows(args, tokenizer)
    kv = kv_settings_from_args(args)
    placement = policy_from_args(args)
    options = replace(engine_options(args, resolved.source), progress=False)  # one bar over every run instead
    runs = [KVSettings()] + sweep_settings(args, kv) if args.sweep else [kv]
    rows = []
    total = len(runs) * windows.shape[0] * (windows.shape[1] - 1)
    with tqdm(total=total, desc="ppl", unit="tok", disable=args.quiet, file=sys.stderr) as bar:
        for settings in runs:
            bar.set_postfix_str(settings.policy)
            result = perplexity(resolved.config, windows, settings, options, placement, progress=bar.update)
            rows.append(result.as_dict())
            bar.write(f"{result.kv_policy:>5} keys/query {result.mean_keys_attended:8.1f}  ppl {result.ppl:8.4f}  "
                      f"({result.method}, {result.seconds:.1f} s)", file=sys.stderr)
    full = next((r for r in rows if r["kv_policy"] == "full"), None)
    for row in rows:
        row["ppl_change_vs_full"] = row["ppl"] / full["ppl"] - 1 if full else None
    data = {"model": resolved.config.name, "weights": resolved.weights_label, "text": str(args.text),
            "context": args.context, "windows": args.windows, "rows": rows, "hardware": hardware(),
            "commit": git_commit(), "command": args.argv}
    for row in rows:
        print(f"{row['kv_policy']}\t{row['mean_keys_attended']:.1f}\t{row['ppl']:.4f}")
    if args.json:
        write_json_atomic(args.json, data)
        if args.sweep:
            plot_sweep(data, args.json.with_suffix(".png"))
    return data


def plot_sweep(data: dict, path: Path) -> None:
    """Perplexity against the mean keys attended per query, full attention as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    rows = [r for r in data["rows"] if r["kv_policy"] != "full"]
    full = [r for r in data["rows"] if r["kv_policy"] == "full"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["mean_keys_attended"] for r in rows], [r["ppl"] for r in rows], "o-", label=rows[0]["kv_policy"])
    if full:
        ax.axhline(full[0]["ppl"], color="gray", linestyle="--", label="full attention")
    ax.set_xlabel("mean keys attended per query")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{data['model']}, context {data['context']}, {data['windows']} windows")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
