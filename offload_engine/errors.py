"""User-facing errors: one line that says what is wrong and what to change."""

import numbers


class EngineError(Exception):
    """An error caused by the user's input or machine, reported without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}" if fix else problem)


def format_size(nbytes: float) -> str:
    """Bytes as a message should show them at any scale: GiB from 1 GiB up, else MiB, KiB or bytes
    (a 2 MiB disk reads "2.0 MiB", never "0.00 GiB")."""
    for unit, scale, digits in (("GiB", 1 << 30, 2), ("MiB", 1 << 20, 1), ("KiB", 1 << 10, 1)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{int(nbytes)} bytes"


def require_int(value: object, what: str, minimum: int) -> None:
    """A whole number (not a bool) of at least `minimum`, else an EngineError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise EngineError(f"{what} must be a whole number of at least {minimum}, got {value!r}.")


def require_number(value: object, what: str) -> None:
    """A real number (not a bool or a string), else an EngineError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EngineError(f"{what} must be a number, got {value!r}.")
