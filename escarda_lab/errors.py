"""User-facing errors: the CLI prints them as one paragraph and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: names where it is, what is wrong and how to fix it."""

    def __init__(self, source: str, key: str | None, problem: str, fix: str):
        self.source, self.key, self.problem, self.fix = str(source), key, problem, fix
        where = f"{self.source}" + (f", key `{key}`" if key else "")
        super().__init__(f"{where}: {problem}. Fix: {fix}.")


class ConfigError(UserError):
    """Bad YAML, unknown key, wrong type, impossible shape."""


class DataError(UserError):
    """Missing corpus, unreadable file, empty split."""


class Diverged(Exception):
    """Training produced a non-finite loss or gradient."""

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        super().__init__(f"training diverged at step {step}: {what} is not finite")
