"""The host-side probes behind the CPU attention notes: experiments/thread_cpu.py (per-thread CPU
use of a running process) and experiments/bench_host_pages.py (its smoke mode on any machine)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")


def test_thread_cpu_finds_the_busy_thread_and_not_the_sleeping_one():
    from experiments.thread_cpu import sample

    stop = threading.Event()

    def spin():  # hashing a large buffer releases the GIL: a full core however busy the process is
        block = os.urandom(1 << 20)
        while not stop.is_set():
            hashlib.sha256(block).digest()

    def doze():
        while not stop.is_set():
            time.sleep(0.01)
    busy, idle = threading.Thread(target=spin), threading.Thread(target=doze)
    busy.start()
    idle.start()
    try:
        rows = {r["tid"]: r for r in sample(os.getpid(), 0.6)}
    finally:
        stop.set()
        busy.join()
        idle.join()
    assert rows[busy.native_id]["cpu_pct"] >= 30
    assert rows[idle.native_id]["cpu_pct"] <= 10
    assert all(r["cpu_pct"] >= 0 for r in rows.values())


def test_thread_cpu_refuses_a_missing_process():
    beyond_pid_max = str(2 ** 22 + 12345)  # Linux's largest pid_max is 2^22
    gone = subprocess.run([sys.executable, str(ROOT / "experiments/thread_cpu.py"), beyond_pid_max],
                          capture_output=True, text=True)
    assert gone.returncode == 2 and "no process" in gone.stderr


def test_bench_host_pages_smoke_writes_both_modes(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "experiments/bench_host_pages.py"), "--out", str(tmp_path),
                          "--smoke", "--rounds", "1"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "bench_host_pages.json").read_text())
    assert [r["mode"] for r in result["rows"]] == ["default pages", "huge pages advised"]
    assert all(r["attention_gbps"] > 0 and 0 <= r["huge_fraction"] <= 1 for r in result["rows"])
