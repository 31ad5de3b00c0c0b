"""Command line: `offload-engine <command> ...` (also `python -m offload_engine ...`).

Each command is a module with `add_parser(subparsers)` and `execute(args)`. Every input error,
wherever it is found, ends as one `error:` line on stderr and exit status 2; an interrupted
command (Ctrl-C or SIGTERM) exits 130 and leaves no result file behind.
"""
from __future__ import annotations

import os
import signal
import sys
from importlib import metadata

from ..errors import EngineError
from . import generate, ppl, profile, run, search, sweep
from .options import ArgumentError, Parser

COMMANDS = (run, generate, ppl, search, sweep, profile)

DESCRIPTION = """\
Throughput-oriented batch generation with OPT and Llama-family models whose weights, KV cache
and activations are spread over GPU, pinned CPU memory and disk.

The policy (--percent and the batch flags) says where everything lives; the engine checks that
it fits before allocating anything, then runs FlexGen's zig-zag block schedule.
"""


def _version() -> str:
    try:
        return metadata.version("offload-engine")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> Parser:
    parser = Parser(prog="offload-engine", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"offload-engine {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _terminate(signum, frame):  # SIGTERM ends a run the way Ctrl-C does: cleanup runs, nothing half-written
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Weights, caches and slots are long-lived and of few sizes; expandable segments keep the
    # allocator from fragmenting the GPU under a --gpu-mem cap. Read at the first CUDA allocation.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args = build_parser().parse_args(argv)
        # What the result files record as their command: the arguments parsed, also when called in-process.
        args.argv = ["offload-engine", *(sys.argv[1:] if argv is None else argv)]
        args.execute(args)
    except (EngineError, ArgumentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say what it kept (a sweep keeps its finished points)
        print(f"interrupted: {e}" if str(e) else "interrupted: no results written", file=sys.stderr)
        return 130
    except Exception as e:  # the GPU running out of memory beyond the plan is the one we expect
        import torch
        if not isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        first = str(e).splitlines()[0][:300]
        print(f"error: the GPU ran out of memory beyond the plan ({first}). Lower --gpu-batch-size or move "
              "weights / KV cache off the GPU (lower the 1st or 3rd --percent value).", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
