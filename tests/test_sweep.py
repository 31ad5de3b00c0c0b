"""`offload-engine sweep`: the grid (flags, TOML, errors), ids, the resumable runner with a fake
engine (interrupts, failures, --retry-failed, --force), the result files, the plots, killing a
point's process group, and one real sweep of tiny OPT-125m runs through subprocesses, stopped
with SIGTERM and resumed."""
from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from offload_engine.cli import build_parser, main
from offload_engine.cli.sweep import grid_from_args
from offload_engine.sweep import (Outcome, Sweep, SweepError, expand, read_grid, read_records, run_parser,
                                  run_process, signals_held)

ROOT = Path(__file__).resolve().parent.parent
PERCENTS = ("100 0 100 0 100 0", "50 50 100 0 100 0")


def sweep_args(out: Path, *flags: str):
    return build_parser().parse_args(["sweep", "--out", str(out), *flags])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class FakeRunner:
    """Stands in for the engine process: reads the run flags the sweep passes, writes a results
    JSON like `run --json` does, or fails the way a run fails (by --gpu-batch-size)."""

    def __init__(self, interrupt_at: int | None = None, predicted: bool = False):
        self.calls: list[list[str]] = []
        self.interrupt_at, self.predicted = interrupt_at, predicted

    def ids(self) -> list[str]:
        return [Path(c[c.index("--json") + 1]).name[len(".point-"):-len(".json")] for c in self.calls]

    def __call__(self, cmd: list[str], timeout_s: float, log_path: Path) -> Outcome:
        self.calls.append(cmd)
        assert cmd[1:4] == ["-m", "offload_engine", "run"] and cmd[-1] == "--quiet"
        args = run_parser().parse_args(cmd[cmd.index("run") + 1:])
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        log_path.write_text("fake\n")
        b = args.gpu_batch_size
        if b == 3:
            return Outcome(2, "opt-125m\nerror: policy does not fit: the GPU tier needs 0.53 GiB. Lower it.\n", 0.1)
        if b == 5:
            return Outcome(-15, "loading\n", timeout_s, timed_out=True)
        if b == 6:
            return Outcome(-9, "loading\n", 0.5)
        if b == 7:
            return Outcome(1, "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n", 0.1)
        if b == 8:
            return Outcome(0, "no json\n", 0.1)
        if b == 9:
            return Outcome(2, "error: the GPU ran out of memory beyond the plan (CUDA out of memory).\n", 0.1)
        k = args.num_gpu_batches
        data = {"metrics": {"total_throughput": 10.0 * b * k + 0.25, "total_s": 1.5 + b, "prefill_s": 0.5,
                            "decode_s": 1.0 + b, "decode_throughput": 3.0 * b},
                "peak_memory": {"peak_gpu_mem_gib": 0.125 * b}, "planned_gib": {"gpu": 0.5 * b},
                "policy": {"gpu_batch_size": b, "num_gpu_batches": k}}
        if self.predicted:
            data["predicted"] = {"total_throughput": 9.0 * b * k}
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(data))
        return Outcome(0, "total throughput: 1.0 token/s\n", 0.1)


def make_sweep(points, out, runner, **kw) -> Sweep:
    return Sweep(points, out, runner=runner, plots=kw.pop("plots", False), echo=lambda s: None, **kw)


def csv_rows(out: Path) -> list[dict]:
    with open(out / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_files_agree(out: Path) -> None:
    records, rows = read_records(out / "sweep.jsonl"), csv_rows(out)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    for rec, row in zip(records, rows):
        assert row["status"] == rec["status"]
        assert row["error"] == (rec["error"] or "")
        for name, value in rec["settings"].items():
            assert row[name] == str(value)
        m = (rec["result"] or {}).get("metrics")
        assert (float(row["total_token_s"]) == m["total_throughput"]) if m else row["total_token_s"] == ""
        if m:
            assert float(row["decode_s"]) == m["decode_s"] and float(row["total_s"]) == m["total_s"]


# --- the grid ----------------------------------------------------------------------------------

def test_grid_from_flags_is_the_cartesian_product(tmp_path):
    args = sweep_args(tmp_path, "--model", "opt-125m", "--gpu-batch-size", "1", "2", "4", "--num-gpu-batches",
                      "1", "2", "--percent", *PERCENTS, "--kv-policy", "full", "h2o", "--no-overlap")
    points = expand(*grid_from_args(args))
    assert len(points) == 3 * 2 * 2 * 2 and len({p.id for p in points}) == 24
    got = {(p.settings["gpu-batch-size"], p.settings["num-gpu-batches"], p.settings["percent"],
            p.settings["kv-policy"]) for p in points}
    assert got == set(itertools.product(("1", "2", "4"), ("1", "2"), PERCENTS, ("full", "h2o")))
    parser = run_parser()
    for p in points:  # each point's flags are a run the run parser reads back to the same values
        ns = parser.parse_args(list(p.argv))
        assert ns.gpu_batch_size == int(p.settings["gpu-batch-size"]) and ns.kv_policy == p.settings["kv-policy"]
        assert ns.percent == [float(x) for x in p.settings["percent"].split()] and ns.overlap is False
        assert p.settings["model"] == "opt-125m"
        cmd = p.command(tmp_path / "x.json")
        assert cmd[:4] == [sys.executable, "-m", "offload_engine", "run"]
        assert cmd[-3:] == ["--json", str(tmp_path / "x.json"), "--quiet"]


def test_grid_from_toml_with_fixed_table_matches_flags(tmp_path):
    grid = write(tmp_path / "grid.toml", """
gpu-batch-size = [1, 2]
percent = [[100, 0, 100, 0, 100, 0], "50 50 100 0 100 0"]
cpu_cache_compute = [true, false]
[fixed]
model = "opt-125m"
prompt-len = 8
hh-ratio = 0.2
""")
    swept, fixed = read_grid(grid)
    points = expand(swept, fixed)
    assert len(points) == 8
    assert all(p.settings["prompt-len"] == "8" and p.settings["hh-ratio"] == "0.2" for p in points)
    assert {p.settings["cpu-cache-compute"] for p in points} == {True, False}
    assert sum("--cpu-cache-compute" in p.argv for p in points) == 4
    # the same grid as flags gives the same ids: resuming does not depend on how it was written
    args = sweep_args(tmp_path, "--prompt-len", "8", "--model", "opt-125m", "--hh-ratio", "0.20", "--gpu-batch-size",
                      "1", "2", "--percent", "100,0,100,0,100,0", PERCENTS[1], "--cpu-cache-compute", "on", "off")
    assert {p.id for p in expand(*grid_from_args(args))} == {p.id for p in points}
    # a flag given with the file replaces the file's key, fixed or swept
    args = sweep_args(tmp_path, "--grid", str(grid), "--prompt-len", "16", "--gpu-batch-size", "4")
    points = expand(*grid_from_args(args))
    assert len(points) == 4 and all(p.settings["prompt-len"] == "16" and p.settings["gpu-batch-size"] == "4"
                                    for p in points)
    # a flat list of numbers is one --percent value
    one = expand(*read_grid(write(tmp_path / "one.toml", "percent = [50, 50, 100, 0, 100, 0]\n")))
    assert [p.settings["percent"] for p in one] == [PERCENTS[1]]


def test_ids_follow_the_parsed_settings(tmp_path):
    a = expand({"gpu-batch-size": [4], "gpu-mem": ["16"]})[0]
    b = expand({"gpu-mem": ["16GiB"], "gpu-batch-size": ["4"]})[0]
    c = expand({"gpu-batch-size": [4], "gpu-mem": ["16GB"]})[0]
    assert a.id == b.id != c.id and len(a.id) == 10
    assert len(expand({"gpu-batch-size": [2, "2", 3]})) == 2  # the same value twice is one point


@pytest.mark.parametrize("toml, needles", [
    ("gpu_batch = [1, 2]\nfoo = 1\n[fixed]\nbar = 2\n", ["unknown keys", "gpu-batch", "foo", "bar"]),
    ("[fixed]\ngpu-batch-size = [1, 2]\n", ["[fixed] gpu-batch-size", "several values"]),
    ("gpu-batch-size = [1]\n[fixed]\ngpu-batch-size = 2\n", ["gpu-batch-size both fixed and swept"]),
    ("gpu-batch-size = [0, 1]\n", ["gpu-batch-size=0", "at least 1"]),
    ("percent = ['100 0 100']\n", ["--percent takes 6 numbers"]),
    ("cpu-cache-compute = ['maybe']\n", ["on/off"]),
    ("gpu-batch-size = [1,\n", ["not valid TOML"]),
])
def test_bad_grid_is_one_error_line(tmp_path, capsys, toml, needles):
    grid = write(tmp_path / "grid.toml", toml)
    assert main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(SweepError):  # a ValueError too, for callers from Python
        expand(*read_grid(grid))


def test_dry_run_prints_points_and_commands_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", "--out", str(out), "--gpu-batch-size", "1", "2", "--kv-policy", "full", "h2o",
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("4 points, 4 to run") and text.count("-m offload_engine run") == 4
    assert "--kv-policy=h2o" in text and not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--help"])
    assert e.value.code == 0 and "grid.toml" in capsys.readouterr().out


# --- the runner with a fake engine -----------------------------------------------------------

def test_interrupted_sweep_resumes_without_running_a_point_twice(tmp_path):
    points = expand({"gpu-batch-size": [1, 2, 4], "num-gpu-batches": [1, 2]})
    out = tmp_path / "out"
    first = FakeRunner(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        make_sweep(points, out, first).run()
    assert [r["id"] for r in read_records(out / "sweep.jsonl")] == [p.id for p in points[:2]]
    assert len(csv_rows(out)) == 2
    assert not list(out.glob(".point-*")) and not (out / ".sweep.lock").exists()
    second = FakeRunner()
    written = make_sweep(points, out, second).run()
    assert second.ids() == [p.id for p in points[2:]] and len(written) == 4  # the interrupted one ran again
    counts = Counter(r["id"] for r in read_records(out / "sweep.jsonl"))
    assert counts == Counter({p.id: 1 for p in points})
    assert_files_agree(out)
    third = FakeRunner()
    assert make_sweep(points, out, third).run() == [] and third.calls == []


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path):
    points = expand({"gpu-batch-size": [1, 3, 5, 6, 7, 8, 9, 2]})
    out = tmp_path / "out"
    runner = FakeRunner()
    make_sweep(points, out, runner, timeout_s=12.0).run()
    records = read_records(out / "sweep.jsonl")
    by_batch = {r["settings"]["gpu-batch-size"]: r for r in records}
    assert [r["status"] for r in records] == ["ok", "no_fit", "timeout", "oom", "error", "error", "oom", "ok"]
    assert by_batch["3"]["error"] == "policy does not fit: the GPU tier needs 0.53 GiB. Lower it."
    assert by_batch["5"]["error"] == "timeout after 12 s"
    assert "out-of-memory killer" in by_batch["6"]["error"] and "SIGKILL" in by_batch["6"]["error"]
    assert "RuntimeError: boom" in by_batch["7"]["error"] and by_batch["7"]["rc"] == 1
    assert "no results JSON" in by_batch["8"]["error"]
    assert by_batch["9"]["error"].startswith("the GPU ran out of memory beyond the plan")
    assert by_batch["2"]["result"]["metrics"]["total_throughput"] == 20.25
    assert all("offload_engine run" in r["command"] for r in records)
    assert_files_agree(out)
    retry = FakeRunner()
    make_sweep(points, out, retry, retry_failed=True).run()
    assert sorted(retry.ids()) == sorted(p.id for p in points[1:7])
    force = FakeRunner()
    make_sweep(points, out, force, force=True).run()
    assert force.ids() == [p.id for p in points]
    assert_files_agree(out)


def test_csv_is_rebuilt_when_it_disagrees_with_the_jsonl(tmp_path):
    points = expand({"gpu-batch-size": [1, 2, 4]})
    out = tmp_path / "out"
    make_sweep(points[:2], out, FakeRunner()).run()
    # a kill between the JSONL line and its CSV row, and a JSONL line cut short by a crash
    rows = (out / "sweep.csv").read_text().splitlines()
    (out / "sweep.csv").write_text("\n".join(rows[:-1]) + "\n")
    with open(out / "sweep.jsonl", "a") as f:
        f.write('{"id": "cut sho')
    runner = FakeRunner()
    make_sweep(points, out, runner).run()  # a grid with the same columns
    assert runner.ids() == [points[2].id]
    assert [r["id"] for r in read_records(out / "sweep.jsonl")] == [p.id for p in points]
    assert_files_agree(out)
    # a later grid with another setting widens the CSV; the file stays one table
    more = expand({"gpu-batch-size": [1], "num-gpu-batches": [3]})
    make_sweep(more, out, FakeRunner()).run()
    rows = csv_rows(out)
    assert len(rows) == 4 and rows[-1]["num-gpu-batches"] == "3" and rows[0]["num-gpu-batches"] == ""
    assert_files_agree(out)


def test_plots(tmp_path, capsys):
    points = expand({"gpu-batch-size": [1, 2, 3]})
    out = tmp_path / "out"
    make_sweep(points, out, FakeRunner(), plots=True).run()
    assert (out / "throughput_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "predicted_vs_measured.png").exists()  # no run carried a prediction
    out2 = tmp_path / "out2"
    sweep = make_sweep(points, out2, FakeRunner(predicted=True), plots=True)
    sweep.run()
    assert (out2 / "predicted_vs_measured.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out2.iterdir() if p.name.endswith(".tmp")]
    assert float(csv_rows(out2)[1]["predicted_token_s"]) == 18.0


def test_without_matplotlib_one_line_and_no_plot(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    lines: list[str] = []
    points = expand({"gpu-batch-size": [1, 2]})
    Sweep(points, tmp_path, runner=FakeRunner(), echo=lines.append).run()
    assert sum("no plot drawn" in line for line in lines) == 1
    assert not (tmp_path / "throughput_vs_latency.png").exists()


def test_an_interrupt_waits_for_the_record_being_written():
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            ran.append("after the signal")
    assert ran == ["after the signal"]


# --- processes -----------------------------------------------------------------------------

def _gone(pid: int, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["timeout", "interrupt"])
def test_the_point_process_group_is_killed(tmp_path, how):
    pid_file = tmp_path / "grandchild"
    script = (f"import subprocess, pathlib, time\np = subprocess.Popen(['sleep', '60'])\n"
              f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\ntime.sleep(60)\n")
    cmd = [sys.executable, "-c", script]
    if how == "timeout":
        o = run_process(cmd, 2.0, tmp_path / "log")
        assert o.timed_out and o.wall_s < 20
    else:
        # Python's own handler: a test runner's worker may ignore SIGINT (pytest-xdist's do).
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                run_process(cmd, 60.0, tmp_path / "log")
        finally:
            timer.join()
            signal.signal(signal.SIGINT, previous)
    assert _gone(int(pid_file.read_text()))


def _engine_processes(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker in (d / "cmdline").read_bytes().decode(errors="replace") \
                    and not _gone(int(d.name), 0.0):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def test_real_sweep_stopped_by_sigterm_and_resumed(tmp_path, capsys):
    """4 real points (2 runs of OPT-125m, 2 refused by the plan), one process each: SIGTERM while
    the third runs, then the same command again finishes the grid."""
    out = tmp_path / "out"
    argv = ["sweep", "--out", str(out), "--prompt-len", "8", "--gen-len", "2", "--gpu-batch-size", "1", "2",
            "--gpu-mem", "2GiB", "1MiB", "--offload-dir", str(tmp_path / "offload"), "--timeout-s", "300"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "offload_engine", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(read_records(out / "sweep.jsonl")) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(read_records(out / "sweep.jsonl")) == 2, proc.communicate()
        time.sleep(1.0)
        assert _engine_processes(f"{out}/.point-"), "the third point should be running"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert len(read_records(out / "sweep.jsonl")) == 2 and len(csv_rows(out)) == 2
    assert _engine_processes(f"{out}/.point-") == [] and not list(out.glob(".point-*"))

    assert main(argv) == 0
    assert "2 points run now" in capsys.readouterr().out
    records = read_records(out / "sweep.jsonl")
    assert Counter(r["id"] for r in records) == Counter({p.id: 1 for p in expand(*grid_from_args(
        build_parser().parse_args(argv)))})
    assert [r["status"] for r in records] == ["ok", "no_fit", "ok", "no_fit"]
    for r in records:
        if r["status"] == "ok":
            m = r["result"]["metrics"]
            assert m["batch_size"] == int(r["settings"]["gpu-batch-size"]) and m["total_throughput"] > 0
            assert r["result"]["planned_gib"]["gpu"] > 0 and r["result"]["policy"]["gpu_batch_size"] == m["batch_size"]
        else:
            assert r["error"].startswith("policy does not fit") and r["rc"] == 2
        assert (out / "logs" / f"{r['id']}.log").exists()
    assert_files_agree(out)
    assert (out / "throughput_vs_latency.png").exists()
