"""The grid of a sweep: flags or a TOML file expanded into points, each checked by the run parser
and given an id.

Why it is built this way:
- The flags come from the parser of `offload-engine run` itself, so the sweep accepts exactly what a
  run does and the two commands cannot drift apart.
- A point's id hashes its settings as the run parser reads them (4 and "4", "16" and "16GiB",
  flag order, TOML or flags: the same point; "16GB" another), so resuming does not depend on how
  the grid was written.
- Every point is checked (parser and policy) before the first one runs: a bad point stops the
  sweep before it starts, not hours into it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EngineError

EXCLUDED = ("help", "json", "quiet", "dry_run")  # run flags the sweep sets itself or has its own of
BOOLS = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}


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
    from ..cli import run
    from ..cli.options import Parser

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
    from ..cli.options import ArgumentError, policy_from_args, unread_kv_flags

    argv = [a for name, v in settings.items() for a in flag_argv(flags[name], v)]
    shown = label(settings, settings)
    try:
        args = parser.parse_args(argv)
        # A grid crossing KV policies with one policy's flags (full and h2o, --hh-ratio 0.2): each
        # point runs with the flags its policy reads.
        unread = {name.lstrip("-") for name in unread_kv_flags(args)}
        argv = [a for name, v in settings.items() if name not in unread for a in flag_argv(flags[name], v)]
        policy_from_args(parser.parse_args(argv))
    except (ArgumentError, EngineError) as e:
        raise SweepError(f"the point {shown or '(defaults)'} is not a valid run: {e}") from None
    parsed = {name: getattr(args, flags[name].dest) for name in settings}
    digest = hashlib.sha1(json.dumps(parsed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Point(dict(settings), digest, tuple(argv))


def check_model(settings: dict[str, str | bool], parser, checked: set) -> None:
    """The point's --model names a known model, folder or file (the run's own resolution, which
    reads a config but no weights): a misspelt name stops the sweep before its first point."""
    from ..model_zoo import resolve_model

    key = (str(settings.get("model", parser.get_default("model"))), bool(settings.get("dummy", False)))
    if key in checked:
        return
    try:
        resolve_model(*key)
    except EngineError as e:
        raise SweepError(f"{e} (in the grid's --model values)") from None
    checked.add(key)


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
    parser, points, seen, models = run_parser(), [], set(), set()
    for combo in itertools.product(*axes):
        settings = {**fixed_n, **dict(zip(swept, combo))}
        check_model(settings, parser, models)
        point = make_point(settings, flags, parser)
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
