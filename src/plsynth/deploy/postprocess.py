"""From probabilities on the input grid to the reported mask and its volumes.

Order (each step a pure function): threshold -> keep inside the lungs -> remove components
smaller than a minimum size. Sizes are in mm3 for volumes with spacing and in pixels for 2D
slices, which have none. Volumes are reported in ml (1 ml = 1000 mm3), never voxel counts
labelled as volumes.
"""

from __future__ import annotations

import math

import numpy as np

LEFT, RIGHT = 1, 2  # project-wide lung labels: 1 patient-left, 2 patient-right


def threshold(prob: np.ndarray, tau: float) -> np.ndarray:
    """uint8 0/1 mask of ``prob >= tau`` (tau from the bundle's meta.json)."""
    return (np.asarray(prob) >= tau).astype(np.uint8)


def keep_inside_lungs(mask: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Infection only where a lung label (1 or 2) is: the model is not trusted outside the lungs."""
    return (np.asarray(mask).astype(bool) & (np.asarray(lung) > 0)).astype(np.uint8)


def min_voxels(min_size_mm3: float, spacing: tuple[float, float, float] | None, min_size_px: int) -> int:
    """Smallest component kept, in voxels: ``ceil(mm3 / voxel volume)``, or pixels for 2D slices."""
    if spacing is None:
        return max(0, int(min_size_px))
    voxel = float(np.prod(spacing))
    return max(0, math.ceil(min_size_mm3 / voxel)) if voxel > 0 else 0


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 3D 26-connected components with fewer than ``min_size`` voxels (2D: 8-connected)."""
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    if min_size <= 1 or not mask.any():
        return mask.astype(np.uint8)
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels].astype(np.uint8)


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
