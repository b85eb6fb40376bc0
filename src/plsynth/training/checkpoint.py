"""Run checkpoints: ``last.pt`` (to resume) and ``best.pt`` (best validation Dice), kept apart.

A checkpoint is one ``torch.save`` of plain data, networks saved unwrapped (no DDP prefix):

    networks    {"model": state_dict[, "peer": state_dict]}
    optimizers  {"model": state_dict[, "peer": ...]}
    step        iterations done (the next step to run)
    epoch       epochs done
    best        {"dice": float, "step": int} of the best validation so far
    rng         torch / numpy / python generator states, as tensors and plain data (see `rng_state`)
    plan        the data-order parameters (seed, set sizes, batch sizes); order is a pure function of them
    config      the resolved config (Config.to_dict())
    method      train.method

Written to a temporary file in the same folder and renamed, so a run killed while saving leaves
the previous checkpoint intact. Read with ``torch.load(weights_only=True)`` only: a run folder is
user-writable, and a pickle placed there must not run (this is also what ``plsynth export`` reads).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plsynth.atomic import atomic_write
from plsynth.config import REMOVED_KEYS, REMOVED_SWITCHES, Config
from plsynth.errors import InputError

# Keys whose change does not alter the optimisation of a resumed run (``train.val_every``: the
# name of ``train.val_every_iters`` in checkpoints written before 2026-12-02; removed keys: old
# checkpoints hold them).
RESUME_IGNORED = {"source", "name", "train.val_every", "train.val_every_iters", "train.threads", "train.bundle_from",
                  "train.checkpoint_every", "train.device", "train.compile", "ray", *REMOVED_KEYS}


def rng_state() -> dict[str, Any]:
    """Generator states as tensors and plain data, so that ``weights_only=True`` can read them back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP / Ray Train wrappers."""
    return getattr(net, "module", net)


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` (temporary file + rename)."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain data only: no code runs).

    A file that needs more (a pickle, or a checkpoint from before the RNG state was stored as
    tensors) is refused with the reason; delete it or train into a new ``--out``.
    """
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot read the checkpoint with weights_only=True (only tensors and plain data are "
                               f"loaded; a pickle or an older checkpoint format is refused): {reason}") from None


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
    """Dotted keys whose values differ between two config dicts, ignoring RESUME_IGNORED.

    A key the saved config lacks was added to the schema after the run started; at its default it
    means what the older code did (switches are added off), so it is no difference; so is a removed
    switch the saved config holds at its old default (``REMOVED_SWITCHES``)."""
    a, b = _flatten(saved), _flatten(current)
    defaults = _flatten(Config().to_dict())
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_IGNORED or key.split(".")[0] in RESUME_IGNORED or ".".join(key.split(".")[:2]) in RESUME_IGNORED:
            continue
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue
        if key not in b and key in REMOVED_SWITCHES and a[key] == REMOVED_SWITCHES[key][0]:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs
