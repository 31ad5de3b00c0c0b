"""Launching one run of the device benchmark suite (`experiments/bench_suite.py`): the command
lines of each system, our planner's estimate of a command, and running a command in its own
process group with a timeout.

Why a module of its own: this is the part that touches processes and the machine (process
groups, the OOM killer's choice, the page cache, a hardware probe in a child), kept apart from
the suite's bookkeeping so that the suite can be driven with a fake runner in the tests.
- Each run gets a new session (process group) and oom_score_adj 1000, so a timeout kills the
  whole group and an out-of-memory kill takes the child, never the suite.
- Commands are plain argv lists built from `experiments/cases.py`, so the dry run prints exactly
  what a run launches. The peers run through `experiments/flexgen_peer.py` and
  `experiments/accelerate_peer.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from experiments.cases import ALL_GPU, Batch, Case
from offload_engine.sweep.runner import Outcome, kill_group

ROOT = Path(__file__).resolve().parent.parent


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
            kill_group(proc, grace_s=15.0)
        reader.join(timeout=10)
    rc = proc.returncode if proc.returncode is not None else -9
    return Outcome(rc, "".join(chunks), time.monotonic() - t0, timed_out)


def drop_page_cache() -> bool:
    """`sync; echo 1 > /proc/sys/vm/drop_caches`: True where it worked (root on Linux)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


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


def accelerate_cut(case: Case) -> int | None:
    cut = case.accelerate.cut_gen_len
    return cut if cut and cut < case.gen_len else None


def accelerate_command(case: Case, batch: Batch, offload_dir: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "experiments" / "accelerate_peer.py"), "--model", case.model,
           "--prompt-len", str(case.prompt_len), "--gen-len", str(case.gen_len), *case.accelerate.flags(batch)]
    if case.gpu_cap_gib:
        cmd += ["--gpu-cap-gib", f"{case.gpu_cap_gib:g}"]
    if accelerate_cut(case):
        cmd += ["--cut-gen-len", str(accelerate_cut(case))]
    return cmd + ["--offload-dir", str(offload_dir)]


def plan_gib(argv: list[str]) -> dict[str, float]:
    """Our planner's GiB per tier for a command (fp16, as on the GPU), in process: no GPU, no
    allocation. 'gpu_min' is the plan with 2 weight slots, the least the engine will try."""
    import torch

    from offload_engine.cli import build_parser
    from offload_engine.cli.options import policy_from_args
    from offload_engine.model_zoo import resolve_model
    from offload_engine.models import build_layers
    from offload_engine.policies.memory import GiB, Workload, plan_memory

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
