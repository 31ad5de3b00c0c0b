"""CPU use per thread of a running process, from /proc: which threads burn the cores (a spinning
wait, an OpenMP team, the CUDA driver's threads) while, say, CPU attention should have them all.

  python experiments/thread_cpu.py PID [--window 2] [--every 5] [--count 3] [--json FILE]

Each sample counts user + system ticks per thread over `window` seconds and prints the busiest
threads (name, percent of one core, the core it last ran on).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, user + system ticks, last core)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = (name, int(fields[11]) + int(fields[12]), int(fields[36]))
    return out


def sample(pid: int, window: float) -> list[dict]:
    before = thread_ticks(pid)
    time.sleep(window)
    after = thread_ticks(pid)
    rows = [{"tid": tid, "name": name, "core": core,
             "cpu_pct": round(100 * (ticks - before[tid][1]) / TICK / window, 1)}
            for tid, (name, ticks, core) in after.items() if tid in before]
    return sorted(rows, key=lambda r: -r["cpu_pct"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pid", type=int)
    ap.add_argument("--window", type=float, default=2.0, help="seconds per sample")
    ap.add_argument("--every", type=float, default=5.0, help="seconds from one sample's start to the next")
    ap.add_argument("--count", type=int, default=3, help="samples")
    ap.add_argument("--json", type=Path, help="also write every sample here")
    args = ap.parse_args()
    if not Path(f"/proc/{args.pid}").is_dir():
        ap.error(f"no process {args.pid}")
    samples = []
    for n in range(args.count):
        t0 = time.monotonic()
        try:
            rows = sample(args.pid, args.window)
        except (FileNotFoundError, KeyError):
            break  # the process ended
        total = sum(r["cpu_pct"] for r in rows)
        print(f"sample {n}: {total:.0f}% of one core in all, {len(rows)} threads")
        for r in rows[:24]:
            if r["cpu_pct"] >= 1:
                print(f"  {r['tid']:>8} {r['name']:<16} {r['cpu_pct']:6.1f}%  core {r['core']}")
        samples.append({"time": time.time(), "total_pct": round(total, 1), "threads": rows})
        if args.json:
            args.json.write_text(json.dumps(samples, indent=1))
        time.sleep(max(0.0, args.every - (time.monotonic() - t0)))


if __name__ == "__main__":
    main()
