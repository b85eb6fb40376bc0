"""Dice (DSC) and normalized surface Dice (NSD), per volume in 3D and per slice in 2D.

These are the COVID-19-20 challenge metrics (Dice and "SurfaceDiceAt1mm", adopted from the
Medical Segmentation Decathlon) that the paper reports per volume. NSD comes from MONAI's
``compute_surface_dice(..., use_subvoxels=True)``, which follows the DeepMind surface-distance
algorithm the challenge used (surfels from 2x2(x2) neighbourhood codes, weighted by their area
or length); the DeepMind package itself does not install on NumPy 2, so nothing is hand-rolled.

Conventions (the same for both metrics):

- Masks are binary numpy arrays of one shape, 2D ``(y, x)`` or 3D ``(z, y, x)``; anything
  non-zero counts as foreground.
- ``spacing`` is the voxel size in mm in the array's axis order, ``(z, y, x)`` for volumes and
  ``(y, x)`` for slices. ``None`` means unit spacing, so the tolerance is read in *pixels*:
  2D slices without spacing (COVID-SemiSeg) get the default tolerance of 1 pixel, and reports
  must say so.
- **Both masks empty -> 1.0.** A correctly empty prediction is perfect; the DeepMind code and
  MONAI return NaN there, and one NaN poisons a plain mean over cases (the paper's evaluation
  averages with ``np.mean``). MONAI's ``DiceMetric(ignore_empty=False)`` uses the same 1.0.
  COVID-19-20 test volumes all contain infection, so the choice never changes a challenge
  figure; it matters for per-slice scores and for infection-free phantom or control cases.
- **Exactly one mask empty -> 0.0** (no overlap; no surface within any tolerance).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _binary_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference differ in shape: {pred.shape} vs {ref.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D (y, x) or 3D (z, y, x), got shape {pred.shape}")
    return pred != 0, ref != 0


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient ``2|A and B| / (|A| + |B|)`` of two binary masks.

    Both empty -> 1.0, one empty -> 0.0 (see the module docstring for why).
    """
    a, b = _binary_pair(pred, ref)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def nsd(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None,
    tolerance_mm: float = 1.0,
) -> float:
    """Normalized surface Dice at ``tolerance_mm`` (DeepMind surfels via MONAI, subvoxel surfaces).

    The share of both boundaries (by surfel area in 3D, contour length in 2D) that lies within
    ``tolerance_mm`` of the other boundary. ``spacing`` is in mm in the array's axis order;
    ``None`` means unit spacing, so ``tolerance_mm`` is then a number of pixels (1 pixel by
    default). Both empty -> 1.0, one empty -> 0.0.
    """
    import torch
    from monai.metrics import compute_surface_dice

    from plsynth.torch_setup import denormals_kept

    a, b = _binary_pair(pred, ref)
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) != a.ndim or min(spacing) <= 0:
            raise ValueError(f"spacing must be {a.ndim} positive numbers (mm) for masks of shape {a.shape}, got {spacing}")
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 1.0
    if has_a != has_b:
        return 0.0

    # Surface distances are translation invariant: crop both masks to the box around their union,
    # with one voxel of background kept on every side that is not the array's own border, so the
    # one-hot tensors are the size of the lesions, not of a 512 x 512 x 300 volume.
    union = np.logical_or(a, b)
    box = []
    for axis in range(a.ndim):
        other = tuple(i for i in range(a.ndim) if i != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, a.shape[axis])))
    a, b = a[tuple(box)], b[tuple(box)]

    def one_hot(mask: np.ndarray) -> torch.Tensor:
        fg = torch.from_numpy(mask.astype(np.float32))
        return torch.stack([1.0 - fg, fg])[None]  # (B=1, C=2, ...), channel 0 background

    with warnings.catch_warnings(), denormals_kept():
        # MONAI 1.5+ passes a deprecated argument to its own get_mask_edges; not ours to fix.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        value = compute_surface_dice(
            one_hot(a),
            one_hot(b),
            class_thresholds=[float(tolerance_mm)],
            include_background=False,
            spacing=spacing,
            use_subvoxels=True,
        )
    return float(value.reshape(-1)[0])


def score_case(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None,
    tolerance_mm: float = 1.0,
) -> dict[str, float]:
    """Dice and NSD of one case (a volume in 3D, or a single 2D slice): ``{"dice": .., "nsd": ..}``."""
    return {"dice": dice(pred, ref), "nsd": nsd(pred, ref, spacing, tolerance_mm)}


def score_slices(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None,
    tolerance_mm: float = 1.0,
) -> list[dict[str, float]]:
    """Per-slice Dice and NSD of a ``(z, y, x)`` volume, one dict per slice ``z``.

    Each slice is scored in 2D with the in-plane spacing ``spacing[1:]`` (``None``: pixels).
    Slices where both masks are empty score 1.0 (module convention), so a mean over slices
    rewards correct negatives; filter on ``ref[z].any()`` for a positives-only figure.
    """
    a, b = _binary_pair(pred, ref)
    if a.ndim != 3:
        raise ValueError(f"score_slices needs a (z, y, x) volume, got shape {a.shape}")
    if spacing is not None and len(spacing) != 3:
        raise ValueError(f"spacing must be (z, y, x) in mm, got {spacing}")
    in_plane = None if spacing is None else tuple(spacing[1:])
    return [score_case(a[z], b[z], in_plane, tolerance_mm) for z in range(a.shape[0])]
