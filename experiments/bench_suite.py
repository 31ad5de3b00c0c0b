"""Device benchmark suite: this engine beside the published FlexGen (PyPI `flexgen` 0.1.8) over
the cases of `experiments/cases.py`, resumable across 10-minute device calls.

  PYTHONPATH=. python experiments/bench_suite.py --out DIR [--cases NAME|GLOB ...]
      [--systems ours flexgen] [--budget-s 540] [--dry-run] [--commit HASH] [--copy-to $OUT]

Why it is built this way: device time is scarce and one command may run 10 minutes.
- Every (case, system) runs in its own process group with a timeout, so an OOM, a crash or a
  hang ends that run only (children get oom_score_adj 1000: the kernel kills them, not the suite).
- Each finished run is appended to DIR/runs.jsonl at once; a rerun skips what is there for the
  same case, system, version (this repo's commit for ours, FlexGen's package version for FlexGen:
  our commits do not change FlexGen) and settings, unless --force (--retry-failed: failed ones).
  A run killed because the budget ran out is recorded as "budget" and runs again next time.
- A run starts only if its estimated time (its last measured wall time, else the case's guess)
  fits in what is left of --budget-s; the rest are printed as skipped. Its timeout is what is left.
- A case may list smaller batches: those are tried in turn while a batch does not fit (the engine
  refuses before allocating; FlexGen runs out of memory). Our planner is asked first, in process
  and without a GPU, so batches that cannot fit the cap, the RAM or the disk are not launched.
- Disk cases: the page cache is dropped before the run (root; recorded), and the offload folder
  (--offload-dir, local disk) is emptied before and after. Our engine reads with O_DIRECT; FlexGen
  reads numpy memmaps, so its disk reads hit the page cache once its own writes put them there.
- FlexGen's OPT-30B runs decode 5 steps and extrapolate (--flexgen-cut-gen-len; recorded).
Logs: DIR/runs.log (everything printed); after each run DIR/summary.json (hardware, commit, runs)
is rewritten and, with --copy-to, the three files are copied there (e.g. the device's $OUT).

On the device, with `.whl` carried (git-ignored; flexgen 0.1.8 and gguf, nothing the image has;
FlexGen's declared dependency pulp is left out: only its unused experimental cost model imports it;
fill it here with `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
--implementation cp --platform manylinux2014_x86_64 -d .whl flexgen==0.1.8 gguf==0.19.0`):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
  PYTHONPATH=.:$PYTHONPATH python experiments/bench_suite.py --out experiments/results/suite \\
      --commit <git rev-parse HEAD here> --copy-to $OUT --cases 'opt6.7b-*'
and copy the returned files into the --out folder here before the next call (it travels).
Runs longer than one call (OPT-30B 512+512, 1024+1024): start the suite detached with
`setsid nohup python experiments/bench_suite.py --out /tmp/suite --budget-s 1700 ... &`, then in
this and each following call (within the 30 s the machine stays warm)
`python experiments/bench_suite.py --out /tmp/suite --wait-s 560 --copy-to $OUT`.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.cases import (ALL_GPU, CASES, OPT30B_CUT_GEN_LEN, SMOKE_CASES, Batch, Case, select,  # noqa: E402
                              validate)

SYSTEMS = ("ours", "flexgen")
FINAL = ("ok", "error", "timeout", "no_fit")  # statuses a rerun skips; "budget" runs again
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
REPORT = {  # FlexGen's report lines (ours prints the same); FlexGen's "GB" are GiB
    "model_gib": "model size", "cache_gib": "cache size", "hidden_gib": r"hidden size \(p\)",
    "peak_gpu_mem_gib": "peak gpu mem", "prefill_s": "prefill latency", "prefill_throughput": "prefill throughput",
    "decode_s": "decode latency", "decode_throughput": "decode throughput", "total_s": "total latency",
    "total_throughput": "total throughput",
}


@dataclass
class Outcome:
    rc: int
    text: str
    wall_s: float
    timed_out: bool = False


Runner = Callable[[list[str], float, Path, dict], Outcome]


def _child_setup() -> None:  # in the child before exec: the kernel's OOM killer picks it first
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def run_process(cmd: list[str], timeout_s: float, log_path: Path, env: dict) -> Outcome:
    """Run in a new process group, output streamed to the log; on timeout SIGTERM (our engine
    cleans up on it), then SIGKILL to the whole group 15 s later."""
    t0 = time.monotonic()
    chunks: list[str] = []
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, cwd=ROOT, start_new_session=True, preexec_fn=_child_setup)

        def pump() -> None:
            for line in proc.stdout:
                chunks.append(line)
                log.write(line)
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        reader.join(timeout=10)
    rc = proc.returncode if proc.returncode is not None else -9
    return Outcome(rc, "".join(chunks), time.monotonic() - t0, timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def drop_page_cache() -> bool:
    """`sync; echo 1 > /proc/sys/vm/drop_caches`: True where it worked (root on Linux)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


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


def ours_command(case: Case, batch: Batch, json_path: Path, offload_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "offload_engine", "run", "--model", case.model, "--prompt-len", str(case.prompt_len),
           "--gen-len", str(case.gen_len), *case.ours.flags(batch)]
    if case.gpu_cap_gib:
        cmd += ["--gpu-mem", f"{case.gpu_cap_gib:g}"]
    # --profile times each stream with events, which rules out the captured decode step: the
    # all-GPU cases (where the step is captured) run without it, the offloaded ones report the split.
    profile = ["--profile"] if tuple(case.ours.percent) != ALL_GPU else []
    return cmd + ["--offload-dir", str(offload_dir), "--json", str(json_path), *profile, "--quiet"]


def flexgen_cut(case: Case, default_30b: int) -> int | None:
    cut = case.flexgen.cut_gen_len
    if cut is None:
        cut = default_30b if case.model == "opt-30b" else 0
    return cut if cut and cut < case.gen_len else None


def flexgen_command(case: Case, batch: Batch, cut: int | None, offload_dir: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "experiments" / "flexgen_peer.py"), "--model", f"facebook/{case.model}",
           "--path", "_DUMMY_", "--prompt-len", str(case.prompt_len), "--gen-len", str(case.gen_len),
           *case.flexgen.flags(batch)]
    if case.gpu_cap_gib:
        cmd += ["--gpu-cap-gib", f"{case.gpu_cap_gib:g}"]
    if cut:
        cmd += ["--cut-gen-len", str(cut)]
    return cmd + ["--offload-dir", str(offload_dir), "--log-file", os.devnull]


def plan_gib(argv: list[str]) -> dict[str, float]:
    """Our planner's GiB per tier for a command (fp16, as on the GPU), in process: no GPU, no
    allocation. 'gpu_min' is the plan with 2 weight slots, the least the engine will try."""
    import torch

    from offload_engine.cli import build_parser
    from offload_engine.cli.options import policy_from_args
    from offload_engine.model_zoo import resolve_model
    from offload_engine.models import build_layers
    from policies.memory import GiB, Workload, plan_memory

    args = build_parser().parse_args(argv[argv.index("run"):])
    policy, model = policy_from_args(args), resolve_model(args.model, dummy=True).config
    layers, work = build_layers(model, policy.sep_layer), Workload(args.prompt_len, args.gen_len)
    dtype = getattr(torch, args.dtype or "float16")
    slots = (policy.weight_buffers,) * 2 if policy.weight_buffers else (3, 2)  # what the engine tries, in order
    totals = [{t.value: b.total / GiB for t, b in plan_memory(layers, policy, work, dtype, model.hidden_size,
                                                               n).tiers.items()} for n in slots]
    return dict(totals[0], gpu_min=totals[1]["gpu"])


def probe_hardware() -> dict:
    """GPU name, CPU count, RAM, versions: in a child process, so this one never holds a CUDA context."""
    code = ("import json, os, platform, torch\n"
            "try:\n import triton; tv = triton.__version__\nexcept Exception: tv = None\n"
            "d = dict(torch=torch.__version__, triton=tv, python=platform.python_version(), cpu_count=os.cpu_count(),"
            " ram_gib=os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, gpu=None)\n"
            "if torch.cuda.is_available():\n p = torch.cuda.get_device_properties(0)\n"
            " d.update(gpu=p.name, gpu_mem_gib=p.total_memory / 2**30, cuda=torch.version.cuda)\n"
            "print(json.dumps(d))\n")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": f"hardware probe failed: {e}"}


def does_not_fit(o: Outcome) -> bool:
    """Refused by our planner, or out of GPU or host memory (SIGKILL from the OOM killer)."""
    low = o.text.lower()
    return o.rc != 0 and not o.timed_out and (
        "policy does not fit" in low or "out of memory" in low or "can't allocate memory" in low or o.rc in (-9, 137))


def _settings_hash(case: Case, system: str, cut: int | None) -> str:
    data = dict(model=case.model, prompt_len=case.prompt_len, gen_len=case.gen_len, cap=case.gpu_cap_gib,
                policy={k: v for k, v in asdict(case.policy(system)).items() if k != "est_s"}, cut=cut)
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Suite:
    out: Path
    cases: dict[str, Case] = field(default_factory=lambda: CASES)
    names: list[str] = field(default_factory=list)
    systems: tuple[str, ...] = SYSTEMS
    budget_s: float = 540.0
    reserve_s: float = 15.0  # kept for the summary and the copy at the end
    run_timeout_s: float | None = None
    min_run_s: float = 10.0  # a batch candidate is not started with less time left than this
    offload_root: Path = Path("/tmp/offload_bench")
    flexgen_cut_gen_len: int = OPT30B_CUT_GEN_LEN
    drop_caches: bool = True
    force: bool = False
    retry_failed: bool = False
    use_plan: bool = True
    commit: str | None = None
    copy_to: Path | None = None
    runner: Runner = run_process
    dropper: Callable[[], bool] = drop_page_cache
    probe: Callable[[], dict] = probe_hardware
    flexgen_version: str | None = None
    hardware: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    writing: bool = False  # True while run() owns the folder: log() appends to runs.log

    def __post_init__(self) -> None:
        validate(self.cases)
        self.names = self.names or list(self.cases)
        self.runs_path, self.log_path = self.out / "runs.jsonl", self.out / "runs.log"
        self.t0 = time.monotonic()
        if self.flexgen_version is None:
            try:
                self.flexgen_version = importlib.metadata.version("flexgen")
            except importlib.metadata.PackageNotFoundError:
                self.flexgen_version = "missing" if importlib.util.find_spec("flexgen") is None else "unknown"

    # --- what to run ---------------------------------------------------------------------------
    def jobs(self) -> list[tuple[str, str]]:
        """(case, system) in order; a FlexGen run is its peer's, shared by the cases that name it."""
        jobs: list[tuple[str, str]] = []
        for name in self.names:
            case = self.cases[name]
            if "ours" in self.systems and case.ours is not None:
                jobs.append((name, "ours"))
            peer = case.peer_name()
            if "flexgen" in self.systems and peer is not None and (peer, "flexgen") not in jobs:
                jobs.append((peer, "flexgen"))
        return jobs

    def engine_commit(self) -> str:
        if not self.commit:
            from offload_engine.metrics import git_commit  # reads OFFLOAD_ENGINE_COMMIT or git

            self.commit = git_commit()
        return self.commit

    def key(self, name: str, system: str) -> dict:
        case = self.cases[name]
        cut = flexgen_cut(case, self.flexgen_cut_gen_len) if system == "flexgen" else None
        version = self.engine_commit() if system == "ours" else f"flexgen-{self.flexgen_version}"
        return dict(case=name, system=system, version=version, settings=_settings_hash(case, system, cut))

    def records(self) -> list[dict]:
        if not self.runs_path.exists():
            return []
        out = []
        for line in self.runs_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a kill: ignore it
                continue
        return out

    def done(self, key: dict, records: list[dict]) -> dict | None:
        if self.force:
            return None
        finals = ("ok",) if self.retry_failed else FINAL
        for r in reversed(records):
            if all(r.get(k) == v for k, v in key.items()) and r.get("status") in finals:
                return r
        return None

    def estimate(self, name: str, system: str, records: list[dict]) -> float:
        """The last measured wall time of this run (any version), else the case's guess; a run cut
        by the budget needed more than it had."""
        same = [r for r in records if r.get("case") == name and r.get("system") == system and r.get("wall_s")]
        ok = [r for r in same if r.get("status") == "ok"]
        if ok:
            return 1.1 * ok[-1]["wall_s"]
        cut = [1.25 * r["wall_s"] for r in same if r.get("status") == "budget"]
        return max([self.cases[name].policy(system).est_s] + cut)

    def remaining(self) -> float:
        return self.budget_s - self.reserve_s - (time.monotonic() - self.t0)

    # --- running -------------------------------------------------------------------------------
    def command(self, name: str, system: str, batch: Batch) -> list[str]:
        case = self.cases[name]
        offload = self.offload_root / system
        if system == "ours":
            return ours_command(case, batch, self.out.resolve() / f".ours-{name}.json", offload)
        return flexgen_command(case, batch, flexgen_cut(case, self.flexgen_cut_gen_len), offload)

    def plan(self, cmd: list[str]) -> dict | None:
        if not self.use_plan:
            return None
        try:
            return plan_gib(cmd)
        except Exception as e:  # the planner is advice: a change in the engine must not stop the suite
            self.log(f"planner unavailable ({type(e).__name__}: {e})")
            return None

    def unfit_reason(self, case: Case, plan: dict | None) -> str | None:
        """Why our planner says this batch cannot fit this machine, or None."""
        if plan is None:
            return None
        gpu = min(case.gpu_cap_gib or float("inf"), self.hardware.get("gpu_mem_gib") or float("inf"))
        if plan["gpu_min"] > gpu:
            return f"GPU needs {plan['gpu_min']:.1f} GiB, has {gpu:.1f}"
        try:
            import psutil
            ram = psutil.virtual_memory().available / 2**30
        except ImportError:
            ram = float("inf")
        if plan["cpu"] > ram:
            return f"RAM needs {plan['cpu']:.1f} GiB, {ram:.1f} available"
        if plan["disk"] > 0:
            self.offload_root.mkdir(parents=True, exist_ok=True)
            disk = shutil.disk_usage(self.offload_root).free / 2**30
            if plan["disk"] > disk:
                return f"disk needs {plan['disk']:.1f} GiB, {disk:.1f} free"
        return None

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f} s] {text}", flush=True)
        if self.writing:
            with open(self.log_path, "a") as f:
                f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        if self.commit:
            env["OFFLOAD_ENGINE_COMMIT"] = self.commit
        return env

    def run_job(self, name: str, system: str, key: dict) -> dict:
        case, attempts = self.cases[name], []
        policy = case.policy(system)
        if not self.hardware:  # probed once, before the first launch: a rerun with nothing to do costs nothing
            self.hardware = self.probe()
            self.log(f"hardware: {self.hardware}")
        record = dict(key, commit=self.engine_commit(), status="no_fit", started=time.strftime("%Y-%m-%d %H:%M:%S"),
                      model=case.model, prompt_len=case.prompt_len, gen_len=case.gen_len, gpu_cap_gib=case.gpu_cap_gib,
                      settings_full=asdict(policy), attempts=attempts, wall_s=0.0)
        if system == "flexgen":
            record.update(flexgen_version=self.flexgen_version, cut_gen_len=flexgen_cut(case, self.flexgen_cut_gen_len))
        for batch in policy.batches():
            cmd = self.command(name, system, batch)
            reason = self.unfit_reason(case, self.plan(cmd)) if system == "ours" else None
            if reason:
                attempts.append(dict(batch=list(batch), status="no_fit", reason=f"planner: {reason}"))
                self.log(f"{system} {name} {batch[0]}x{batch[1]}: skipped, {reason}")
                continue
            timeout = self.remaining() if self.run_timeout_s is None else min(self.run_timeout_s, self.remaining())
            if timeout < self.min_run_s:
                record["status"] = "budget"
                break
            shutil.rmtree(self.offload_root / system, ignore_errors=True)
            dropped = self.dropper() if self.drop_caches and policy.uses_disk else None
            self.log(f"{system} {name} {batch[0]}x{batch[1]} (timeout {timeout:.0f} s, page cache dropped: {dropped})"
                     f"\n$ {shlex.join(cmd)}")
            o = self.runner(cmd, timeout, self.log_path, self.env())
            shutil.rmtree(self.offload_root / system, ignore_errors=True)
            record["wall_s"] += o.wall_s
            status = "ok" if o.rc == 0 else ("budget" if o.timed_out and timeout < (self.run_timeout_s or 1e18)
                                             else "timeout" if o.timed_out else "error")
            result = self.result(name, system, o) if status == "ok" else {}
            if status == "ok" and "total_throughput" not in result:
                status = "error"  # exit 0 without numbers
            attempts.append(dict(batch=list(batch), status=status, rc=o.rc, wall_s=round(o.wall_s, 1)))
            record.update(result)
            record.update(batch=list(batch), batch_size=batch[0] * batch[1], rc=o.rc, status=status,
                          page_cache_dropped=dropped, command=cmd, error=o.text[-2000:] if status != "ok" else None)
            if status == "error" and does_not_fit(o):
                record["status"] = attempts[-1]["status"] = "no_fit"
                continue
            break
        return record

    def result(self, name: str, system: str, o: Outcome) -> dict:
        if system == "flexgen":
            return parse_report(o.text)
        path = self.out.resolve() / f".ours-{name}.json"
        try:
            return parse_ours(json.loads(path.read_text()))
        except (OSError, ValueError):
            return parse_report(o.text)
        finally:
            path.unlink(missing_ok=True)

    def run(self) -> list[dict]:
        """Run what is not done and fits the budget; returns the records written now."""
        self.out.mkdir(parents=True, exist_ok=True)
        lock = self.out / ".suite.lock"
        if lock_owner(lock):
            raise SystemExit(f"error: another suite (pid {lock_owner(lock)}) is writing {self.out}: "
                             "wait for it with --wait-s or choose another --out.")
        lock.write_text(str(os.getpid()))
        self.writing, written = True, []
        try:
            self.log(f"suite: commit {self.engine_commit()}, flexgen {self.flexgen_version}, out {self.out}")
            if self.engine_commit() == "unknown":
                self.log("warning: commit unknown (no .git here): pass --commit, or reruns after a new commit "
                         "will skip runs of the old one")
            for name, system in self.jobs():
                records = self.records()
                key = self.key(name, system)
                if self.done(key, records):
                    self.log(f"{system} {name}: done earlier ({key['version']}), skipped")
                    continue
                if system == "flexgen" and self.flexgen_version == "missing":
                    self.skipped.append(f"{system} {name}: flexgen is not installed (install the .whl wheels)")
                    continue
                need, left = self.estimate(name, system, records), self.remaining()
                if need > left:
                    self.skipped.append(f"{system} {name}: needs about {need:.0f} s, {max(left, 0):.0f} s left")
                    continue
                record = self.run_job(name, system, key)
                append_line(self.runs_path, json.dumps(record, default=str))
                written.append(record)
                self.log(f"{system} {name}: {record['status']}, {record.get('total_throughput', 0):.1f} token/s, "
                         f"{record['wall_s']:.0f} s")
                self.write_summary()
            self.write_summary()
            for line in self.skipped:
                self.log(f"skipped: {line}")
        finally:
            lock.unlink(missing_ok=True)
            self.writing = False
        return written

    def write_summary(self) -> None:
        path = self.out / "summary.json"
        if not self.hardware and path.exists():  # nothing ran in this call: keep the last probe
            self.hardware = json.loads(path.read_text()).get("hardware") or {}
        summary = dict(hardware=self.hardware, commit=self.engine_commit(), flexgen_version=self.flexgen_version,
                       budget_s=self.budget_s, skipped=self.skipped, runs=self.records(),
                       notes="FlexGen's GB are GiB; a FlexGen run with cut_gen_len decodes that many steps and "
                             "extrapolates (projected: true); ours decodes every step.")
        tmp = self.out / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        os.replace(tmp, path)
        copy_out(self.out, self.copy_to)


def append_line(path: Path, line: str) -> None:
    """Append one line; a last line cut short by a kill gets its newline first, so it stays alone."""
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def lock_owner(lock: Path) -> int | None:
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def copy_out(out: Path, dest: Path | None) -> None:
    if dest is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("runs.jsonl", "runs.log", "summary.json"):
        if (out / name).exists():
            shutil.copyfile(out / name, dest / name)


BUSY = {"weight_io": "w", "kv_io": "kv", "act_io": "act", "compute": "gpu", "cpu_attention": "cpu-attn"}


def table(records: list[dict], cases: dict[str, Case], names: list[str]) -> str:
    """Markdown: the latest record of each (case, system) of the chosen cases and their peers."""
    latest = {(r.get("case"), r.get("system")): r for r in records}
    ok_flexgen = {r["case"]: r for r in records if r.get("system") == "flexgen" and r.get("status") == "ok"}
    lines = ["| case | system | batch | prefill s | decode s | token/s | vs FlexGen | peak GPU GiB "
             "| busy per decode step (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    shown = []
    for name in names:
        shown += [(name, "ours"), (cases[name].peer_name(), "flexgen")]
    for name, system in dict.fromkeys(shown):
        r = latest.get((name, system))
        if r is None:
            continue
        batch = "x".join(map(str, r["batch"])) if r.get("batch") else "-"
        if r.get("status") != "ok":
            lines.append(f"| {name} | {system} | {batch} | | | {r.get('status')} | | | |")
            continue
        tput = f"{r['total_throughput']:,.1f}"
        if r.get("cut_gen_len"):
            tput += f" (cut {r['cut_gen_len']})"
        peer = ok_flexgen.get(cases[name].peer_name()) if system == "ours" else None
        ratio = f"{r['total_throughput'] / peer['total_throughput']:.2f}x" if peer else ""
        busy = ", ".join(f"{BUSY.get(k, k)} {v * 1e3:.0f}"
                         for k, v in sorted((r.get("decode_step_busy_s") or {}).items()))
        lines.append(f"| {name} | {system} | {batch} | {r.get('prefill_s', 0):.3f} | {r.get('decode_s', 0):.3f} | "
                     f"{tput} | {ratio} | {r.get('peak_gpu_mem_gib', 0):.2f} | {busy} |")
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


def wait(out: Path, seconds: float, copy_to: Path | None) -> bool:
    """Follow a detached suite writing `out`: copy its files every few seconds; True once it has ended."""
    t0 = time.monotonic()
    while lock_owner(out / ".suite.lock") and time.monotonic() - t0 < seconds:
        copy_out(out, copy_to)
        time.sleep(min(5.0, max(0.1, seconds - (time.monotonic() - t0))))
    copy_out(out, copy_to)
    return lock_owner(out / ".suite.lock") is None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="results folder: runs.jsonl, runs.log, summary.json")
    ap.add_argument("--cases", nargs="+", default=["*"], metavar="NAME", help="case names or globs (default: all)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of this call (default: 540)")
    ap.add_argument("--reserve-s", type=float, default=15.0, help="kept at the end for the summary (default: 15)")
    ap.add_argument("--run-timeout-s", type=float, default=None, help="cap per run (default: what is left)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and plans; run nothing")
    ap.add_argument("--force", action="store_true", help="rerun runs already in runs.jsonl")
    ap.add_argument("--retry-failed", action="store_true", help="rerun failed, timed-out and unfit runs")
    ap.add_argument("--flexgen-cut-gen-len", type=int, default=OPT30B_CUT_GEN_LEN,
                    help="decode steps of FlexGen's OPT-30B runs, extrapolated to --gen-len; 0: all (default: 5)")
    ap.add_argument("--offload-dir", type=Path, default=Path("/tmp/offload_bench"),
                    help="disk-tier folder on local disk, emptied around each run (default: /tmp/offload_bench)")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache before disk cases")
    ap.add_argument("--no-plan", action="store_true", help="do not ask our planner which batches fit")
    ap.add_argument("--commit", default=None, help="this repo's commit (the device copy has no .git)")
    ap.add_argument("--copy-to", type=Path, default=None, help="copy the result files here after each run ($OUT)")
    ap.add_argument("--wait-s", type=float, default=None,
                    help="follow a detached suite writing --out for up to this long, then print its table")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--smoke", action="store_true",
                    help="run the tiny smoke cases (OPT-125m, this engine only) instead: any machine, no GPU needed")
    args = ap.parse_args(argv)
    if args.list:
        for c in CASES.values():
            systems = "+".join(s for s in SYSTEMS if c.policy(s)) + (f" (peer {c.peer})" if c.peer else "")
            print(f"{c.name:<28} {c.model:<9} {c.prompt_len}+{c.gen_len:<5} cap {c.gpu_cap_gib or '-'!s:<4} {systems}")
        return 0
    if args.out is None:
        ap.error("--out is required: name the results folder, e.g. --out experiments/results/suite")
    cases = SMOKE_CASES if args.smoke else CASES
    try:
        names = select(args.cases, cases)
    except ValueError as e:
        ap.error(str(e))
    systems = ("ours",) if args.smoke else tuple(args.systems)
    suite = Suite(args.out, cases=cases, names=names, systems=systems, budget_s=args.budget_s, reserve_s=args.reserve_s,
                  run_timeout_s=args.run_timeout_s, offload_root=args.offload_dir,
                  flexgen_cut_gen_len=args.flexgen_cut_gen_len, drop_caches=not args.no_drop_caches,
                  force=args.force, retry_failed=args.retry_failed, use_plan=not args.no_plan, commit=args.commit,
                  copy_to=args.copy_to)
    if args.dry_run:
        dry_run(suite)
        return 0
    if args.wait_s is not None:
        ended = wait(args.out, args.wait_s, args.copy_to)
        print(("the suite has ended" if ended else f"the suite is still running after {args.wait_s:.0f} s") + "\n")
    else:
        suite.run()
    print(table(suite.records(), cases, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
