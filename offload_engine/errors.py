"""User-facing errors: one line that says what is wrong and what to change."""


class EngineError(Exception):
    """An error caused by the user's input or machine, reported without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}" if fix else problem)
