"""HiP kernels (kernels/hip/select.py, kernels/hip/attention.py) against dense SDPA.

fp16, 32 query heads = 32 kv heads, head dim 128, HipConfig defaults, random Gaussian q/k/v:
  decode  (one query per sequence): batch 1 at T = 8k, 128k, 1M; batch 16 at T = 32k, 128k.
          HiP with mask recomputation (select + attention) and with mask reuse (attention only,
          selection cached) against F.scaled_dot_product_attention.
  prefill (causal, batch 1): T = 8k, 32k, 128k; select + attention against causal SDPA.
SDPA runs with each backend (flash, cuDNN, memory-efficient); speed-ups are against the fastest.
Every case is checked before timing: HiP attention on a few (head, query block) slices against the
float64 reference, and the Triton selection against the PyTorch one on a slice (agreement is
reported; fp16 summation order may flip near-ties). Times are triton.testing.do_bench medians.
Writes <out>/bench_hip_kernels.json (hardware, settings, every number, the log-log slope of time
against T for prefill) and prints a table last.

  PYTHONPATH=. python experiments/bench_hip_kernels.py --out DIR [--cases decode-b1-1m ...]
        [--tiles select.cand_tile=64 prefill.keys_per_tile=64 decode.num_warps=8 ...] [--smoke]
--smoke runs tiny shapes (on CPU through Triton's interpreter when there is no GPU).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_common first: it chooses TRITON_INTERPRET (no GPU) before the kernels import triton.
from experiments.bench_common import (arg_parser, device_or_exit, kernel_hardware, rel_err, timer,  # noqa: E402
                                      write_json)
from offload_engine.kernels.hip.attention import block_sparse_attention_reference, block_sparse_attention_triton  # noqa: E402
from offload_engine.kernels.hip.select import HipConfig, hip_select_torch, hip_select_triton  # noqa: E402

K, M = 1024, 1024 * 1024
FULL = dict(heads=32, head_dim=128, cfg=HipConfig(),
            decode=[("decode-b1-8k", 1, 8 * K), ("decode-b1-128k", 1, 128 * K), ("decode-b1-1m", 1, M),
                    ("decode-b16-32k", 16, 32 * K), ("decode-b16-128k", 16, 128 * K)],
            prefill=[("prefill-8k", 8 * K), ("prefill-32k", 32 * K), ("prefill-128k", 128 * K)])
SMOKE = dict(heads=2, head_dim=32, cfg=HipConfig(k=16, block_size_q=16, block_size_k=2, sink=4, window=16),
             decode=[("decode-b1-200", 1, 200), ("decode-b2-120", 2, 120)],
             prefill=[("prefill-48", 48), ("prefill-96", 96)])
# Published dense SDPA times on this H100 (ms) and the speed-up goals, for the report.
PUBLISHED_SDPA_MS = {"decode-b1-128k": 0.74, "decode-b1-1m": 5.6, "decode-b16-128k": 11.2,
                     "prefill-32k": 14.4, "prefill-128k": 249.0}
GOALS = {"decode-b16-128k": 10.0, "decode-b1-1m": 20.0, "prefill-128k": 5.0}
TILE_KEYS = {"select": ("cand_tile", "num_warps", "max_programs"),
             "prefill": ("keys_per_tile", "num_warps", "num_stages"),
             "decode": ("keys_per_tile", "num_warps", "num_stages")}


def parse_tiles(items: list[str]) -> dict[str, dict[str, int]]:
    tiles: dict[str, dict[str, int]] = {name: {} for name in TILE_KEYS}
    for item in items:
        key, _, value = item.partition("=")
        group, _, name = key.partition(".")
        if group not in TILE_KEYS or name not in TILE_KEYS[group] or not value.isdigit():
            raise SystemExit(f"--tiles {item!r}: expected GROUP.NAME=INT with GROUP.NAME one of "
                             + ", ".join(f"{g}.{n}" for g, ns in TILE_KEYS.items() for n in ns))
        tiles[group][name] = int(value)
    return tiles


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa(q, k, v, causal: bool, backend: str = "flash"):
    backends = [SDPA_BACKENDS[backend]] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)


def time_sdpa(q, k, v, causal: bool, rep_ms: int) -> dict:
    """Every SDPA backend that runs this shape (ms; None where it refuses), and the fastest: the
    dense baseline HiP is compared with."""
    times: dict[str, float | None] = {}
    for name in SDPA_BACKENDS if q.is_cuda else ["flash"]:
        try:
            times[name] = timer(lambda: sdpa(q, k, v, causal, name), rep_ms=rep_ms)
        except RuntimeError:  # this backend does not take the shape or is not built in
            times[name] = None
    ran = {n: t for n, t in times.items() if t is not None}
    fastest = min(ran, key=ran.get)
    return {"sdpa_ms": ran[fastest], "sdpa_backend": fastest, "sdpa_ms_by_backend": times}


def check(q, k, v, sel, q_idx, cfg, slices) -> dict:
    """HiP attention on (head, query block) slices against float64; selection Triton vs PyTorch."""
    bq, bk = cfg.block_size_q, cfg.block_size_k
    out = block_sparse_attention_triton(q, k, v, sel, q_idx, None, bq, bk)
    errs, agree = [], []
    for h, j in slices:
        rows = slice(j * bq, min((j + 1) * bq, q.shape[2]))
        hs = slice(h, h + 1)
        qs, ss = q[:1, hs, rows], sel[:1, hs, j:j + 1]
        ref = block_sparse_attention_reference(qs.double(), k[:1, hs].double(), v[:1, hs].double(), ss,
                                               q_idx[rows], None, bq, bk)
        o = out[:1, hs, rows].double()
        errs.append(rel_err(o, ref))
        torch_sel = hip_select_torch(qs, k[:1, hs], q_idx[rows], None, cfg)
        agree.append(float((torch_sel == ss).float().mean()))
    res = {"max_rel_err": max(errs), "selection_agreement": min(agree)}
    if res["max_rel_err"] > 1e-2 or math.isnan(res["max_rel_err"]):
        raise SystemExit(f"HiP attention differs from the float64 reference: {res}")
    if res["selection_agreement"] < 0.99:
        print(f"warning: Triton and PyTorch selections agree on only {res['selection_agreement']:.3f} of entries")
    return res


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_decode(name, batch, T, setup, tiles, rep_ms, device) -> dict:
    H, D, cfg = setup["heads"], setup["head_dim"], setup["cfg"]
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(batch, H, T, D, generator=g, device=device, dtype=torch.float16)
    v = torch.randn(batch, H, T, D, generator=g, device=device, dtype=torch.float16)
    q = torch.randn(batch, H, 1, D, generator=g, device=device, dtype=torch.float16) * D ** -0.5
    q_idx = torch.tensor([T - 1], dtype=torch.int32, device=device)
    bq, bk = cfg.block_size_q, cfg.block_size_k

    def select():
        return hip_select_triton(q, k, q_idx, None, cfg, **tiles["select"])

    def attend(sel):
        return block_sparse_attention_triton(q, k, v, sel, q_idx, None, bq, bk, **tiles["decode"])

    sel = select()
    res = {"case": name, "kind": "decode", "batch": batch, "T": T,
           "check": check(q, k, v, sel, q_idx, cfg, [(0, 0), (H - 1, 0)])}
    res["hip_recompute_ms"] = timer(lambda: attend(select()), rep_ms=rep_ms)
    res["hip_reuse_ms"] = timer(lambda: attend(sel), rep_ms=rep_ms)
    res["select_ms"] = timer(select, rep_ms=rep_ms)
    res.update(time_sdpa(q, k, v, False, rep_ms))
    res["speedup_recompute"] = res["sdpa_ms"] / res["hip_recompute_ms"]
    res["speedup_reuse"] = res["sdpa_ms"] / res["hip_reuse_ms"]
    del q, k, v, sel
    free()
    return res


def run_prefill(name, T, setup, tiles, rep_ms, device) -> dict:
    H, D, cfg = setup["heads"], setup["head_dim"], setup["cfg"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, H, T, D, generator=g, device=device, dtype=torch.float16) * D ** -0.5
    k = torch.randn(1, H, T, D, generator=g, device=device, dtype=torch.float16)
    v = torch.randn(1, H, T, D, generator=g, device=device, dtype=torch.float16)
    q_idx = torch.arange(T, dtype=torch.int32, device=device)
    bq, bk = cfg.block_size_q, cfg.block_size_k

    def select():
        return hip_select_triton(q, k, q_idx, None, cfg, **tiles["select"])

    def attend(sel):
        return block_sparse_attention_triton(q, k, v, sel, q_idx, None, bq, bk, **tiles["prefill"])

    sel = select()
    nqb = sel.shape[2]
    res = {"case": name, "kind": "prefill", "batch": 1, "T": T,
           "check": check(q, k, v, sel, q_idx, cfg, [(0, 0), (0, nqb // 2), (H - 1, nqb - 1)])}
    res["hip_ms"] = timer(lambda: attend(select()), rep_ms=rep_ms)
    res["select_ms"] = timer(select, rep_ms=rep_ms)
    res["attention_ms"] = timer(lambda: attend(sel), rep_ms=rep_ms)
    res.update(time_sdpa(q, k, v, True, rep_ms))
    res["speedup"] = res["sdpa_ms"] / res["hip_ms"]
    del q, k, v, sel
    free()
    return res


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(T): ~1 for T log T, ~2 for T^2."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(t) for t, _ in points], [math.log(ms) for _, ms in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def table(results: list[dict]) -> str:
    lines = [f"{'case':<18} {'hip ms':>9} {'reuse ms':>9} {'select ms':>9} {'sdpa ms':>9} {'backend':>9} "
             f"{'speed-up':>9} {'reuse x':>8}"]
    for r in results:
        hip = r.get("hip_ms", r.get("hip_recompute_ms"))
        reuse = r.get("hip_reuse_ms", r.get("attention_ms"))
        up = r.get("speedup", r.get("speedup_recompute"))
        lines.append(f"{r['case']:<18} {hip:9.3f} {reuse:9.3f} {r['select_ms']:9.3f} {r['sdpa_ms']:9.3f} "
                     f"{r['sdpa_backend']:>9} {up:8.1f}x {r['sdpa_ms'] / reuse:7.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__doc__, "bench_hip_kernels.json", "tiny shapes; runs on CPU through Triton's interpreter")
    ap.add_argument("--cases", nargs="*", help="run only these case names (default: all)")
    ap.add_argument("--tiles", nargs="*", default=[], metavar="GROUP.NAME=INT",
                    help="kernel tile overrides, e.g. select.cand_tile=64 prefill.keys_per_tile=64 "
                         "decode.keys_per_tile=128 decode.num_warps=8")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench time budget per measurement")
    args = ap.parse_args(argv)
    tiles = parse_tiles(args.tiles)
    setup = SMOKE if args.smoke else FULL
    device = device_or_exit(ap, args.smoke)
    wanted = set(args.cases or [])
    names = [c[0] for c in setup["decode"]] + [c[0] for c in setup["prefill"]]
    if wanted - set(names):
        raise SystemExit(f"unknown --cases {sorted(wanted - set(names))}; choose from {names}")
    results = []
    for name, batch, T in setup["decode"]:
        if not wanted or name in wanted:
            results.append(run_decode(name, batch, T, setup, tiles, args.rep_ms, device))
            print(json.dumps(results[-1]), flush=True)
    for name, T in setup["prefill"]:
        if not wanted or name in wanted:
            results.append(run_prefill(name, T, setup, tiles, args.rep_ms, device))
            print(json.dumps(results[-1]), flush=True)
    prefill = [r for r in results if r["kind"] == "prefill"]
    summary = {
        "hip_prefill_loglog_slope": slope([(r["T"], r["hip_ms"]) for r in prefill]),
        "sdpa_prefill_loglog_slope": slope([(r["T"], r["sdpa_ms"]) for r in prefill]),
        "goals": {name: {"goal_x": goal, **{key: r[key] for key in ("speedup", "speedup_recompute", "speedup_reuse")
                                            if key in r},
                         "met": any(r[key] >= goal for key in ("speedup", "speedup_recompute", "speedup_reuse")
                                    if key in r)}
                  for name, goal in GOALS.items() for r in results if r["case"] == name},
    }
    report = {"hardware": kernel_hardware(), "smoke": args.smoke,
              "settings": {"dtype": "float16", "heads_q": setup["heads"], "heads_kv": setup["heads"],
                           "head_dim": setup["head_dim"], "hip": dataclasses.asdict(setup["cfg"]), "tiles": tiles,
                           "rep_ms": args.rep_ms, "data": "Gaussian q (scaled by D^-0.5), k, v"},
              "published_sdpa_ms": PUBLISHED_SDPA_MS, "results": results, "summary": summary}
    path = args.out / "bench_hip_kernels.json"
    write_json(path, report)
    print(f"wrote {path}")
    print(f"prefill log-log slope: hip {summary['hip_prefill_loglog_slope']}, sdpa {summary['sdpa_prefill_loglog_slope']}")
    print(table(results))


if __name__ == "__main__":
    main()
