"""The results side of the device benchmark suite (`experiments/bench_suite.py`): reading the
numbers a run printed or wrote, the results folder (runs.jsonl, summary.json, copies to the
device's $OUT, following a detached suite), and what is printed for people (the dry-run plan,
the markdown table).

Why it is built this way: the folder is the suite's only memory between 10-minute device calls,
so every write is one that a kill cannot leave half done (a line appended and fsynced, the
summary written to a temporary file and renamed), and a reader skips a line cut short.
FlexGen's printout is parsed with regular expressions of its report lines (our engine prints
the same lines, the fallback where its --json is missing); FlexGen's "GB" are GiB.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.cases import Case
from experiments.suite_runner import flexgen_cut
from offload_engine.sweep import lock_owner

if TYPE_CHECKING:  # only for the annotation: bench_suite imports this module
    from experiments.bench_suite import Suite

NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
REPORT = {  # FlexGen's report lines (ours prints the same); FlexGen's "GB" are GiB
    "model_gib": "model size", "cache_gib": "cache size", "hidden_gib": r"hidden size \(p\)",
    "peak_gpu_mem_gib": "peak gpu mem", "prefill_s": "prefill latency", "prefill_throughput": "prefill throughput",
    "decode_s": "decode latency", "decode_throughput": "decode throughput", "total_s": "total latency",
    "total_throughput": "total throughput",
}


def parse_report(text: str) -> dict:
    """Numbers of the last report in `text` (FlexGen's printout; ours prints the same lines)."""
    out: dict = {}
    for key, label in REPORT.items():
        hits = re.findall(label + r": " + NUMBER, text)
        if hits:
            out[key] = float(hits[-1])
    projected = re.findall(r"projected: (True|False)", text)
    if projected:
        out["projected"] = projected[-1] == "True"
    return out


def parse_ours(data: dict) -> dict:
    """The fields of our engine's --json that the suite keeps."""
    out = dict(data.get("metrics", {}))
    out.update(data.get("peak_memory", {}))
    for key in ("planned_gib", "decode_step_busy_s", "sizes_gib", "policy", "commit", "cuda_graph",
                "cuda_graph_refusal", "hip_hot_cache_hit_rate"):
        if key in data:
            out[key] = data[key]
    out["gpu"] = (data.get("hardware") or {}).get("gpu")
    return out


def copy_out(out: Path, dest: Path | None) -> None:
    """Copy runs.jsonl, runs.log and summary.json to `dest` (the device's $OUT), where given."""
    if dest is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("runs.jsonl", "runs.log", "summary.json"):
        if (out / name).exists():
            shutil.copyfile(out / name, dest / name)


def save_summary(out: Path, hardware: dict, commit: str, flexgen_version: str | None, budget_s: float,
                 skipped: list[str], runs: list[dict], copy_to: Path | None) -> dict:
    """Rewrite out/summary.json (atomically) and copy the files to `copy_to`; returns the hardware
    written: with nothing probed in this call, the last summary's."""
    path = out / "summary.json"
    if not hardware and path.exists():  # nothing ran in this call: keep the last probe
        hardware = json.loads(path.read_text()).get("hardware") or {}
    summary = dict(hardware=hardware, commit=commit, flexgen_version=flexgen_version,
                   budget_s=budget_s, skipped=skipped, runs=runs,
                   notes="FlexGen's GB are GiB; a FlexGen run with cut_gen_len decodes that many steps and "
                         "extrapolates (projected: true); ours decodes every step.")
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, path)
    copy_out(out, copy_to)
    return hardware


def wait(out: Path, seconds: float, copy_to: Path | None) -> bool:
    """Follow a detached suite writing `out`: copy its files every few seconds; True once it has ended."""
    t0 = time.monotonic()
    while lock_owner(out / ".suite.lock") and time.monotonic() - t0 < seconds:
        copy_out(out, copy_to)
        time.sleep(min(5.0, max(0.1, seconds - (time.monotonic() - t0))))
    copy_out(out, copy_to)
    return lock_owner(out / ".suite.lock") is None


BUSY = {"weight_io": "w", "kv_io": "kv", "act_io": "act", "compute": "gpu", "cpu_attention": "cpu-attn"}


def table(records: list[dict], cases: dict[str, Case], names: list[str]) -> str:
    """Markdown: the latest record of each (case, system) of the chosen cases and their FlexGen
    peers (ours and FlexGen, then Accelerate), ours and Accelerate compared with the FlexGen peer."""
    latest = {(r.get("case"), r.get("system")): r for r in records}
    ok_flexgen = {r["case"]: r for r in records if r.get("system") == "flexgen" and r.get("status") == "ok"}
    lines = ["| case | system | batch | prefill s | decode s | token/s | vs FlexGen | peak GPU GiB "
             "| busy per decode step (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    shown = [pair for name in names for pair in ((name, "ours"), (cases[name].peer_name(), "flexgen"))]
    shown += [(n, "accelerate") for name in names for n in (name, cases[name].peer_name()) if n in cases]
    for name, system in dict.fromkeys(shown):
        r = latest.get((name, system))
        if r is None:
            continue
        batch = "x".join(map(str, r["batch"])) if r.get("batch") else "-"
        if r.get("status") != "ok":
            lines.append(f"| {name} | {system} | {batch} | | | {r.get('status')} | | | |")
            continue
        tput = f"{r['total_throughput']:,.1f}" + (f" (cut {r['cut_gen_len']})" if r.get("cut_gen_len") else "")
        peer = ok_flexgen.get(cases[name].peer_name()) if system != "flexgen" else None
        ratio = f"{r['total_throughput'] / peer['total_throughput']:.2f}x" if peer else ""
        if system == "accelerate":
            last = "weights GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in (r.get("placement_gib") or {}).items() if v)
        else:
            last = ", ".join(f"{BUSY.get(k, k)} {v * 1e3:.0f}" for k, v in sorted((r.get("decode_step_busy_s") or {}).items()))
        lines.append(f"| {name} | {system} | {batch} | {r.get('prefill_s', 0):.3f} | {r.get('decode_s', 0):.3f} | "
                     f"{tput} | {ratio} | {r.get('peak_gpu_mem_gib', 0):.2f} | {last} |")
    return "\n".join(lines)


def dry_run(suite: Suite) -> None:
    """Print what a run would do, command by command, with our planner's GiB per tier; run nothing."""
    records = suite.records()
    print(f"# dry run: commit {suite.engine_commit()}, flexgen {suite.flexgen_version}, "
          f"budget {suite.budget_s:.0f} s")
    for name, system in suite.jobs():
        case, key = suite.cases[name], suite.key(name, system)
        policy = case.policy(system)
        done = suite.done(key, records)
        print(f"\n## {system} {name}: about {suite.estimate(name, system, records):.0f} s"
              + (f"; done earlier ({done['status']}): skipped" if done else ""))
        if system == "flexgen" and flexgen_cut(case, suite.flexgen_cut_gen_len):
            print(f"# FlexGen decodes {flexgen_cut(case, suite.flexgen_cut_gen_len)} steps and extrapolates")
        for i, batch in enumerate(policy.batches()):
            cmd = suite.command(name, system, batch)
            if i:
                print(f"# if {'x'.join(map(str, policy.batches()[i - 1]))} does not fit:")
            print(f"$ rm -rf {suite.offload_root / system}")
            if policy.uses_disk and suite.drop_caches:
                print("$ sync; echo 1 > /proc/sys/vm/drop_caches")
            print("$ " + shlex.join(cmd))
            plan = suite.plan(cmd) if system == "ours" else None
            if plan:
                over = case.gpu_cap_gib and plan["gpu_min"] > case.gpu_cap_gib
                print(f"# planned GiB: gpu {plan['gpu']:.2f} (2 slots: {plan['gpu_min']:.2f}), "
                      f"cpu {plan['cpu']:.2f}, disk {plan['disk']:.2f}"
                      + (f": over the {case.gpu_cap_gib:g} GiB cap, refused" if over else ""))
