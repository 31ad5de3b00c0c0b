"""The accuracy table: perplexity of a real model under every KV policy and budget.

  PYTHONPATH=. python experiments/accuracy_table.py --context 2048 --windows 3 --out experiments/results/accuracy

Rows (SmolLM2-135M on the KJV corpus by default): full attention; H2O at 5/10/20/50% (half heavy
hitters, half recent; real eviction and the masked simulation); the sink + recent baseline at
the same budgets; H2O with its scores decayed each step (`--h2o-decay` 0, TOVA's last step
alone, 0.9, 0.99, 0.999, and the engine's default 1 - 4 / budget; the "h2o" rows are the
paper's sum, `--h2o-decay 1`); HiP at
k = 128/256/512 (estimated selection, and the exact top-k blocks as its upper bound); 4-bit KV per token (FlexGen's scheme) and in KIVI's layout (keys per channel);
8-bit and 2-bit KIVI; 2-bit per token; H2O 20% with 4-bit KV per token (groups of 64 and of 32,
the 32 newest tokens exact); compressed weights as the GGUF stores them (its Q4_1 and Q8_0
blocks kept bit for bit: the full row's perplexity); 4-bit weights re-quantized from them in
groups of 64 (FlexGen's setting) and of 32; the GGUF's weights with 4-bit KIVI KV. Each
finished row is appended to <out>/accuracy_<context>.jsonl at once, so an interrupted run
resumes where it stopped; <out>/accuracy_<context>.md is the table (perplexity, change vs full,
mean keys attended per query, KV bytes kept per sequence and per context token).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.engine import EngineOptions  # noqa: E402
from offload_engine.metrics import git_commit, hardware  # noqa: E402
from offload_engine.perplexity import perplexity, text_windows  # noqa: E402
from offload_engine.text import resolve_with_tokenizer  # noqa: E402
from offload_engine.policies import Compression, H2OConfig, HiPConfig, KVSettings  # noqa: E402
from offload_engine.policies.placement import Policy  # noqa: E402

BUDGETS = (0.05, 0.1, 0.2, 0.5)
HIP_KS = (128, 256, 512)


DECAYS = (0.0, 0.9, 0.99, 0.999)  # H2O's score decay: TOVA's last step, moving sums


def h2o(budget: float, context: int, simulate=False, sinks=False, decay=1.0) -> KVSettings:
    size = int(budget * context)
    hh = 4 if sinks else size // 2
    return KVSettings("sink" if sinks else "h2o", H2OConfig(hh_size=hh, recent_size=size - hh, simulate=simulate,
                                                            decay=decay))


def rows_to_run(context: int, only: list[str] | None):
    q4 = Compression(4, 64)
    rows = [("full", KVSettings(), {})]
    for b in BUDGETS:
        rows += [(f"h2o {b:.0%}", h2o(b, context), {}), (f"h2o {b:.0%} simulated", h2o(b, context, True), {}),
                 (f"sink+recent {b:.0%}", h2o(b, context, sinks=True), {})]
        rows += [(f"h2o {b:.0%} decay {d:g}", h2o(b, context, decay=d), {}) for d in DECAYS]
        rows += [(f"h2o {b:.0%} decay 1-4/budget (default)", h2o(b, context, decay=None), {})]
    for k in HIP_KS:
        rows += [(f"hip k={k}", KVSettings("hip", hip=HiPConfig(k=k)), {}),
                 (f"hip k={k} exact top-k", KVSettings("hip", hip=HiPConfig(k=k, exact=True)), {})]
    kivi4, kivi8 = Compression(4, keys_per_channel=True), Compression(8, keys_per_channel=True)
    rows += [("4-bit KV, per token (FlexGen's groups of 64)", KVSettings(), dict(compress_cache=q4)),
             ("4-bit KV, KIVI", KVSettings(), dict(compress_cache=kivi4)),
             ("8-bit KV, KIVI", KVSettings(), dict(compress_cache=kivi8)),
             ("2-bit KV, KIVI", KVSettings(), dict(compress_cache=Compression(2, keys_per_channel=True))),
             ("2-bit KV, per token (groups of 64)", KVSettings(), dict(compress_cache=Compression(2, 64))),
             ("h2o 20% + 4-bit KV, per token, 32 newest exact", h2o(0.2, context), dict(compress_cache=q4)),
             ("h2o 20% + 4-bit KV, per token in groups of 32, 32 newest exact", h2o(0.2, context),
              dict(compress_cache=Compression(4, 32))),
             ("weights as the GGUF stores them (Q4_1 + Q8_0)", KVSettings(), dict(compress_weight=q4)),
             ("4-bit weights re-quantized, groups of 64", KVSettings(),
              dict(compress_weight=Compression(4, 64, requantize=True))),
             ("4-bit weights re-quantized, groups of 32", KVSettings(),
              dict(compress_weight=Compression(4, 32, requantize=True))),
             ("GGUF weights + 4-bit KV, KIVI", KVSettings(), dict(compress_weight=q4, compress_cache=kivi4))]
    return [r for r in rows if not only or any(r[0].startswith(o) for o in only)]


def markdown(rows: list[dict]) -> str:
    full = next((r["ppl"] for r in rows if r["name"] == "full"), None)
    lines = ["| policy | perplexity | change vs full | mean keys attended / query | KV bytes kept / sequence | "
             "KV bytes / context token |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        change = f"{r['ppl'] / full - 1:+.1%}" if full else "-"
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {change} | {r['mean_keys_attended']:.0f} | "
                     f"{r['kv_bytes_per_sequence'] / 2**20:.1f} MiB | {r['kv_bytes_per_sequence'] / r['context']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", type=Path, default=ROOT / "tests" / "data" / "kjv-exodus-matthew-john.txt")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="run only rows whose name starts with one of these")
    ap.add_argument("--rows", nargs="*", help="run only the rows with exactly these names")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"accuracy_{args.context}.jsonl"
    done = {json.loads(line)["name"]: json.loads(line) for line in log.read_text().splitlines()} if log.exists() else {}
    resolved, tokenizer = resolve_with_tokenizer(args.model)
    windows = text_windows(tokenizer.encode(args.text.read_text()), args.context, args.windows)
    options = EngineOptions(checkpoint=resolved.source, progress=False, device=args.device,
                            dtype=getattr(torch, args.dtype), offload_dir=args.out / "offload")
    for name, kv, compression in rows_to_run(args.context, args.only):
        if name in done or (args.rows and name not in args.rows):
            continue
        t0 = time.time()
        result = perplexity(resolved.config, windows, kv, options, Policy(**compression))
        row = dict(result.as_dict(), name=name, compression=sorted(compression), model=resolved.config.name,
                   text=args.text.name, commit=git_commit(), hardware=hardware()["gpu"] or "cpu")
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[name] = row
        print(f"{name:28s} ppl {row['ppl']:8.4f}  keys/query {row['mean_keys_attended']:7.1f}  "
              f"{time.time() - t0:6.1f} s", flush=True)
    order = [name for name, _, _ in rows_to_run(args.context, None) if name in done]
    (args.out / f"accuracy_{args.context}.md").write_text(
        f"{resolved.config.name}, {args.text.name}, context {args.context}, {args.windows} windows\n\n"
        + markdown([done[n] for n in order]))
    print(markdown([done[n] for n in order]))


if __name__ == "__main__":
    main()
