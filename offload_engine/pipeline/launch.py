"""Starting the stages: one process per stage on this host through torch.distributed.elastic
(`--pipeline N`), or as launched by `torchrun` (several hosts: its --nnodes/--node-rank/
--master-addr). A stage that dies or cannot start ends the run with one message naming the
stage and its cause: the elastic agent watches the processes and stops the others at once.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import uuid
from pathlib import Path

from ..errors import EngineError
from .link import PeerLost
from .stage import PipelineJob, run_stage

# Said by a stage whose peer failed first: a consequence, reported only when nothing else is.
_SECONDARY = (PeerLost.__name__, "Connection closed by peer", "Connection reset by peer")


_AGENT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def run_pipeline(job: PipelineJob) -> dict:
    """Run the stages as processes of this host; the result of `stage.assemble`.

    Raises EngineError naming the first stage that failed (and how) if any stage fails."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if job.stages < 2:
        raise EngineError(f"a pipeline needs at least 2 stages, got {job.stages}.", "Drop --pipeline for one process.")
    _quiet_torch_loggers()
    _quiet_resource_tracker()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=job.stages, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=f"offload-engine-{uuid.uuid4().hex[:8]}",
                          max_restarts=0, monitor_interval=0.1, start_method="spawn")
    created = not Path(job.options.offload_dir).exists()
    handlers = {s: signal.getsignal(s) for s in _AGENT_SIGNALS}  # the agent installs its own, for good
    try:
        results = elastic_launch(config, stage_entry)(job)
    except ChildFailedError as e:
        raise EngineError(failure_message(job, e)) from None
    except SignalException:  # Ctrl-C or SIGTERM: the agent has stopped the stages
        raise KeyboardInterrupt("the pipeline was stopped; no results written") from None
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        remove_stage_folders(job, created)
    return results[0]


def _quiet_torch_loggers() -> None:
    """Failures are reported here, once: not also as the agent's log lines (torch.multiprocessing's
    "Terminating process ..." as it stops the stages a failed one leaves behind)."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torchelastic", "torch.multiprocessing")
    for name in [*prefixes, *logging.root.manager.loggerDict]:
        if name.startswith(prefixes):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _quiet_resource_tracker() -> None:
    """A killed stage leaves its semaphores to multiprocessing's resource tracker, which frees them
    when this process exits and warns about each "leak". The tracker is started here, before the
    stages, with that one warning filtered, so a failure stays the one line that names the stage.
    (A tracker started earlier by other code keeps its own settings.)"""
    from multiprocessing import resource_tracker

    previous = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [previous, "ignore:resource_tracker:UserWarning"]))
    try:
        resource_tracker.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = previous


def stage_entry(job: PipelineJob) -> dict | None:
    """A stage process's entry: errors are recorded for the launcher (the message it reports)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(run_stage)(job)


def remove_stage_folders(job: PipelineJob, remove_base: bool) -> None:
    """A stage killed mid-run leaves its offload files: its folder is ours, so it goes (and the
    offload folder itself when this run created it and nothing else is in it)."""
    base = Path(job.options.offload_dir)
    for k in range(job.stages):
        folder = base / f"stage{k}"
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
    if remove_base:
        try:
            base.rmdir()  # only if empty
        except OSError:
            pass


def failure_message(job: PipelineJob, error) -> str:
    """One line: the stage that failed first (a cause, not a lost peer) and why."""
    failures = sorted(error.failures.items(), key=lambda kv: (_is_secondary(kv[1]), kv[1].timestamp, kv[0]))
    rank, f = failures[0]
    cause = _cause(f)
    return f"pipeline failed: {job.describe(rank) if rank < job.stages else f'process {rank}'}: {cause}"


def _message(failure) -> str:
    msg = failure.message
    if isinstance(msg, dict):
        msg = msg.get("message", "")
    return str(msg or "")


def _is_secondary(failure) -> bool:
    return any(s in _message(failure) for s in _SECONDARY)


def _cause(failure) -> str:
    code = failure.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process was killed by {name}."
    text = _message(failure).strip()
    first = text.splitlines()[0] if text else f"exited with status {code}."
    first = re.sub(r"^(?:[\w.]+\.)?(EngineError|PeerLost): ", "", first)  # our errors read as sentences
    return re.sub(r"^stage \d+ of \d+ \(layers \d+-\d+\): ", "", first)[:500]
