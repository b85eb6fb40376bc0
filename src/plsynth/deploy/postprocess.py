"""From probabilities on the input grid to the reported mask and its volumes.

Order (each step a pure function): threshold -> keep inside the lungs -> remove components
smaller than a minimum size. Sizes are in mm3 for volumes with spacing and in pixels for 2D
slices, which have none. Volumes are reported in ml (1 ml = 1000 mm3), never voxel counts
labelled as volumes.
"""

from __future__ import annotations

import math

import numpy as np

from plsynth.data.lungs import inside_lungs as keep_inside_lungs  # noqa: F401 - the one clip, shared with evaluation

LEFT, RIGHT = 1, 2  # project-wide lung labels: 1 patient-left, 2 patient-right


def threshold(prob: np.ndarray, tau: float) -> np.ndarray:
    """uint8 0/1 mask of ``prob >= tau`` (tau from the bundle's meta.json)."""
    return (np.asarray(prob) >= tau).astype(np.uint8)


def min_voxels(min_size_mm3: float, spacing: tuple[float, float, float] | None, min_size_px: int) -> int:
    """Smallest component kept, in voxels: ``ceil(mm3 / voxel volume)``, or pixels for 2D slices."""
    if spacing is None:
        return max(0, int(min_size_px))
    voxel = float(np.prod(spacing))
    return max(0, math.ceil(min_size_mm3 / voxel)) if voxel > 0 else 0


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 3D 26-connected components with fewer than ``min_size`` voxels (2D: 8-connected).

    Labelled inside the mask's bounding box only (the lungs' share of the volume), which gives
    the same components for a fraction of the work.
    """
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    box = bounding_box(mask)
    if min_size <= 1 or box is None:
        return mask.astype(np.uint8)
    labels, count = ndimage.label(mask[box], structure=np.ones((3,) * mask.ndim, bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_size
    keep[0] = False
    out = np.zeros(mask.shape, np.uint8)
    out[box] = keep[labels]
    return out


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every nonzero of ``mask``; None when it has none."""
    mask = np.asarray(mask)
    spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))) for axis in range(mask.ndim)]
    if spans[0].size == 0:
        return None
    return tuple(slice(int(idx[0]), int(idx[-1]) + 1) for idx in spans)


def _percent(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 3) if whole else None


def measure(infection: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float] | None) -> dict:
    """Report figures: infection and lung size overall and per lung, and % of lung involved.

    With spacing: ``*_ml`` in ml. Without (2D slices): ``*_px`` in pixels. Percentages are
    infection-inside-lung / lung x 100 (None when the lung is empty).
    """
    infection = np.asarray(infection).astype(bool)
    lung = np.asarray(lung)
    unit, scale = ("px", 1.0) if spacing is None else ("ml", float(np.prod(spacing)) / 1000.0)
    out: dict = {}
    total_inf = total_lung = 0
    for side, label in (("left", LEFT), ("right", RIGHT)):
        region = lung == label
        lung_n = int(region.sum())
        inf_n = int((infection & region).sum())
        total_inf += inf_n
        total_lung += lung_n
        out[f"{side}_infection_{unit}"] = round(inf_n * scale, 3)
        out[f"{side}_lung_{unit}"] = round(lung_n * scale, 3)
        out[f"{side}_percent_involved"] = _percent(inf_n, lung_n)
    return {
        f"infection_{unit}": round(total_inf * scale, 3),
        f"lung_{unit}": round(total_lung * scale, 3),
        "percent_involved": _percent(total_inf, total_lung),
        **out,
    }


# plausible adult lungs (both together): the review flag is raised outside these bounds
LUNG_ML_RANGE = (1000.0, 9000.0)
LUNG_SHARE_RANGE = (0.05, 0.8)  # 2D slices (no spacing): share of the slice covered by lung
LUNG_MIN_SIDE_RATIO = 0.25  # smaller lung / larger lung


def lung_review_reasons(lung: np.ndarray, spacing: tuple[float, float, float] | None) -> list[str]:
    """Why a lung mask looks implausible (empty list: plausible): size, symmetry, the image border.

    A flagged case is still segmented; the flag asks a person to look, since the lung mask bounds
    the infection, the lung volume and the % involved.
    """
    lung = np.asarray(lung)
    sides = [int(np.count_nonzero(lung == label)) for label in (LEFT, RIGHT)]
    total = sum(sides)
    reasons = []
    if min(sides) < LUNG_MIN_SIDE_RATIO * max(sides):
        reasons.append(f"one lung is {min(sides) / max(max(sides), 1):.0%} of the other's size")
    if spacing is not None:
        ml = total * float(np.prod(spacing)) / 1000.0
        if not LUNG_ML_RANGE[0] <= ml <= LUNG_ML_RANGE[1] and lung.shape[0] > 1:
            reasons.append(f"lung volume {ml:.0f} ml outside {LUNG_ML_RANGE[0]:.0f}-{LUNG_ML_RANGE[1]:.0f} ml")
        edges = np.concatenate([lung[:, 0, :].ravel(), lung[:, -1, :].ravel(), lung[:, :, 0].ravel(), lung[:, :, -1].ravel()])
        if np.count_nonzero(edges):  # a chest CT's field of view holds the whole chest
            reasons.append("a lung touches the image border (lung cut off, or the body is not found)")
    else:
        share = total / max(lung.size, 1)
        if not LUNG_SHARE_RANGE[0] <= share <= LUNG_SHARE_RANGE[1]:
            reasons.append(f"lung covers {share:.0%} of the slice")
    return reasons
