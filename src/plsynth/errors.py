"""Errors that the CLIs turn into a per-case status line and an exit code."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """An input file that cannot be used; the message names the file and the problem.

    Raised by library code; only the CLIs catch it, report it per case and move on.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class BundleError(Exception):
    """A model bundle that is missing, incomplete, tampered with or of the wrong kind."""
