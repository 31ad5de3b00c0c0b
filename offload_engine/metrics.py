"""Throughput as FlexGen defines it, the printed report, and machine-readable results."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

GiB = float(1 << 30)


@dataclass
class RunMetrics:
    batch_size: int
    prompt_len: int
    gen_len: int  # tokens generated per sequence
    prefill_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def prefill_throughput(self) -> float:
        return self.batch_size * self.prompt_len / self.prefill_s

    @property
    def decode_throughput(self) -> float:
        steps = self.gen_len - 1
        return self.batch_size * steps / self.decode_s if steps and self.decode_s > 0 else 0.0

    @property
    def total_throughput(self) -> float:
        """Generated tokens / (prefill + decode time)."""
        return self.batch_size * self.gen_len / self.total_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(total_s=self.total_s, prefill_throughput=self.prefill_throughput,
                 decode_throughput=self.decode_throughput, total_throughput=self.total_throughput)
        return d


def peak_memory() -> dict[str, float]:
    """Measured peaks: GPU bytes allocated by PyTorch, and the process's resident host memory."""
    out = {"peak_cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}
    if torch.cuda.is_available():
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / GiB
    return out


def hardware() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": psutil.cpu_count(logical=True),
        "ram_gib": psutil.virtual_memory().total / GiB,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gib=props.total_memory / GiB)
    else:
        info["gpu"] = None
    return info


def git_commit() -> str:
    """The commit of the source tree; OFFLOAD_ENGINE_COMMIT names it where the tree is a copy without .git."""
    if os.environ.get("OFFLOAD_ENGINE_COMMIT"):
        return os.environ["OFFLOAD_ENGINE_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(m: RunMetrics, sizes: dict[str, float], peaks: dict[str, float]) -> str:
    """The lines FlexGen prints (its "GB" are GiB, as here)."""
    lines = [
        f"model size: {sizes['model_gib']:.3f} GiB\tcache size: {sizes['cache_gib']:.3f} GiB\t"
        f"hidden size (p): {sizes['hidden_gib']:.3f} GiB",
        f"peak gpu mem: {peaks.get('peak_gpu_mem_gib', 0.0):.3f} GiB\tpeak cpu mem: {peaks['peak_cpu_rss_gib']:.3f} GiB",
        f"prefill latency: {m.prefill_s:.3f} s\tprefill throughput: {m.prefill_throughput:.3f} token/s",
        f"decode latency: {m.decode_s:.3f} s\tdecode throughput: {m.decode_throughput:.3f} token/s",
        f"total latency: {m.total_s:.3f} s\ttotal throughput: {m.total_throughput:.3f} token/s",
    ]
    return "\n".join(lines)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write all or nothing: an interrupted run never leaves a half-written file."""
    path = Path(path)
    fd, tmp = user_temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def user_temp_file(path: Path) -> tuple[int, str]:
    """(descriptor, name) of a new temporary file beside `path` to be renamed over it. Unlike
    mkstemp's 0600, it gets the permissions the umask gives any file the user creates (0644
    under umask 022), which the rename keeps."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(8).hex()}.tmp"  # O_EXCL: never another's
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), str(tmp)


def check_output_file(path: Path, flag: str = "--json", what: str = "results") -> None:
    """Refuse an output path that cannot be written, before a long run rather than after it."""
    from .errors import EngineError
    from .io.folders import file_in_the_way

    path = Path(path)
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise EngineError(f"cannot write {what} to {path}: {blocker} is a file, not a folder.",
                          f"Pass {flag} a file in a folder.")
    if not path.parent.is_dir():
        raise EngineError(f"cannot write {what} to {path}: the folder {path.parent} does not exist.",
                          f"Create it first, or pass {flag} a file in an existing folder.")
    if path.is_dir():
        raise EngineError(f"{flag} {path} is a folder.", "Name a file.")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise EngineError(f"cannot write {what} to {path} ({e.strerror}).", f"Pass a writable {flag} path.") from None


class PeakHostMemory:
    """Peak anonymous resident memory (RssAnon: heap and pinned buffers, not file pages the
    kernel may drop) while the block runs, sampled every few milliseconds on a thread.

        with PeakHostMemory() as peak:
            engine = Engine(...)
        peak.peak_bytes, peak.start_bytes
    """

    def __init__(self, interval_s: float = 0.005):
        import threading

        self.interval_s = interval_s
        self.samples = 0  # taken by the thread so far
        self.start_bytes = self.peak_bytes = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _read() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return psutil.Process().memory_info().rss  # not Linux: total resident memory

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self._read())
            self.samples += 1

    def __enter__(self) -> "PeakHostMemory":
        self.start_bytes = self.peak_bytes = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._read())

    @property
    def added_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes
