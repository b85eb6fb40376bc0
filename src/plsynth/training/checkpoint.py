"""Run checkpoints: ``last.pt`` (to resume) and ``best.pt`` (best validation Dice), kept apart.

A checkpoint is one ``torch.save`` of plain data, networks saved unwrapped (no DDP prefix):

    networks    {"model": state_dict[, "peer": state_dict]}
    optimizers  {"model": state_dict[, "peer": ...]}
    step        iterations done (the next step to run)
    epoch       epochs done
    best        {"dice": float, "step": int} of the best validation so far
    rng         torch / numpy / python generator states
    plan        the data-order parameters (seed, set sizes, batch sizes); order is a pure function of them
    config      the resolved config (Config.to_dict())
    method      train.method

Written to a temporary file in the same folder and renamed, so a run killed while saving leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Keys whose change does not alter the optimisation of a resumed run.
RESUME_IGNORED = {"source", "name", "train.val_every", "train.threads", "train.num_workers", "train.bundle_from",
                  "train.checkpoint_every", "ray"}


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP / Ray Train wrappers."""
    return getattr(net, "module", net)


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by this module (our own files: full unpickling is allowed)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read checkpoint: {exc}") from exc


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat[name] = "<section>"
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring RESUME_IGNORED."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_IGNORED or key.split(".")[0] in RESUME_IGNORED or ".".join(key.split(".")[:2]) in RESUME_IGNORED:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs
