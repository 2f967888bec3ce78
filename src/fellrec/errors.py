"""Errors a user can cause. The CLI prints them on one line and exits with status 2."""

from __future__ import annotations

from pathlib import Path


class FellrecError(Exception):
    """A mistake in the user's input (file, config, path): reported in one line, never a traceback."""


class ConfigError(FellrecError):
    """A bad configuration: unknown key, wrong type, impossible value."""


class DataError(FellrecError):
    """Bad data: a missing or malformed file. Names the file and, where there is one, the line."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")
