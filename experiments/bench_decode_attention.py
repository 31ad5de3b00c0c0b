"""Flash-decoding vs the engine's masked SDPA for one captured decode step's attention (device machine).

  PYTHONPATH=. python experiments/bench_decode_attention.py --out DIR            # H100/H200, fp16
  PYTHONPATH=. python experiments/bench_decode_attention.py --out DIR --smoke    # tiny, CPU ok

One new query per sequence over a token-major (T_max, B, Hkv, D) fp16 cache whose first
`length` tokens are real. Times with do_bench (median):
  ours        decode_attention_triton, length from a device tensor, no left padding
  ours_pad    the same with key_start (random left padding up to length/8 per row), as the engine would call it
  ours_graph  ours_pad captured once in a CUDA graph, replayed (launch-free time; proves capturability)
  sdpa_mask   what the engine does now: kernels.attention.attention over all T_max keys with a
              (B, 1, 1, T_max) boolean mask (precomputed)
  sdpa_mask_graph  the engine's captured version: the mask built from device tensors + sdpa, in a graph
  sdpa_len    SDPA over the first `length` keys without a mask (a host-side length: not capturable)
GB/s = K+V bytes of the first `length` tokens / time (the padded variant reads fewer); the HBM
bound is a large device-to-device copy measured in the same run. Every output is checked against
the float64 reference (and SDPA) before anything is timed; the graph is replayed at a second
length to show it reads the length from device memory. A grid over num_splits x num_warps x
block_t (interleaved rounds, fastest median kept) records what the defaults leave on the table. Writes
DIR/bench_decode_attention.json after every case and prints a table last.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_common first: it chooses TRITON_INTERPRET (no GPU) before the kernels import triton.
from experiments.bench_common import (GiB, add_timing_args, arg_parser, device_or_exit,  # noqa: E402
                                      hbm_copy_ms, kernel_hardware, rel_err, timer, write_json)
from offload_engine.kernels.attention import attention  # noqa: E402
from offload_engine.kernels.decode_attention import (  # noqa: E402
    _config,
    _sm_count,
    decode_attention_reference,
    decode_attention_triton,
    default_num_splits,
    split_scratch,
)
from offload_engine.metrics import git_commit  # noqa: E402

# name, B, Hq, Hkv, D, T_max, length
CASES = [
    ("opt-6.7b", 32, 32, 32, 128, 544, 520),
    ("opt-6.7b", 32, 32, 32, 128, 544, 544),
    ("opt-6.7b", 128, 32, 32, 128, 544, 520),
    ("opt-30b", 64, 56, 56, 128, 544, 520),
    ("llama-8b", 16, 32, 8, 128, 8192, 8000),
]
SMOKE_CASES = [("tiny-mha", 2, 2, 2, 16, 40, 33), ("tiny-gqa", 2, 4, 2, 16, 40, 40)]
TOL = 2e-3  # fp16 against float64 and against SDPA
SWEEP_SPLITS, SWEEP_WARPS, SWEEP_BLOCK_T, SWEEP_ROUNDS = (1, 2, 3, 4, 8), (1, 2, 4), (32, 64), 3


def hardware() -> dict:
    """kernel_hardware(), with the SM count also under the key earlier results used."""
    info = kernel_hardware()
    if "sms" in info:
        info["sm_count"] = info["sms"]
    return info


def hbm_copy_gbps(args, device: str) -> dict:
    """The bandwidth bound: a device-to-device copy of 1 GiB (read + write bytes / time)."""
    nbytes = GiB if device == "cuda" else (4 << 20)
    ms = hbm_copy_ms(nbytes, device, lambda fn: timer(fn, args.warmup, args.rep))
    return dict(copy_bytes=2 * nbytes, copy_ms=ms, copy_gbps=2 * nbytes / ms / 1e6)


def capture(fn):
    """(graph, its output) for one call of fn, after warm-up calls on a side stream (compiles Triton)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def run_case(name: str, b: int, hq: int, hkv: int, d: int, t_max: int, length: int, args, device: str) -> dict:
    dtype = torch.float16
    g = torch.Generator(device=device).manual_seed(b * 7919 + length)
    q = torch.randn(b, hq, d, generator=g, device=device, dtype=dtype) * d ** -0.5
    k, v = (torch.randn(t_max, b, hkv, d, generator=g, device=device, dtype=dtype) for _ in range(2))
    length_t = torch.tensor(length, device=device)
    key_start = torch.randint(0, length // 8 + 1, (b,), generator=g, device=device)
    key_start[0] = length // 8
    block = dict(block_t=16) if args.smoke else {}
    cfg = _config(dtype, d, hq // hkv)
    bt = block.get("block_t") or cfg.block_t
    splits = default_num_splits(b * hkv, t_max, bt, _sm_count(q.device), cfg.programs_per_sm)
    row = dict(model=name, batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, t_max=t_max, length=length,
               block_t=bt, num_splits=splits, kv_bytes=2 * length * b * hkv * d * q.element_size(),
               pad_tokens=int(key_start.sum()))
    # What the engine does now: whole cache, mask from device tensors.
    pos = torch.arange(t_max, device=device)
    mask = ((pos[None, :] >= key_start[:, None]) & (pos[None, :] < length_t))[:, None, None, :]
    keys, values = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
    q4 = q[:, :, None]

    def ours():
        return decode_attention_triton(q, k, v, length_t, **block)

    def ours_pad():
        return decode_attention_triton(q, k, v, length_t, key_start, **block)

    def sdpa_mask():
        return attention(q4, keys, values, mask)[:, :, 0]

    def sdpa_mask_built():
        m = ((pos[None, :] >= key_start[:, None]) & (pos[None, :] < length_t))[:, None, None, :]
        return attention(q4, keys, values, m)[:, :, 0]

    def sdpa_len():
        return attention(q4, keys[:, :, :length], values[:, :, :length], None)[:, :, 0]

    # Checks first: nothing is timed unless it is right.
    out, out_pad = ours(), ours_pad()
    ref = decode_attention_reference(q, k, v, length_t)
    ref_pad = decode_attention_reference(q, k, v, length_t, key_start)
    row["err_vs_ref"], row["err_pad_vs_ref"] = rel_err(out, ref), rel_err(out_pad, ref_pad)
    row["err_vs_sdpa_len"], row["err_pad_vs_sdpa_mask"] = rel_err(out, sdpa_len()), rel_err(out_pad, sdpa_mask())
    checks = [row["err_vs_ref"], row["err_pad_vs_ref"], row["err_vs_sdpa_len"], row["err_pad_vs_sdpa_mask"]]
    timed = {"ours": ours, "ours_pad": ours_pad, "sdpa_mask": sdpa_mask, "sdpa_len": sdpa_len}
    if device == "cuda":
        scratch = split_scratch(q, splits) if splits > 1 else None
        static_out = torch.empty_like(q)
        graph, g_out = capture(lambda: decode_attention_triton(q, k, v, length_t, key_start, out=static_out,
                                                               scratch=scratch))
        other = length // 2 + 3  # replay at another length: the graph must read it from device memory
        length_t.fill_(other)
        graph.replay()
        row["graph_err_at_other_length"] = rel_err(g_out, decode_attention_reference(q, k, v, length_t, key_start))
        length_t.fill_(length)
        graph.replay()
        row["graph_equals_eager"] = bool(torch.equal(g_out, out_pad))
        checks.append(row["graph_err_at_other_length"])
        timed["ours_graph"] = graph.replay
        engine_graph, _ = capture(sdpa_mask_built)
        timed["sdpa_mask_graph"] = engine_graph.replay
    row["checks_passed"] = max(checks) < TOL and row.get("graph_equals_eager", True)
    if not row["checks_passed"]:
        print(f"CHECK FAILED {row}", flush=True)
        return row
    for method, fn in timed.items():
        try:
            row[f"{method}_ms"] = timer(fn, args.warmup, args.rep)
            row[f"{method}_gbps"] = row["kv_bytes"] / row[f"{method}_ms"] / 1e6
        except (RuntimeError, torch.OutOfMemoryError) as e:  # one SDPA backend failing must not lose the rest
            row[f"{method}_error"] = str(e)[:300]
    if row.get("sdpa_mask_ms"):
        row["speedup_vs_sdpa_mask"] = row["sdpa_mask_ms"] / row["ours_pad_ms"]
    if args.sweep:
        row["sweep"] = sweep(q, k, v, length_t, key_start, out_pad, t_max, args)
    return row


def sweep(q, k, v, length_t, key_start, expected, t_max, args) -> list[dict]:
    """ms of ours_pad over a grid of num_splits x num_warps x block_t. Each setting is timed in
    SWEEP_ROUNDS interleaved rounds and keeps its fastest median, so a slow moment of the GPU
    does not land on one setting only."""
    if args.smoke:
        configs = [dict(num_splits=s, num_warps=w, block_t=16) for s in (1, 2) for w in (2, 4)]
    else:
        configs = [dict(num_splits=s, num_warps=w, block_t=t)
                   for s in SWEEP_SPLITS for w in SWEEP_WARPS for t in SWEEP_BLOCK_T]
    rows, fns = [], []
    for cfg in configs:
        fn = lambda cfg=cfg: decode_attention_triton(q, k, v, length_t, key_start, **cfg)  # noqa: E731
        err = rel_err(fn(), expected)  # also compiles before anything is timed
        rows.append(dict(cfg, err_vs_default=err, ms=None))
        fns.append(fn if err < TOL else None)
    for _ in range(1 if args.smoke else SWEEP_ROUNDS):
        for row, fn in zip(rows, fns):
            if fn is not None:
                ms = timer(fn, args.warmup, args.rep)
                row["ms"] = ms if row["ms"] is None else min(row["ms"], ms)
    return rows


def table(hbm: dict, rows: list[dict]) -> str:
    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"
    lines = [f"HBM copy bound: {hbm['copy_gbps']:.0f} GB/s",
             f"{'model':9} {'B':>4} {'Hq/Hkv':>7} {'T_max':>5} {'len':>5} {'S':>3} {'ours ms':>8} {'pad ms':>7} "
             f"{'graph ms':>8} {'GB/s':>6} {'%HBM':>5} {'sdpaM ms':>8} {'sdpaMg':>7} {'sdpaL ms':>8} {'x sdpaM':>7} "
             f"{'best sweep':>16}"]
    for r in rows:
        best = min((s for s in r.get("sweep", []) if s.get("ms")), key=lambda s: s["ms"], default=None)
        best_s = (",".join(f"{k}={v}" for k, v in best.items() if k not in ("ms", "err_vs_default")) +
                  f":{best['ms']:.3f}") if best else "-"
        pct = 100 * r["ours_pad_gbps"] / hbm["copy_gbps"] if r.get("ours_pad_gbps") else None
        lines.append(f"{r['model']:9} {r['batch']:>4} {str(r['q_heads']) + '/' + str(r['kv_heads']):>7} "
                     f"{r['t_max']:>5} {r['length']:>5} {r['num_splits']:>3} {f(r.get('ours_ms'), '.3f'):>8} "
                     f"{f(r.get('ours_pad_ms'), '.3f'):>7} {f(r.get('ours_graph_ms'), '.3f'):>8} "
                     f"{f(r.get('ours_pad_gbps'), '.0f'):>6} {f(pct, '.0f'):>5} {f(r.get('sdpa_mask_ms'), '.3f'):>8} "
                     f"{f(r.get('sdpa_mask_graph_ms'), '.3f'):>7} {f(r.get('sdpa_len_ms'), '.3f'):>8} "
                     f"{f(r.get('speedup_vs_sdpa_mask'), '.2f'):>7} {best_s:>16}"
                     + ("" if r.get("checks_passed") else "  CHECK FAILED"))
    return "\n".join(lines)


def main() -> None:
    ap = arg_parser(__doc__, "bench_decode_attention.json", "tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the num_splits x num_warps x block_t grid")
    add_timing_args(ap)
    args = ap.parse_args()
    device = device_or_exit(ap, args.smoke)
    cases = SMOKE_CASES if args.smoke else CASES
    path = args.out / "bench_decode_attention.json"
    result = dict(hardware=hardware(), commit=git_commit(),
                  settings=dict(dtype="float16", smoke=args.smoke, cases=cases, warmup_ms=args.warmup, rep_ms=args.rep,
                                timer="do_bench median" if device == "cuda" else "wall-clock median of 3",
                                layout="q (B, Hq, D); caches (T_max, B, Hkv, D) contiguous, token-major",
                                gbps="K+V bytes of tokens [0, length) / time; padded variants read fewer",
                                padding="key_start uniform in [0, length/8] per row, row 0 at length/8"),
                  hbm=hbm_copy_gbps(args, device), cases=[])
    for case in cases:
        row = run_case(*case, args, device)
        result["cases"].append(row)
        write_json(path, result)  # after every case: a cut-off run keeps what it measured
        print(f"{case}: ours_pad {row.get('ours_pad_ms')} ms, sdpa_mask {row.get('sdpa_mask_ms')} ms", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {path}")
    print(table(result["hbm"], result["cases"]))
    if not all(r["checks_passed"] for r in result["cases"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
