"""Sweeps of `offload-engine run` over a grid of settings: the grid, the resumable runner, the
result files (sweep.jsonl, sweep.csv) and the plots. `offload-engine sweep` is its command line.

Why it is built this way:
- One engine process per point, in its own process group with a timeout: an out-of-memory kill,
  a crash or a hang ends that point only, and an interrupted sweep kills exactly what it started.
- sweep.jsonl is the ledger: one line per finished point, written in one system call and fsynced
  before the next point starts, with SIGINT/SIGTERM held off while it and its CSV row are written.
  A rerun skips the ids already there, so an interrupted sweep resumes without running a finished
  point twice or losing one. sweep.csv is derived from it and rebuilt when the two disagree.
- A point's id hashes its settings as the run parser reads them (4 and "4", "16" and "16GiB",
  flag order, TOML or flags: the same point; "16GB" another), so resuming does not depend on how
  the grid was written.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import EngineError

EXCLUDED = ("help", "json", "quiet")  # run flags the sweep sets itself
BOOLS = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}
METRICS = (("total_throughput", "total_token_s"), ("total_s", "total_s"), ("prefill_s", "prefill_s"),
           ("decode_s", "decode_s"), ("decode_throughput", "decode_token_s"))
TAIL = ("peak_gpu_gib", "predicted_token_s", "status", "error", "wall_s")


class SweepError(EngineError, ValueError):
    """A bad grid: reported as one `error:` line by the command line."""


@dataclass(frozen=True)
class Flag:
    """A flag of `offload-engine run`: 'value' (one), 'list' (nargs), 'switch' (--x), 'toggle' (--x/--no-x)."""

    name: str
    dest: str
    kind: str
    help: str | None = None


def run_parser():
    """The parser of `offload-engine run` alone (imported late: the CLI package imports this module)."""
    from .cli import run
    from .cli.options import Parser

    sub = Parser(prog="offload-engine").add_subparsers(parser_class=Parser)
    run.add_parser(sub)
    return sub.choices["run"]


def run_flags() -> dict[str, Flag]:
    import argparse

    flags = {}
    for a in run_parser()._actions:
        if not a.option_strings or a.dest in EXCLUDED:
            continue
        kind = ("toggle" if isinstance(a, argparse.BooleanOptionalAction) else
                "switch" if isinstance(a, argparse._StoreTrueAction) else
                "list" if a.nargs in ("+", "*") else "value")
        name = a.option_strings[0].lstrip("-")
        flags[name] = Flag(name, a.dest, kind, a.help)
    return flags


def _number_text(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise SweepError(f"{v!r} is not a number or a string.")
    return str(v)


def normalize(flag: Flag, value: Any) -> str | bool:
    """One value of a flag, from command-line text or TOML, as the sweep keeps it."""
    if flag.kind in ("switch", "toggle"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOLS:
            return BOOLS[value.lower()]
        raise SweepError(f"--{flag.name} takes on/off (true/false) values, not {value!r}.")
    if flag.kind == "list":
        if not isinstance(value, (str, list, tuple)):
            raise SweepError(f"--{flag.name} takes numbers in a string or a list, not {value!r}.")
        tokens = re.split(r"[\s,]+", value.strip()) if isinstance(value, str) else [_number_text(v) for v in value]
        if not tokens or tokens == [""]:
            raise SweepError(f"--{flag.name} has an empty value.")
        return " ".join(tokens)
    if isinstance(value, bool):
        raise SweepError(f"--{flag.name} takes a value, not {value}.")
    return _number_text(value)


def flag_argv(flag: Flag, value: str | bool) -> list[str]:
    if flag.kind == "switch":
        return [f"--{flag.name}"] if value else []
    if flag.kind == "toggle":
        return [f"--{flag.name}" if value else f"--no-{flag.name}"]
    if flag.kind == "list":
        return [f"--{flag.name}", *str(value).split()]
    return [f"--{flag.name}={value}"]  # '=' keeps a value such as -1 from reading as a flag


@dataclass(frozen=True)
class Point:
    """One run of the grid: its settings (flag name -> value), their hash, the run flags."""

    settings: dict[str, str | bool]
    id: str
    argv: tuple[str, ...]

    def command(self, json_path: Path) -> list[str]:
        return [sys.executable, "-m", "offload_engine", "run", *self.argv, "--json", str(json_path), "--quiet"]

    def label(self, names: list[str] | None = None) -> str:
        return label(self.settings, self.settings if names is None else names) or self.id


def label(settings: dict, names) -> str:
    """name=value pairs, switches as on/off, values with spaces quoted."""
    shown = lambda v: ("on" if v else "off") if isinstance(v, bool) else shlex.quote(str(v))  # noqa: E731
    return " ".join(f"{n}={shown(settings.get(n))}" for n in names)


def make_point(settings: dict[str, str | bool], flags: dict[str, Flag], parser) -> Point:
    """Check the settings with the run parser and policy (a bad point stops the sweep before it
    starts) and hash the values as parsed."""
    from .cli.options import ArgumentError, policy_from_args

    argv = [a for name, v in settings.items() for a in flag_argv(flags[name], v)]
    shown = label(settings, settings)
    try:
        args = parser.parse_args(argv)
        policy_from_args(args)
    except (ArgumentError, EngineError) as e:
        raise SweepError(f"the point {shown or '(defaults)'} is not a valid run: {e}") from None
    parsed = {name: getattr(args, flags[name].dest) for name in settings}
    digest = hashlib.sha1(json.dumps(parsed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Point(dict(settings), digest, tuple(argv))


def expand(swept: dict[str, list], fixed: dict[str, Any] | None = None) -> list[Point]:
    """The cartesian product of the swept values (first key outermost), each with the fixed ones;
    names are run flags without dashes, values as `normalize` takes them."""
    fixed = fixed or {}
    flags = run_flags()
    unknown = [n for n in [*fixed, *swept] if n not in flags]
    if unknown:
        raise SweepError(f"unknown run flags: {', '.join(unknown)} (see `offload-engine run --help`).")
    both = sorted(set(fixed) & set(swept))
    if both:
        raise SweepError(f"{', '.join(both)} both fixed and swept: give each flag once.")
    for name, values in swept.items():
        if not values:
            raise SweepError(f"--{name} has no values to sweep.")
    fixed_n = {n: normalize(flags[n], v) for n, v in fixed.items()}
    axes = [[normalize(flags[n], v) for v in values] for n, values in swept.items()]
    parser, points, seen = run_parser(), [], set()
    for combo in itertools.product(*axes):
        point = make_point({**fixed_n, **dict(zip(swept, combo))}, flags, parser)
        if point.id not in seen:  # the same value twice is one point
            seen.add(point.id)
            points.append(point)
    return points


def read_grid(path: Path) -> tuple[dict[str, list], dict[str, Any]]:
    """(swept, fixed) from a TOML file: top-level keys are swept (a value or a list), [fixed] holds
    values common to all points. For --percent a flat list of numbers is one value."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise SweepError("--grid needs Python 3.11 or later (tomllib): give the grid as flags instead.") from None
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise SweepError(f"cannot read --grid {path} ({e.strerror}).") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"--grid {path} is not valid TOML ({e}).") from None
    flags = run_flags()
    fixed = data.pop("fixed", {})
    if not isinstance(fixed, dict):
        raise SweepError(f"'fixed' in {path} must be a table ([fixed]).")
    key = lambda k: k.lstrip("-").replace("_", "-")  # noqa: E731 - gpu_batch_size, gpu-batch-size, --gpu-batch-size
    swept, fixed = {key(k): v for k, v in data.items()}, {key(k): v for k, v in fixed.items()}
    unknown = [k for k in [*swept, *fixed] if k not in flags]
    if unknown:
        raise SweepError(f"unknown keys in {path}: {', '.join(unknown)} (keys are run flags without dashes, "
                         "e.g. gpu-batch-size, and a [fixed] table).")

    def values(name: str, v: Any) -> list:
        several = isinstance(v, list) and (flags[name].kind != "list" or all(isinstance(x, (list, str)) for x in v))
        return v if several else [v]

    for name, v in fixed.items():
        if len(values(name, v)) != 1:
            raise SweepError(f"[fixed] {name} in {path} has several values: move it above [fixed] to sweep it.")
    return {n: values(n, v) for n, v in swept.items()}, fixed


# --- running one point -----------------------------------------------------------------------

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


# --- the result files ------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    """The lines of sweep.jsonl, oldest first; a line cut short by a crash is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def append_line(path: Path, line: str) -> None:
    """Append in one write and fsync; a last line left without its newline gets one first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        lead = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        os.write(fd, lead + line.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


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


def predicted(record: dict) -> float | None:
    """The policy search's predicted token/s, where the run JSON carries one."""
    data = record.get("result") or {}
    value = (data.get("predicted") or {}).get("total_throughput", data.get("predicted_throughput"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def csv_row(record: dict) -> dict:
    data = record.get("result") or {}
    metrics, peaks = data.get("metrics") or {}, data.get("peak_memory") or {}
    row = {"id": record["id"], **record.get("settings", {})}
    row.update({col: metrics.get(key) for key, col in METRICS})
    row.update(peak_gpu_gib=peaks.get("peak_gpu_mem_gib"), predicted_token_s=predicted(record),
               status=record.get("status"), error=record.get("error"), wall_s=round(record.get("wall_s", 0.0), 2))
    return row


def csv_columns(names: list[str]) -> list[str]:
    return ["id", *names, *(col for _, col in METRICS), *TAIL]


def csv_text(rows: list[dict], columns: list[str], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename over path: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Sweep:
    """Runs the points not yet in out/sweep.jsonl, one process each, recording each as it ends."""

    points: list[Point]
    out: Path
    timeout_s: float = 1800.0
    retry_failed: bool = False
    force: bool = False
    runner: Runner = run_process
    plots: bool = True
    echo: Callable[[str], None] = print
    _warned: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.jsonl, self.csv = self.out / "sweep.jsonl", self.out / "sweep.csv"

    def records(self) -> list[dict]:
        return read_records(self.jsonl)

    def pending(self) -> list[Point]:
        if self.force:
            return list(self.points)
        wanted = ("ok",) if self.retry_failed else None
        done = {r.get("id") for r in self.records() if wanted is None or r.get("status") in wanted}
        return [p for p in self.points if p.id not in done]

    def names(self, records: list[dict]) -> list[str]:
        """Settings columns: this grid's names first, then any others in the file."""
        return list(dict.fromkeys([*(n for p in self.points for n in p.settings),
                                   *(n for r in records for n in r.get("settings", {}))]))

    def sync_csv(self) -> list[str]:
        """Rebuild sweep.csv from sweep.jsonl when its header or row count differs; returns the columns."""
        records = self.records()
        columns = csv_columns(self.names(records))
        if self.csv.exists():
            rows = list(csv.reader(io.StringIO(self.csv.read_text())))
            if rows and rows[0] == columns and len(rows) - 1 == len(records):
                return columns
        text = csv_text([csv_row(r) for r in records], columns, header=True)
        write_atomic(self.csv, lambda tmp: tmp.write_text(text))
        return columns

    def record(self, point: Point) -> dict:
        json_path = self.out.resolve() / f".point-{point.id}.json"
        json_path.unlink(missing_ok=True)
        cmd = point.command(json_path)
        (self.out / "logs").mkdir(exist_ok=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            o = self.runner(cmd, self.timeout_s, self.out / "logs" / f"{point.id}.log")
            try:
                data = json.loads(json_path.read_text()) if o.rc == 0 else None
            except (OSError, ValueError):
                data = None
        finally:
            json_path.unlink(missing_ok=True)
        status, error = classify(o, data, self.timeout_s)
        return dict(id=point.id, settings=point.settings, status=status, error=error, rc=o.rc,
                    wall_s=round(o.wall_s, 3), started=started, command=shlex.join(cmd), result=data)

    def run(self) -> list[dict]:
        """Run what is pending; returns the records written now. KeyboardInterrupt passes through
        after the point in flight is killed."""
        if self.out.exists() and not self.out.is_dir():
            raise SweepError(f"--out {self.out} is a file: name a folder.")
        self.out.mkdir(parents=True, exist_ok=True)
        lock = self.out / ".sweep.lock"
        owner = _lock_owner(lock)
        if owner is not None and owner != os.getpid():
            raise SweepError(f"another sweep (pid {owner}) is writing {self.out}: wait for it or choose another --out.")
        lock.write_text(str(os.getpid()))
        written: list[dict] = []
        try:
            columns = self.sync_csv()
            todo = self.pending()
            self.echo(f"{len(self.points)} points, {len(self.points) - len(todo)} done earlier, {len(todo)} to run")
            for i, point in enumerate(todo, 1):
                rec = self.record(point)
                with signals_held():  # the JSONL line and its CSV row, both or neither
                    append_line(self.jsonl, json.dumps(rec, default=str))
                    with open(self.csv, "a") as f:
                        f.write(csv_text([csv_row(rec)], columns, header=False))
                        f.flush()
                        os.fsync(f.fileno())
                written.append(rec)
                thr = (rec["result"] or {}).get("metrics", {}).get("total_throughput")
                self.echo(f"[{i}/{len(todo)}] {point.id} {point.label()}: {rec['status']}"
                          + (f", {thr:.2f} token/s" if thr is not None else f" ({(rec['error'] or '')[:100]})")
                          + f", {rec['wall_s']:.0f} s")
                if self.plots and i < len(todo):
                    self.plot(quiet=True)
            if self.plots:
                self.plot()
        finally:
            lock.unlink(missing_ok=True)
        return written

    def plot(self, quiet: bool = False) -> list[Path]:
        paths = draw_plots(latest(self.records()), self.out)
        if paths is None and not self._warned:
            self._warned = True
            self.echo("matplotlib is not installed: no plot drawn (pip install matplotlib)")
        elif paths and not quiet:
            self.echo("plots: " + ", ".join(str(p) for p in paths))
        return paths or []


def latest(records: list[dict]) -> list[dict]:
    """The last record of each id, in the order ids first appeared."""
    by_id: dict[str, dict] = {}
    for r in records:
        by_id[r.get("id")] = r
    return list(by_id.values())


def _lock_owner(lock: Path) -> int | None:
    """The pid in the lock file while that process lives, else None (a killed sweep's lock)."""
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


# --- plots -----------------------------------------------------------------------------------

def varying(records: list[dict]) -> list[str]:
    """The settings whose values differ between the records: what a point's label must show."""
    names = list(dict.fromkeys(n for r in records for n in r.get("settings", {})))
    return [n for n in names if len({str(r.get("settings", {}).get(n)) for r in records}) > 1]


def draw_plots(records: list[dict], out: Path) -> list[Path] | None:
    """throughput_vs_latency.png and, where runs carry a prediction, predicted_vs_measured.png;
    None without matplotlib. Agg canvases, no pyplot state; each file renamed into place."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ok = [r for r in records if r.get("status") == "ok" and (r.get("result") or {}).get("metrics")]
    names, paths = varying(ok), []
    title = (f"{len(ok)} points" + (f", {len(records) - len(ok)} failed (not shown)" if len(records) > len(ok) else "")
             + (f"\nlabels: {' / '.join(names)}" if names else ""))

    def scatter(xy: list[tuple[float, float, dict]], xlabel: str, ylabel: str, size: tuple[int, int]):
        fig = Figure(figsize=size)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for x, y, r in xy:
            ax.plot(x, y, "o")
            text = " / ".join(str(label(r["settings"], [n]).split("=", 1)[1]) for n in names) or r["id"]
            ax.annotate(text, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points").set_in_layout(False)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        return fig, ax

    def save(fig, name: str) -> None:
        fig.tight_layout()
        write_atomic(out / name, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        paths.append(out / name)

    xy = [(r["result"]["metrics"]["total_s"], r["result"]["metrics"]["total_throughput"], r) for r in ok]
    fig, ax = scatter(xy, "total latency (prefill + decode), s", "total throughput, token/s", (8, 6))
    ax.margins(x=0.3, y=0.1)  # room for the labels, written to the right of each point
    save(fig, "throughput_vs_latency.png")

    xy = [(predicted(r), r["result"]["metrics"]["total_throughput"], r) for r in ok if predicted(r) is not None]
    if xy:
        fig, ax = scatter(xy, "predicted total throughput, token/s", "measured total throughput, token/s", (7, 7))
        top = max(max(x, y) for x, y, _ in xy) * 1.15
        ax.plot([0, top], [0, top], "--", color="gray", label="y = x")
        ax.set(xlim=(0, top), ylim=(0, top))
        ax.legend(loc="lower right")
        save(fig, "predicted_vs_measured.png")
    return paths
