"""Throughput of this engine beside the published FlexGen, same machine, same policies, one call.

Cases (from FlexGen's benchmark and the baselines measured on the lent H100):
  opt-6.7b-gpu   all on GPU, batch 32, 512 + 32 tokens
  opt-30b-cap16  GPU capped at 16 GiB, --percent 20 80 0 100 0 100, batch 24 x 2, CPU attention, 512 + 32

Each run is its own process. Writes <out>/summary.json (every run's numbers, hardware, commit)
and <out>/runs.log (all output); prints a table last.
  PYTHONPATH=. python experiments/bench_vs_flexgen.py --out results/ [--cases ...] [--engines ours flexgen]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload_engine.metrics import git_commit, hardware, write_json_atomic  # noqa: E402

CASES = {
    "opt-6.7b-gpu": dict(model="opt-6.7b", percent=[100, 0, 100, 0, 100, 0], gpu_batch_size=32, num_gpu_batches=1,
                         cpu_cache_compute=False, gpu_cap_gib=None, prompt_len=512, gen_len=32),
    "opt-30b-cap16": dict(model="opt-30b", percent=[20, 80, 0, 100, 0, 100], gpu_batch_size=24, num_gpu_batches=2,
                          cpu_cache_compute=True, gpu_cap_gib=16, prompt_len=512, gen_len=32),
}
NUMBER = r"([0-9.]+)"


def ours_command(case: dict, json_path: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "offload_engine", "run", "--model", case["model"],
           "--prompt-len", str(case["prompt_len"]), "--gen-len", str(case["gen_len"]),
           "--percent", *map(str, case["percent"]), "--gpu-batch-size", str(case["gpu_batch_size"]),
           "--num-gpu-batches", str(case["num_gpu_batches"]), "--json", str(json_path), "--profile", "--quiet"]
    if case["cpu_cache_compute"]:
        cmd.append("--cpu-cache-compute")
    if case["gpu_cap_gib"]:
        cmd += ["--gpu-mem", str(case["gpu_cap_gib"])]
    return cmd + extra


def flexgen_command(case: dict, cut_gen_len: int | None) -> list[str]:
    cmd = [sys.executable, str(ROOT / "experiments" / "flexgen_peer.py"), "--model", f"facebook/{case['model']}",
           "--path", "_DUMMY_", "--prompt-len", str(case["prompt_len"]), "--gen-len", str(case["gen_len"]),
           "--percent", *map(str, case["percent"]), "--gpu-batch-size", str(case["gpu_batch_size"]),
           "--num-gpu-batches", str(case["num_gpu_batches"])]
    if case["cpu_cache_compute"]:
        cmd.append("--cpu-cache-compute")
    if case["gpu_cap_gib"]:
        cmd += ["--gpu-cap-gib", str(case["gpu_cap_gib"])]
    if cut_gen_len:
        cmd += ["--cut-gen-len", str(cut_gen_len)]
    return cmd


def parse_flexgen(text: str) -> dict:
    out = {}
    for key, pattern in (("prefill_s", "prefill latency: " + NUMBER), ("decode_s", "decode latency: " + NUMBER),
                         ("total_throughput", "total throughput: " + NUMBER),
                         ("decode_throughput", "decode throughput: " + NUMBER),
                         ("peak_gpu_mem_gib", "peak gpu mem: " + NUMBER)):  # FlexGen's "GB" are GiB
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    return out


def run(cmd: list[str], log, timeout: int) -> tuple[int, str, float]:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    log.write(text)
    log.flush()
    return rc, text, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--engines", nargs="+", default=["ours", "flexgen"], choices=["ours", "flexgen"])
    ap.add_argument("--flexgen-cut-gen-len", type=int, default=None,
                    help="FlexGen's --cut-gen-len for offloaded cases: decode that many steps and extrapolate")
    ap.add_argument("--ours-extra", nargs=argparse.REMAINDER, default=[], help="extra flags for this engine")
    ap.add_argument("--timeout", type=int, default=480)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}  # earlier calls: keep their runs
    summary.update(hardware=hardware(), commit=git_commit())
    summary.setdefault("runs", [])
    with open(args.out / "runs.log", "a") as log:
        for name in args.cases:
            case = CASES[name]
            for engine in args.engines:
                if engine == "ours":
                    jpath = args.out / f".ours_{name}.json"
                    rc, text, wall = run(ours_command(case, jpath, args.ours_extra), log, args.timeout)
                    data = json.loads(jpath.read_text()) if rc == 0 and jpath.exists() else {}
                    jpath.unlink(missing_ok=True)
                    res = dict(data.get("metrics", {}), **data.get("peak_memory", {}),
                               decode_step_busy_s=data.get("decode_step_busy_s"), planned_gib=data.get("planned_gib"))
                else:
                    cut = args.flexgen_cut_gen_len if case["gpu_cap_gib"] else None
                    rc, text, wall = run(flexgen_command(case, cut), log, args.timeout)
                    res = dict(parse_flexgen(text), cut_gen_len=cut)
                summary["runs"].append(dict(case=name, engine=engine, settings=case, rc=rc, wall_s=wall, **res,
                                            tail=text[-1500:] if rc else ""))
                write_json_atomic(summary_path, summary)
    print(f"\n{'case':<15}{'engine':<9}{'rc':>4}{'prefill s':>11}{'decode s':>10}{'token/s':>10}{'peak GPU GiB':>13}")
    for r in summary["runs"]:
        print(f"{r['case']:<15}{r['engine']:<9}{r['rc']:>4}{r.get('prefill_s', 0):>11.3f}{r.get('decode_s', 0):>10.3f}"
              f"{r.get('total_throughput', 0):>10.1f}{r.get('peak_gpu_mem_gib', r.get('peak_gpu_mem_gb', 0)):>13.2f}")
        if r.get("decode_step_busy_s"):
            print("   busy per decode step: " + ", ".join(f"{k} {v * 1e3:.1f} ms"
                                                         for k, v in sorted(r["decode_step_busy_s"].items())))


if __name__ == "__main__":
    main()
