"""Running one point of a sweep: its engine process, in its own process group with a timeout, and
the status its exit leaves (ok, no_fit, oom, timeout, error).

Why it is built this way:
- One engine process per point, in its own process group with a timeout: an out-of-memory kill,
  a crash or a hang ends that point only, and an interrupted sweep kills exactly what it started.
- SIGINT/SIGTERM are held off while a point's record is written (`signals_held`), so an interrupt
  lands between points, never halfway through a record.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass
class Outcome:
    """What a point's process left: exit status, the tail of its output, wall seconds."""

    rc: int
    text: str
    wall_s: float
    timed_out: bool = False


Runner = Callable[[list[str], float, Path], Outcome]


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the point's process group (the engine cleans its offload files), SIGKILL after
    grace_s; a Ctrl-C meanwhile kills at once and is raised once the group is gone."""
    interrupted = False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def run_process(cmd: list[str], timeout_s: float, log_path: Path) -> Outcome:
    """Run `cmd` in a new process group, stdout and stderr to log_path; killed on timeout or interrupt."""
    import offload_engine

    root = str(Path(offload_engine.__file__).resolve().parent.parent)  # the child imports this very package
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        try:  # the kernel's out-of-memory killer takes the point, not the sweep
            Path(f"/proc/{proc.pid}/oom_score_adj").write_text("1000")
        except OSError:
            pass
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        except BaseException:  # Ctrl-C or SIGTERM: the point in flight goes with the sweep
            kill_group(proc, grace_s=5.0)
            raise
    text = log_path.read_text(errors="replace")[-20000:]
    rc = proc.poll()
    return Outcome(-9 if rc is None else rc, text, time.monotonic() - t0, timed_out)


def classify(o: Outcome, data: dict | None, timeout_s: float) -> tuple[str, str | None]:
    """(status, error): ok, no_fit (the plan was refused), oom, timeout or error."""
    if o.timed_out:
        return "timeout", f"timeout after {timeout_s:g} s"
    errors = [line[len("error:"):].strip() for line in o.text.splitlines() if line.startswith("error:")]
    if o.rc == 0:
        return ("ok", None) if data and "metrics" in data else ("error", "exit 0 but no results JSON was written")
    if errors and "policy does not fit" in errors[-1]:
        return "no_fit", errors[-1]
    oom = [line.strip() for line in o.text.splitlines() if "out of memory" in line.lower()
           or "can't allocate memory" in line.lower()]
    if oom or o.rc in (-9, 137):
        return "oom", errors[-1] if errors else oom[-1][-500:] if oom else \
            f"killed by SIGKILL (exit {o.rc}), likely the out-of-memory killer"
    if errors:
        return "error", errors[-1]
    tail = [line.strip() for line in o.text.splitlines() if line.strip()][-3:]
    try:
        what = f"killed by {signal.Signals(-o.rc).name}" if o.rc < 0 else f"exit {o.rc}"
    except ValueError:
        what = f"exit {o.rc}"
    return "error", f"{what}: " + " | ".join(tail)[-500:]


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a record is written; an interrupt that came in is raised after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if caught:
        raise KeyboardInterrupt
