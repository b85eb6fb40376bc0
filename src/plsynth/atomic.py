"""Atomic writes: an output file (or folder) is either the old one, the complete new one, or absent.

Everything plsynth writes (masks, reports, checkpoints, shards, engines, plots) goes through
:func:`atomic_write`, and every folder handed between stages (bundles) through
:func:`atomic_folder`, so an interrupted run (Ctrl-C, OOM kill, full disk, a crash inside a
writer) never leaves a half-written file under the final name. The writer writes to a
temporary name in the *same folder* (so the final ``os.replace`` is a rename on one file
system, which POSIX and Windows make atomic) and the rename happens only when the ``with``
block finishes without an exception.

The temporary name is ``.tmp-<random>-<final name>``: it starts with ``.`` (hidden, and skipped
by ``plsynth.data.io.find_cases``) and ends in the final name, so writers that choose a format
by suffix (nibabel's ``.nii.gz``, SimpleITK, PIL, ``torch.save`` of ``.pt``) behave exactly as
they would with the final name. A process killed with SIGKILL can leave such a hidden temporary
file behind; it is never mistaken for a result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"


def temp_path_for(path: Path) -> Path:
    """A fresh, unused temporary path beside ``path`` that ends in ``path``'s name (hence suffixes)."""
    path = Path(path)
    for _ in range(100):
        candidate = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}-{path.name}")
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(f"{path}: could not find a free temporary name beside it")


def _remove(path: Path) -> None:
    """Remove a temporary file or folder if it exists; never raises (we are cleaning up)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()
    except OSError as error:  # pragma: no cover - depends on the file system
        logger.warning("could not remove temporary %s: %s", path, error)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    Usage::

        with atomic_write(out / "case.nii.gz") as tmp:
            nib.save(image, tmp)

    - The parent folder is created if needed. The temporary path does not exist yet: the
      writer creates it (a file, or a folder for folder outputs such as bundles).
    - On success the temporary is moved to ``path`` with ``os.replace`` (atomic for files).
      A folder replacing an existing folder is done as rename-old-aside, rename-new-in,
      delete-old: never half-written, but for a moment ``path`` is absent.
    - On any exception (including KeyboardInterrupt) the temporary is removed, ``path`` is left
      untouched and the exception is re-raised.
    - If the block ends without having created the temporary, ``FileNotFoundError`` is raised
      (a writer that silently wrote nothing is a bug, not a success).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise FileNotFoundError(f"{path}: the writer created nothing at the temporary path {tmp.name}")
        _commit(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _commit(tmp: Path, path: Path) -> None:
    if tmp.is_dir() and path.is_dir() and not path.is_symlink():
        old = temp_path_for(path)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # put the previous folder back
            raise
        _remove(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside ``path``; on success it replaces ``path``.

    The one way a folder (a model or synthesizer bundle) is committed: its files are flushed to
    disk, then the folder is renamed into place (an existing ``path`` is replaced only once the
    new folder is complete; see :func:`atomic_write`). On any exception nothing changes at ``path``.
    """
    with atomic_write(path) as tmp:
        tmp.mkdir()
        yield tmp
        for entry in tmp.rglob("*"):
            if entry.is_file() and not entry.is_symlink():
                with open(entry, "rb") as handle:
                    os.fsync(handle.fileno())


def atomic_write_npy(path: Path, array) -> Path:
    """``np.save`` to ``path`` atomically (cached slices, offline shards); returns ``path``."""
    import numpy as np

    with atomic_write(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    return Path(path)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename); returns ``path``."""
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 unless told otherwise); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


LOCK_NAME = ".plsynth.lock"


@contextlib.contextmanager
def folder_lock(folder: Path, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the duration of the block.

    Two runs writing into one output folder would lose or duplicate records, so the second one
    gets ``LockedError`` naming the holder (pid, host, command, start time). The lock is
    ``flock`` on ``folder/.plsynth.lock``: the kernel releases it when the holder exits, even on
    kill -9, so a dead run never leaves a stale lock (on NFS, flock may not be shared between hosts).
    """
    import datetime as _dt
    import fcntl
    import json
    import socket

    from plsynth.errors import LockedError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "command", "started") if k in holder) or "unknown"
        raise LockedError(f"{folder} is in use by another run ({who}); wait for it to end or choose another folder") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


__all__ = ["atomic_write", "atomic_folder", "atomic_write_npy", "folder_lock", "atomic_write_bytes", "atomic_write_text", "temp_path_for", "TEMP_PREFIX"]
