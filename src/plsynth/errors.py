"""Errors that the CLIs turn into a per-case status line and an exit code, and the one exit-code table.

Every console script (``plsynth``, ``plsynth-infer``, ``train_sa_cps``, ``train_sa_st``) runs its
Typer app through :func:`run_app`, so a given failure gives the same exit code and the same
one-line message everywhere; a traceback is printed only with ``--verbose`` (or
``PLSYNTH_VERBOSE=1``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any


class ExitCode(IntEnum):
    """Exit codes of every plsynth console script (README and docs/hospital-guide.md list them)."""

    OK = 0
    FAILED = 1  # plsynth-infer: some cases failed, the others were written
    USAGE = 2  # bad option, value or config file
    NO_INPUT = 3  # no usable input (no case found, unreadable data)
    BUNDLE = 4  # model bundle missing, damaged, tampered with or of the wrong kind
    ENGINE = 5  # the engine asked for (a GPU one, or OpenVINO) was not obtained (no --allow-fallback)
    LOCKED = 6  # the output folder is in use by another run (its pid and host are named)
    INTERNAL = 70  # an unexpected error (EX_SOFTWARE); the traceback with --verbose
    INTERRUPTED = 130  # Ctrl-C / SIGINT


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


class EngineUnavailable(RuntimeError):
    """The engine or device the user asked for cannot be had here (and no fallback was allowed)."""


class LockedError(RuntimeError):
    """An output folder is locked by another running process (the message names its pid and host)."""


def _exit_for(exc: BaseException) -> tuple[int, str] | None:
    """(code, message) for the errors that have their own exit code; None for anything else."""
    from plsynth.config import ConfigError

    table: list[tuple[type[BaseException], ExitCode, str]] = [
        (ConfigError, ExitCode.USAGE, "config error"),
        (InputError, ExitCode.NO_INPUT, "input error"),
        (BundleError, ExitCode.BUNDLE, "bundle error"),
        (EngineUnavailable, ExitCode.ENGINE, "engine unavailable"),
        (LockedError, ExitCode.LOCKED, "output folder locked"),
    ]
    for kind, code, label in table:
        if isinstance(exc, kind):
            return int(code), f"{label}: {exc}"
    return None


def verbose_requested(argv: Sequence[str]) -> bool:
    return "--verbose" in argv or os.environ.get("PLSYNTH_VERBOSE", "") not in ("", "0")


def run_app(app: Any, prog_name: str, argv: Sequence[str] | None = None) -> int:
    """Run a Typer app and return the documented exit code; never lets a traceback out unless verbose.

    Typer (0.29) raises its own bundled click exceptions (``typer._click.exceptions``), not
    ``click``'s: usage errors are caught here as Typer's ``ClickException`` and shown with the
    usage line (exit 2).
    """
    import traceback

    from typer._click.exceptions import ClickException, UsageError
    from typer.exceptions import Abort, Exit

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = verbose_requested(argv)
    try:
        code = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except Exit as exc:
        return int(exc.exit_code)
    except (Abort, KeyboardInterrupt):
        sys.stderr.write(f"{prog_name}: interrupted\n")
        return int(ExitCode.INTERRUPTED)
    except UsageError as exc:
        exc.show()
        return int(ExitCode.USAGE)
    except ClickException as exc:  # e.g. FileError: a file given as an option cannot be opened
        exc.show()
        return int(ExitCode.USAGE)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and a documented code
        known = _exit_for(exc)
        if verbose:
            traceback.print_exc()
        if known is not None:
            code, message = known
            sys.stderr.write(f"{prog_name}: {message}\n")
            return code
        hint = "" if verbose else " (run again with --verbose, or PLSYNTH_VERBOSE=1, for the traceback)"
        sys.stderr.write(f"{prog_name}: internal error: {type(exc).__name__}: {exc}{hint}\n")
        return int(ExitCode.INTERNAL)
    return code if isinstance(code, int) else int(ExitCode.OK)
