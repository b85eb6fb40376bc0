"""`plsynth export` (owned by the deploy stage)."""

from __future__ import annotations


def export_command() -> None:
    """Export a training run's networks to ONNX (and TensorRT)."""
    raise NotImplementedError("plsynth export lands with the deploy issue")
