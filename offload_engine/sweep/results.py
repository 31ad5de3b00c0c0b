"""The result files of a sweep: sweep.jsonl (the ledger) and sweep.csv (derived from it), read,
appended and replaced safely.

Why it is built this way:
- sweep.jsonl is the ledger: one line per finished point, written in one system call and fsynced
  before the next point starts. A line cut short by a crash is skipped when read, and the next
  append starts on a fresh line, so a crash never corrupts the finished points.
- sweep.csv is derived from the ledger (one row per record) and rebuilt when the two disagree;
  whole-file writes go through a temporary file renamed into place.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Callable

METRICS = (("total_throughput", "total_token_s"), ("total_s", "total_s"), ("prefill_s", "prefill_s"),
           ("decode_s", "decode_s"), ("decode_throughput", "decode_token_s"))
TAIL = ("peak_gpu_gib", "predicted_token_s", "status", "error", "wall_s")


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


def latest(records: list[dict]) -> list[dict]:
    """The last record of each id, in the order ids first appeared."""
    by_id: dict[str, dict] = {}
    for r in records:
        by_id[r.get("id")] = r
    return list(by_id.values())
