"""Sweeps of `offload-engine run` over a grid of settings; `offload-engine sweep` is its command line.

The package has one module per job: `grid` (flags/TOML -> checked points with ids), `runner` (one
engine process per point, its status), `results` (sweep.jsonl and sweep.csv) and `plots`. `Sweep`,
here, ties them together: it runs the points not yet recorded and records each as it ends.

Why it is built this way:
- A rerun skips the ids already in sweep.jsonl, so an interrupted sweep resumes without running a
  finished point twice or losing one; each point's JSONL line and CSV row are written with
  SIGINT/SIGTERM held off, both or neither.
- A lock file holding the sweep's pid keeps two sweeps from writing one folder; a lock left by a
  killed sweep is ignored.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .grid import Flag, Point, SweepError, expand, read_grid, run_flags, run_parser
from .plots import draw_plots
from .results import append_line, csv_columns, csv_row, csv_text, latest, read_records, write_atomic
from .runner import Outcome, Runner, classify, run_process, signals_held

__all__ = ["Flag", "Outcome", "Point", "Runner", "Sweep", "SweepError", "expand", "latest", "read_grid",
           "read_records", "run_flags", "run_parser", "run_process", "signals_held"]


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
        owner = lock_owner(lock)
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


def lock_owner(lock: Path) -> int | None:
    """The pid in the lock file while that process lives, else None (a killed run's lock)."""
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None
