"""Cost of also returning H2O column sums from prefill attention (device machine).

  PYTHONPATH=. python experiments/bench_attention_scores.py --out DIR            # H100, fp16
  PYTHONPATH=. python experiments/bench_attention_scores.py --out DIR --smoke    # tiny, CPU ok

At OPT-6.7B (H=32) and OPT-30B (H=56) prefill shapes (D=128), times with do_bench (median):
  ours        attention_with_column_sums: out + per-key column sums (two Triton passes)
  ours_pad    the same with key_valid / query_valid (left padding), as the engine calls it
  pass1       pass 1 alone (flash attention + row log-sum-exp)
  sdpa        F.scaled_dot_product_attention, causal, flash backend: plain attention, no scores
  naive       q k^T, fp32 softmax, column sum, p v: the T x T matrix materialised
Every method's results are checked before it is timed (float64 reference on sequence 0, sdpa
on the whole batch, naive's column sums). Writes DIR/bench_attention_scores.json after every
case (hardware, settings, every number) and prints a table last.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_common first: it chooses TRITON_INTERPRET (no GPU) before the kernels import triton.
from experiments.bench_common import (GiB, add_timing_args, arg_parser, device_or_exit,  # noqa: E402
                                      kernel_hardware, rel_err, timer, write_json)
from offload_engine.kernels.attention_scores import (  # noqa: E402
    attention_forward_triton,
    attention_with_column_sums_reference,
    attention_with_column_sums_triton,
)
from offload_engine.metrics import git_commit  # noqa: E402

MODELS = {"opt-6.7b": (32, 128), "opt-30b": (56, 128)}  # heads, head dim
SMOKE_MODELS = {"tiny": (4, 16)}


def peak_gib(fn) -> float | None:
    """Memory one call allocates beyond what is already live (GPU only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The materialised version (as HF's eager OPT attention plus a column sum)."""
    s = q @ k.transpose(-1, -2)
    s.masked_fill_(~causal, float("-inf"))
    p = s.softmax(-1, dtype=torch.float32)
    del s
    colsum = p.sum(2)
    return p.to(q.dtype) @ v, colsum


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)


def run_case(model: str, heads: int, d: int, b: int, t: int, args, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(b * 7919 + t)
    # Projection outputs as the engine has them: (B, T, H, D) viewed as (B, H, T, D).
    q, k, v = (torch.randn(b, t, heads, d, generator=g, device=device, dtype=torch.float16).transpose(1, 2)
               for _ in range(3))
    q = q * d ** -0.5
    key_valid = torch.ones(b, t, dtype=torch.bool, device=device)
    pads = torch.randint(0, t // 4 + 1, (b,), generator=g, device=device)
    pads[0] = t // 4  # sequence 0 is the one checked against the float64 reference
    key_valid &= torch.arange(t, device=device)[None, :] >= pads[:, None]
    query_valid = key_valid  # prefill: Tq == Tk
    blocks = dict(block_m=16, block_n=16) if args.smoke else {}

    def ours():
        return attention_with_column_sums_triton(q, k, v, **blocks)

    def ours_pad():
        return attention_with_column_sums_triton(q, k, v, key_valid, query_valid, **blocks)

    def pass1():
        return attention_forward_triton(q, k, v, **blocks)

    row = dict(model=model, heads=heads, head_dim=d, batch=b, seq=t,
               causal_tflop=4 * b * heads * t * t * d / 2 / 1e12)
    # Checks first: nothing is timed unless it is right.
    out, colsum = ours()
    out2, colsum2 = ours()
    row["deterministic"] = bool(torch.equal(colsum, colsum2) and torch.equal(out, out2))
    ref_out, ref_col = attention_with_column_sums_reference(q[:1], k[:1], v[:1])
    row["err_out_vs_ref"] = rel_err(out[:1], ref_out)
    row["err_colsum_vs_ref"] = rel_err(colsum[:1], ref_col)
    row["err_out_vs_sdpa"] = rel_err(out, sdpa(q, k, v))
    pad_out, pad_col = ours_pad()
    ref_out, ref_col = attention_with_column_sums_reference(q[:1], k[:1], v[:1], key_valid[:1], query_valid[:1])
    row["err_pad_out_vs_ref"] = rel_err(pad_out[:1], ref_out)
    row["err_pad_colsum_vs_ref"] = rel_err(pad_col[:1], ref_col)
    del out2, colsum2, pad_out, pad_col, ref_out, ref_col
    ok = (row["deterministic"] and row["err_out_vs_sdpa"] < 1e-2
          and max(row["err_out_vs_ref"], row["err_pad_out_vs_ref"]) < 1e-2
          and max(row["err_colsum_vs_ref"], row["err_pad_colsum_vs_ref"]) < 1e-3)
    row["checks_passed"] = ok
    if not ok:
        print(f"CHECK FAILED {row}", flush=True)
        return row
    for name, fn in (("ours", ours), ("ours_pad", ours_pad), ("pass1", pass1), ("sdpa", lambda: sdpa(q, k, v))):
        row[f"{name}_ms"] = timer(fn, args.warmup, args.rep)
        row[f"{name}_peak_gib"] = peak_gib(fn)
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    row["naive_matrix_gib"] = b * heads * t * t * (2 + 4) / GiB  # fp16 scores + fp32 probabilities
    try:
        n_out, n_col = naive(q, k, v, causal)
        row["err_colsum_vs_naive"] = rel_err(colsum, n_col)
        row["err_out_vs_naive"] = rel_err(out, n_out)
        del n_out, n_col
        if row["err_colsum_vs_naive"] < 1e-2 and row["err_out_vs_naive"] < 1e-2:  # naive rounds scores to fp16
            row["naive_peak_gib"] = peak_gib(lambda: naive(q, k, v, causal))
            row["naive_ms"] = timer(lambda: naive(q, k, v, causal), args.warmup, args.rep)
        else:
            print(f"naive disagrees with ours: {row}", flush=True)
    except torch.OutOfMemoryError:
        row["naive_ms"] = row["naive_peak_gib"] = None
        row["naive_oom"] = True
    for name in ("ours", "ours_pad", "pass1", "sdpa", "naive"):
        if row.get(f"{name}_ms"):
            row[f"{name}_tflops"] = row["causal_tflop"] / (row[f"{name}_ms"] / 1e3)
    row["ours_over_sdpa"] = row["ours_ms"] / row["sdpa_ms"]
    if row.get("naive_ms"):
        row["naive_over_ours"] = row["naive_ms"] / row["ours_ms"]
    return row


def table(rows: list[dict]) -> str:
    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"
    lines = [f"{'model':9} {'B':>3} {'T':>5} {'sdpa ms':>8} {'ours ms':>8} {'pass1':>7} {'pad ms':>7} "
             f"{'ours/sdpa':>9} {'naive ms':>9} {'naive GiB':>9} {'ours GiB':>8}"]
    for r in rows:
        naive_ms = "OOM" if r.get("naive_oom") else f(r.get("naive_ms"), ".2f")
        lines.append(f"{r['model']:9} {r['batch']:>3} {r['seq']:>5} {f(r.get('sdpa_ms'), '.3f'):>8} "
                     f"{f(r.get('ours_ms'), '.3f'):>8} {f(r.get('pass1_ms'), '.3f'):>7} "
                     f"{f(r.get('ours_pad_ms'), '.3f'):>7} "
                     f"{f(r.get('ours_over_sdpa'), '.2f'):>9} {naive_ms:>9} {f(r.get('naive_peak_gib'), '.2f'):>9} "
                     f"{f(r.get('ours_peak_gib'), '.3f'):>8}" + ("" if r.get("checks_passed") else "  CHECK FAILED"))
    return "\n".join(lines)


def main() -> None:
    ap = arg_parser(__doc__, "bench_attention_scores.json", "tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048])
    add_timing_args(ap)
    args = ap.parse_args()
    device = device_or_exit(ap, args.smoke)
    models = SMOKE_MODELS if args.smoke else {m: MODELS[m] for m in args.models}
    batches, lengths = ([2], [40]) if args.smoke else (args.batches, args.lengths)
    path = args.out / "bench_attention_scores.json"
    result = dict(hardware=kernel_hardware(), commit=git_commit(),
                  settings=dict(dtype="float16", smoke=args.smoke, models=models, batches=batches, lengths=lengths,
                                warmup_ms=args.warmup, rep_ms=args.rep, timer="do_bench median" if device == "cuda"
                                else "wall-clock median of 3", layout="q/k/v (B, T, H, D) views as (B, H, T, D)",
                                padding="ours_pad: random left padding up to T/4 per sequence"),
                  cases=[])
    for model, (heads, d) in models.items():
        for b in batches:
            for t in lengths:
                row = run_case(model, heads, d, b, t, args, device)
                result["cases"].append(row)
                write_json(path, result)  # after every case: a cut-off run keeps what it measured
                print(f"{model} B={b} T={t}: ours {row.get('ours_ms')} ms, sdpa {row.get('sdpa_ms')} ms", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(f"wrote {path}")
    print(table(result["cases"]))
    if not all(r["checks_passed"] for r in result["cases"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
