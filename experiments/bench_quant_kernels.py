"""4-bit / 8-bit group-wise kernels (kernels/quant*.py) against their fp16 counterparts (device machine).

  PYTHONPATH=. python experiments/bench_quant_kernels.py --out DIR            # H100, fp16
  PYTHONPATH=. python experiments/bench_quant_kernels.py --out DIR --smoke    # tiny, CPU ok

Measured with do_bench (median), every result checked before it is timed:
  hbm          a large device-to-device copy: the memory bound the kernels are compared with
  gemv         OPT-30B / OPT-6.7B linear shapes (N, K), M rows: the fused dequant-GEMM
               (quant_linear_triton, plus a small block_n / num_warps sweep), the dispatcher
               quant_linear (fused up to FUSED_MAX_ROWS, else dequantize + F.linear), dequantize +
               F.linear always, and F.linear on the fp16 weight; GB/s counts packed bytes read
  codec        quantize / dequantize throughput at the same weight shapes
  attention    quant_decode_attention (Triton flash-decoding on the packed cache, with and without
               probabilities and left padding) vs SDPA on the dequantized fp16 cache (token-major
               views as the engine holds them, and contiguous head-major), OPT-30B decode
               (B=64, H=56, D=128, T=544) and a long cache (B=8, H=32, D=128, T=8192), plus a
               num_splits sweep to check the kernel's default
  cpu_attention  the CPU path (engine's CPU attention over a compressed cache) vs fp16 SDPA on CPU
  bytes        per-decode-step weight bytes of OPT-30B / OPT-6.7B, fp16 vs packed (arithmetic)
Writes DIR/bench_quant_kernels.json after every section and prints a table last.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_common first: it chooses TRITON_INTERPRET (no GPU) before the kernels import triton.
from experiments import bench_common  # noqa: E402
from experiments.bench_common import (GiB, add_timing_args, arg_parser, device_or_exit, hbm_copy_ms,  # noqa: E402
                                      kernel_hardware, rel_err, write_json)
from offload_engine.kernels.quant.pack import QuantSpec, dequantize, dequantize_triton, quantize, quantize_triton  # noqa: E402
from offload_engine.kernels.quant.attention import (quant_decode_attention, quant_decode_attention_reference,  # noqa: E402
                                     quant_decode_attention_triton)
from offload_engine.kernels.quant.linear import (FUSED_MAX_ROWS, quant_linear, quant_linear_reference,  # noqa: E402
                                  quant_linear_triton)

LINEAR_SHAPES = {"opt-30b": [(7168, 7168), (28672, 7168), (7168, 28672)],
                 "opt-6.7b": [(4096, 4096), (16384, 4096), (4096, 16384)]}
ROWS = [1, 8, 32, 64]
ATTENTION = [("opt-30b", 64, 56, 128, 544), ("long", 8, 32, 128, 8192)]   # name, B, H, D, T
CPU_ATTENTION = [("opt-30b", 24, 56, 128, 544)]                          # the engine's CPU-attention case
MODELS = {"opt-30b": (7168, 48), "opt-6.7b": (4096, 32)}                  # hidden, layers (ffn = 4x)
SMOKE = dict(linear={"tiny": [(96, 80), (40, 130)]}, rows=[1, 3], attention=[("tiny", 2, 4, 64, 40),
             ("tiny-long", 1, 2, 64, 150)], cpu_attention=[("tiny", 2, 4, 64, 40)])


def timer(fn, args, cpu: bool = False) -> float:
    """Median ms: do_bench on the GPU; a wall-clock median after one warm-up call on CPU (smoke, CPU attention)."""
    return bench_common.timer(fn, args.warmup, args.rep, wall_clock=cpu, reps=3 if args.smoke else 5, warm_call=True)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    backends = ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if q.is_cuda
                else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def hbm_bound(args, device) -> dict:
    n = (8 << 20) if args.smoke else (2 * GiB)
    ms = hbm_copy_ms(n, device, lambda fn: timer(fn, args))
    return dict(copy_bytes=n, copy_ms=ms, GBps=2 * n / ms / 1e6)          # read + write


def gemv_case(n: int, k: int, m: int, spec: QuantSpec, args, device, hbm: float) -> dict:
    g = torch.Generator(device=device).manual_seed(n + 3 * k + m)
    w16 = (torch.randn(n, k, generator=g, device=device) * 0.02).half()
    packed = quantize_triton(w16, spec)
    x = torch.randn(m, k, generator=g, device=device).half()
    row = dict(N=n, K=k, M=m, packed_bytes=packed.numel(), fp16_bytes=2 * n * k)
    # Checks: float64 reference on the first 256 output features; the dispatcher on all of them.
    fused = quant_linear_triton(x, packed, spec, k)
    ref = quant_linear_reference(x, packed[:256], spec, k)
    row["err_fused_vs_ref"] = rel_err(fused[:, :256], ref)
    row["err_dispatch_vs_fused"] = rel_err(quant_linear(x, packed, spec, k), fused)
    row["err_vs_fp16_weight"] = rel_err(fused, F.linear(x, w16))               # quantization error itself
    row["checks_passed"] = row["err_fused_vs_ref"] < 2e-3 and row["err_dispatch_vs_fused"] < 2e-3
    if not row["checks_passed"]:
        print(f"CHECK FAILED {row}", flush=True)
        return row
    row["fused_ms"] = timer(lambda: quant_linear_triton(x, packed, spec, k), args)
    row["dispatch_ms"] = timer(lambda: quant_linear(x, packed, spec, k), args)
    row["dequant_linear_ms"] = timer(lambda: F.linear(x, dequantize_triton(packed, spec, k, torch.float16)), args)
    row["fp16_linear_ms"] = timer(lambda: F.linear(x, w16), args)
    if not args.smoke:   # a small config sweep so FUSED_MAX_ROWS and the defaults can be revisited
        sweep = {}
        for bn in (16, 32, 64, 128):
            for warps in (4, 8):
                try:
                    sweep[f"bn{bn}_w{warps}"] = timer(
                        lambda: quant_linear_triton(x, packed, spec, k, block_n=bn, num_warps=warps), args)
                except Exception as err:  # noqa: BLE001 (a config that does not compile is just skipped)
                    sweep[f"bn{bn}_w{warps}"] = repr(err)[:120]
        row["fused_sweep_ms"] = sweep
        best = min((v, c) for c, v in sweep.items() if isinstance(v, float))
        row["fused_best_ms"], row["fused_best_config"] = best
    row["fused_GBps"] = row["packed_bytes"] / row["fused_ms"] / 1e6
    row["fused_frac_hbm"] = row["fused_GBps"] / hbm
    row["fp16_linear_GBps"] = row["fp16_bytes"] / row["fp16_linear_ms"] / 1e6
    row["speedup_vs_fp16"] = row["fp16_linear_ms"] / row["fused_ms"]
    row["dispatch_path"] = "fused" if m <= FUSED_MAX_ROWS else "dequantize+F.linear"
    return row


def codec_case(n: int, k: int, spec: QuantSpec, args, device) -> dict:
    g = torch.Generator(device=device).manual_seed(n + k)
    w16 = (torch.randn(n, k, generator=g, device=device) * 0.02).half()
    packed = quantize_triton(w16, spec)
    back = dequantize_triton(packed, spec, k, torch.float16)
    row = dict(N=n, K=k, packed_bytes=packed.numel(), fp16_bytes=2 * n * k,
               err_round_trip=rel_err(back, w16),
               torch_path_identical=bool(torch.equal(quantize(w16[:64].cpu(), spec), packed[:64].cpu())))
    row["checks_passed"] = row["torch_path_identical"] and row["err_round_trip"] < 0.2
    if not row["checks_passed"]:   # the compiled kernel must give the CPU path's exact bytes
        print(f"CHECK FAILED {row}", flush=True)
        return row
    row["quantize_ms"] = timer(lambda: quantize_triton(w16, spec, out=packed), args)
    row["dequantize_ms"] = timer(lambda: dequantize_triton(packed, spec, k, torch.float16, out=back), args)
    moved = row["packed_bytes"] + row["fp16_bytes"]
    row["quantize_GBps"] = moved / row["quantize_ms"] / 1e6
    row["dequantize_GBps"] = moved / row["dequantize_ms"] / 1e6
    return row


def attention_case(name: str, b: int, h: int, d: int, t: int, spec: QuantSpec, args, device, cpu_path: bool) -> dict:
    g = torch.Generator(device=device).manual_seed(b * 31 + t)
    kc = torch.randn(t, b, h, d, generator=g, device=device).half()      # token-major, as the engine's cache
    vc = torch.randn(t, b, h, d, generator=g, device=device).half()
    k, v = quantize(kc, spec), quantize(vc, spec)                         # Triton on CUDA, torch on CPU
    q = (torch.randn(b, h, d, generator=g, device=device) * d ** -0.5).half()
    valid = torch.ones(b, t, dtype=torch.bool, device=device)
    valid[0, : t // 8] = False                                             # some left padding
    kd = dequantize(k, spec, d, torch.float16).permute(1, 2, 0, 3)         # (B, H, T, D) views
    vd = dequantize(v, spec, d, torch.float16).permute(1, 2, 0, 3)
    kh, vh = kd.contiguous(), vd.contiguous()
    q4 = q[:, :, None, :]
    run = quant_decode_attention if cpu_path else quant_decode_attention_triton
    row = dict(case=name, B=b, H=h, D=d, T=t, packed_kv_bytes=2 * k.numel(), fp16_kv_bytes=2 * 2 * kc.numel())
    out, probs = run(q, k, v, spec, d, t, return_probs=True)
    ref_out, ref_probs = quant_decode_attention_reference(q[:2], k[:, :2], v[:, :2], spec, d, t)
    row["err_vs_ref"] = rel_err(out[:2], ref_out)
    row["err_probs_vs_ref"] = float((probs[:2].double() - ref_probs).abs().max())
    row["err_vs_sdpa_dequantized"] = rel_err(out, sdpa(q4, kd, vd)[:, :, 0])
    masked = run(q, k, v, spec, d, t, valid)
    ref_masked, _ = quant_decode_attention_reference(q[:1], k[:, :1], v[:, :1], spec, d, t, valid[:1])
    row["err_masked_vs_ref"] = rel_err(masked[:1], ref_masked)
    row["checks_passed"] = (row["err_vs_ref"] < 2e-3 and row["err_probs_vs_ref"] < 1e-4
                            and row["err_vs_sdpa_dequantized"] < 2e-3 and row["err_masked_vs_ref"] < 2e-3)
    if not row["checks_passed"]:
        print(f"CHECK FAILED {row}", flush=True)
        return row
    row["ours_ms"] = timer(lambda: run(q, k, v, spec, d, t), args, cpu=cpu_path)
    row["ours_probs_ms"] = timer(lambda: run(q, k, v, spec, d, t, return_probs=True), args, cpu=cpu_path)
    row["ours_masked_ms"] = timer(lambda: run(q, k, v, spec, d, t, valid), args, cpu=cpu_path)
    row["sdpa_token_major_ms"] = timer(lambda: sdpa(q4, kd, vd), args, cpu=cpu_path)
    row["sdpa_head_major_ms"] = timer(lambda: sdpa(q4, kh, vh), args, cpu=cpu_path)
    if not cpu_path and not args.smoke:   # is the default split count (8 programs per SM) right?
        row["splits_sweep_ms"] = {str(s): timer(lambda: run(q, k, v, spec, d, t, num_splits=s), args)
                                  for s in (1, 2, 4, 8, 16, 32)}
    if not cpu_path:
        def dequant_then_sdpa():
            return sdpa(q4, dequantize(k, spec, d, torch.float16).permute(1, 2, 0, 3),
                        dequantize(v, spec, d, torch.float16).permute(1, 2, 0, 3))
        row["dequant_then_sdpa_ms"] = timer(dequant_then_sdpa, args)
    row["ours_GBps"] = row["packed_kv_bytes"] / row["ours_ms"] / 1e6
    row["sdpa_head_major_GBps"] = row["fp16_kv_bytes"] / row["sdpa_head_major_ms"] / 1e6
    row["speedup_vs_sdpa_token_major"] = row["sdpa_token_major_ms"] / row["ours_ms"]
    return row


def bytes_per_step(spec: QuantSpec) -> dict:
    """Decoder linear weights streamed once per decode step (embeddings, norms, biases left out)."""
    out = {}
    for model, (hidden, layers) in MODELS.items():
        shapes = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
        fp16 = layers * sum(2 * n * k for n, k in shapes)
        packed = layers * sum(spec.packed_nbytes((n, k)) for n, k in shapes)
        out[model] = dict(fp16_bytes=fp16, packed_bytes=packed, ratio=fp16 / packed,
                          kv_fp16_bytes_per_token=layers * 2 * hidden * 2,
                          kv_packed_bytes_per_token=layers * 2 * spec.packed_nbytes((hidden // 128, 128)))
    return out


def table(res: dict) -> str:
    lines = [f"HBM copy {res['hbm']['GBps']:.0f} GB/s; {res['settings']}",
             f"{'N':>6} {'K':>6} {'M':>3} {'fused ms':>9} {'GB/s':>6} {'%HBM':>5} {'fp16 ms':>8} {'deq+lin':>8} "
             f"{'x fp16':>6} {'best cfg':>10}"]
    for r in res["gemv"]:
        if not r.get("checks_passed"):
            lines.append(f"{r['N']:>6} {r['K']:>6} {r['M']:>3} CHECK FAILED")
            continue
        lines.append(f"{r['N']:>6} {r['K']:>6} {r['M']:>3} {r['fused_ms']:>9.4f} {r['fused_GBps']:>6.0f} "
                     f"{100 * r['fused_frac_hbm']:>5.1f} {r['fp16_linear_ms']:>8.4f} {r['dequant_linear_ms']:>8.4f} "
                     f"{r['speedup_vs_fp16']:>6.2f} {r.get('fused_best_config', '-'):>10}")
    lines.append(f"{'codec N x K':>14} {'quant GB/s':>10} {'dequant GB/s':>12}")
    for r in res["codec"]:
        if not r.get("checks_passed"):
            lines.append(f"{r['N']:>6} x {r['K']:>5} CHECK FAILED")
            continue
        lines.append(f"{r['N']:>6} x {r['K']:>5} {r['quantize_GBps']:>10.0f} {r['dequantize_GBps']:>12.0f}")
    lines.append(f"{'attention':>14} {'B':>3} {'H':>3} {'T':>5} {'ours ms':>8} {'GB/s':>6} {'+probs':>7} "
                 f"{'sdpa tm':>8} {'sdpa hm':>8} {'x sdpa':>6}")
    for key in ("attention", "cpu_attention"):
        for r in res[key]:
            label = ("cpu " if key == "cpu_attention" else "") + r["case"]
            if not r.get("checks_passed"):
                lines.append(f"{label:>14} CHECK FAILED")
                continue
            lines.append(f"{label:>14} {r['B']:>3} {r['H']:>3} {r['T']:>5} {r['ours_ms']:>8.3f} {r['ours_GBps']:>6.0f} "
                         f"{r['ours_probs_ms']:>7.3f} {r['sdpa_token_major_ms']:>8.3f} {r['sdpa_head_major_ms']:>8.3f} "
                         f"{r['speedup_vs_sdpa_token_major']:>6.2f}")
    for model, r in res["bytes_per_step"].items():
        lines.append(f"{model}: weights/step fp16 {r['fp16_bytes'] / GiB:.2f} GiB, "
                     f"packed {r['packed_bytes'] / GiB:.2f} GiB ({r['ratio']:.2f}x less)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = arg_parser(__doc__, "bench_quant_kernels.json", "tiny shapes; runs on CPU (Triton interpreter)")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=64)
    add_timing_args(p)
    p.add_argument("--no-cpu-attention", action="store_true", help="skip the CPU-path attention case")
    args = p.parse_args(argv)
    device = device_or_exit(p, args.smoke)
    spec = QuantSpec(args.bits, args.group_size)
    linear = SMOKE["linear"] if args.smoke else LINEAR_SHAPES
    rows = SMOKE["rows"] if args.smoke else ROWS
    hardware = dict(kernel_hardware(), cpu_threads=torch.get_num_threads())
    res = dict(hardware=hardware, settings=dict(bits=spec.bits, group_size=spec.group_size, dtype="float16",
               smoke=args.smoke, warmup_ms=args.warmup, rep_ms=args.rep, fused_max_rows=FUSED_MAX_ROWS),
               hbm={}, gemv=[], codec=[], attention=[], cpu_attention=[], bytes_per_step=bytes_per_step(spec))
    path = args.out / "bench_quant_kernels.json"
    torch.manual_seed(0)
    res["hbm"] = hbm_bound(args, device)
    write_json(path, res)
    for model, shapes in linear.items():
        for n, k in shapes:
            for m in rows:
                res["gemv"].append(dict(model=model, **gemv_case(n, k, m, spec, args, device, res["hbm"]["GBps"])))
                write_json(path, res)
            res["codec"].append(dict(model=model, **codec_case(n, k, spec, args, device)))
            write_json(path, res)
            if device == "cuda":
                torch.cuda.empty_cache()
    for case in (SMOKE["attention"] if args.smoke else ATTENTION):
        res["attention"].append(attention_case(*case, spec, args, device, cpu_path=False))
        write_json(path, res)
    if not args.no_cpu_attention:
        for case in (SMOKE["cpu_attention"] if args.smoke else CPU_ATTENTION):
            res["cpu_attention"].append(attention_case(*case, spec, args, "cpu", cpu_path=True))
            write_json(path, res)
    print(f"wrote {path}")
    print(table(res))


if __name__ == "__main__":
    main()
