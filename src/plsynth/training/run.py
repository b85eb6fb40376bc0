"""`plsynth train <method>`: one call from a config to a bundle."""

from __future__ import annotations

from pathlib import Path

from plsynth.config import Config


def train(cfg: Config, out: Path) -> Path:
    """Train ``cfg.train.method`` in ``out`` (resuming from ``out/last.pt``) and return ``out/bundle``."""
    from plsynth.training.loop import run_training

    result = run_training(cfg, Path(out))
    return result.bundle if result.bundle is not None else Path(out) / "bundle"
