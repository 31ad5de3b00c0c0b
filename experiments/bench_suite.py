"""Device benchmark suite: this engine beside the published FlexGen (PyPI `flexgen` 0.1.8) and
Hugging Face Accelerate offloading (`experiments/accelerate_peer.py`) over the cases of
`experiments/cases.py`, resumable across 10-minute device calls.

  PYTHONPATH=. python experiments/bench_suite.py --out DIR [--cases NAME|GLOB ...]
      [--systems ours flexgen accelerate] [--budget-s 540] [--dry-run] [--commit HASH] [--copy-to $OUT]

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
  (--offload-dir, local disk) is emptied before and after. Both systems read through the page
  cache (ours: pread into a pinned ring; FlexGen: numpy memmaps), which their own writes fill.
- FlexGen's OPT-30B runs decode 5 steps and extrapolate (--flexgen-cut-gen-len; recorded);
  Accelerate's runs do where their case says (its cut_gen_len; recorded).
- An Accelerate run belongs to the case that carries its flags; its version is the installed
  accelerate and transformers (the image's), like FlexGen's.
Logs: DIR/runs.log (everything printed); after each run DIR/summary.json (hardware, commit, runs)
is rewritten and, with --copy-to, the three files are copied there (e.g. the device's $OUT).

On the device, with `.whl` carried (git-ignored: flexgen 0.1.8 and gguf wheels, fetched here with
`pip download --no-deps -d .whl flexgen==0.1.8 gguf==0.19.0`; FlexGen's pulp is left out, only its
unused cost model imports it): `pip install --no-deps --target /tmp/site .whl/*.whl`, then
  PYTHONPATH=.:/tmp/site python experiments/bench_suite.py --out experiments/results/suite \\
      --commit <git rev-parse HEAD here> --copy-to $OUT --cases 'opt6.7b-*'
and copy the returned files into the --out folder here before the next call (it travels).
Runs longer than one call: start it detached (`setsid nohup ... --out /tmp/suite --budget-s 1700 &`),
then in each following call `python experiments/bench_suite.py --out /tmp/suite --wait-s 560 --copy-to $OUT`.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.cases import CASES, OPT30B_CUT_GEN_LEN, SMOKE_CASES, Batch, Case, select, validate  # noqa: E402
# Launching a run and the results side live in their own modules; the names the tests use
# (parsers, command builders, Outcome, run_process, wait, table) stay importable from here.
from experiments.accelerate_peer import parse_placement  # noqa: E402
from experiments.suite_report import dry_run, parse_ours, parse_report, save_summary, wait  # noqa: E402
from offload_engine.sweep import lock_owner  # noqa: E402
from experiments.suite_report import table  # noqa: E402
from offload_engine.sweep.results import append_line, read_records  # noqa: E402
from experiments.suite_runner import (Outcome, Runner, accelerate_command, accelerate_cut, does_not_fit,  # noqa: E402
                                      drop_page_cache, flexgen_command, flexgen_cut, ours_command, plan_gib,
                                      probe_hardware, run_process)

SYSTEMS = ("ours", "flexgen", "accelerate")
FINAL = ("ok", "error", "timeout", "no_fit")  # statuses a rerun skips; "budget" runs again


def _installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing" if importlib.util.find_spec(name) is None else "unknown"


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
    accelerate_version: str | None = None  # "accelerate-X+transformers-Y", or "missing"
    hardware: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    writing: bool = False  # True while run() owns the folder: log() appends to runs.log

    def __post_init__(self) -> None:
        validate(self.cases)
        self.names = self.names or list(self.cases)
        self.runs_path, self.log_path = self.out / "runs.jsonl", self.out / "runs.log"
        self.t0 = time.monotonic()
        if self.flexgen_version is None:
            self.flexgen_version = _installed("flexgen")
        if self.accelerate_version is None:
            versions = [_installed("accelerate"), _installed("transformers")]
            self.accelerate_version = "missing" if "missing" in versions else "accelerate-{}+transformers-{}".format(
                *versions)

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
            if "accelerate" in self.systems and case.accelerate is not None:
                jobs.append((name, "accelerate"))
        return jobs

    def engine_commit(self) -> str:
        if not self.commit:
            from offload_engine.metrics import git_commit  # reads OFFLOAD_ENGINE_COMMIT or git

            self.commit = git_commit()
        return self.commit

    def cut(self, name: str, system: str) -> int | None:
        """Decode steps a peer runs before extrapolating (None: all); ours has its own flag."""
        case = self.cases[name]
        if system == "flexgen":
            return flexgen_cut(case, self.flexgen_cut_gen_len)
        return accelerate_cut(case) if system == "accelerate" else None

    def key(self, name: str, system: str) -> dict:
        case, cut = self.cases[name], self.cut(name, system)
        version = {"ours": self.engine_commit(), "flexgen": f"flexgen-{self.flexgen_version}",
                   "accelerate": self.accelerate_version}[system]
        return dict(case=name, system=system, version=version, settings=_settings_hash(case, system, cut))

    def records(self) -> list[dict]:
        return read_records(self.runs_path)

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
        if system == "accelerate":
            return accelerate_command(case, batch, offload)
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
            record.update(flexgen_version=self.flexgen_version, cut_gen_len=self.cut(name, system))
        if system == "accelerate":
            record.update(accelerate_version=self.accelerate_version, cut_gen_len=self.cut(name, system))
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
        if system == "accelerate":  # FlexGen's lines, and the tiers Accelerate chose
            return dict(parse_report(o.text), placement_gib=parse_placement(o.text))
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
                if system == "accelerate" and self.accelerate_version == "missing":
                    self.skipped.append(f"{system} {name}: accelerate or transformers is not installed")
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
        self.hardware = save_summary(self.out, self.hardware, self.engine_commit(), self.flexgen_version,
                                     self.budget_s, self.skipped, self.records(), self.copy_to)


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
