"""The semantic map that the SEAN synthesizer draws from, built in exactly one place.

Classes (project contract): 0 background, 1 patient-LEFT lung, 2 patient-RIGHT lung, 3 infection,
and, for a synthesizer trained with ``synth.vessels``, 4 vessel (read from the slice itself,
``plsynth.data.vessels``). Infection overrides the rest; vessels are marked only inside the lung
field, and infection outside it is kept as class 3 (as the reference code does: a pseudo-label is
drawn where the segmenter put it, whatever the lung tool said).

Lung label arrays follow the project contract (1 = patient left = larger x in the LPS array or
larger column in a radiological-view slice). lungmask writes the opposite (R231: 1 = right,
2 = left); :func:`from_lungmask_labels` is the one place that remaps it.

Every function takes numpy arrays or torch tensors (any leading dimensions) and returns the same
kind; torch is never imported here, so numpy-only callers don't pay for it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

BACKGROUND = 0
LEFT_LUNG = 1  # patient's left: larger x index in LPS (z, y, x); image right in radiological view
RIGHT_LUNG = 2
INFECTION = 3
VESSEL = 4
NUM_CLASSES = 4  # the paper's map; map_classes(True) with vessels
CLASS_NAMES = ("background", "left lung", "right lung", "infection", "vessel")


def map_classes(vessels: bool) -> int:
    """Classes of a synthesizer's maps: 4, 5 with the vessel class (``synth.vessels``)."""
    return NUM_CLASSES + int(vessels)

# lungmask (JoHof/lungmask, R231 and R231CovidWeb): 1 = right lung, 2 = left lung.
LUNGMASK_RIGHT = 1
LUNGMASK_LEFT = 2


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _max(x: Any) -> int:
    if x.numel() == 0 if _is_tensor(x) else x.size == 0:
        return 0
    return int(x.max())


def _min(x: Any) -> int:
    if x.numel() == 0 if _is_tensor(x) else x.size == 0:
        return 0
    return int(x.min())


def semantic_map(lung: Any, infection: Any, vessel: Any = None) -> Any:
    """Combine a lung label array (0/1/2), an infection mask (0/1, or any value > 0) and, when
    given, a vessel mask into 0..3 (0..4 with vessels).

    Shapes must be equal (any leading dimensions, e.g. (H, W), (B, H, W) or (Z, Y, X)).
    numpy in -> uint8 out; torch in -> int64 (long) out on the lung tensor's device, ready for
    :func:`one_hot` or ``scatter_``. Raises ValueError on shape mismatch or lung values outside 0..2.
    """
    if tuple(lung.shape) != tuple(infection.shape):
        raise ValueError(f"semantic_map: lung shape {tuple(lung.shape)} != infection shape {tuple(infection.shape)}")
    if _min(lung) < 0 or _max(lung) > RIGHT_LUNG:
        raise ValueError(f"semantic_map: lung labels must be in 0..2, got {_min(lung)}..{_max(lung)}")
    if _is_tensor(lung) or _is_tensor(infection):
        import torch

        lung_t = torch.as_tensor(lung).long()
        infection_t = torch.as_tensor(infection, device=lung_t.device)
        out = lung_t
        if vessel is not None:
            vessel_t = torch.as_tensor(vessel, device=lung_t.device)
            out = torch.where((vessel_t > 0) & (lung_t > 0), torch.full_like(lung_t, VESSEL), out)
        return torch.where(infection_t > 0, torch.full_like(lung_t, INFECTION), out)
    out = np.asarray(lung).astype(np.uint8, copy=True)
    if vessel is not None:
        out[(np.asarray(vessel) > 0) & (np.asarray(lung) > 0)] = VESSEL
    out[np.asarray(infection) > 0] = INFECTION
    return out


def class_map_at(size: int, lung: Any, infection: Any, image: Any = None, vessels: bool = False) -> tuple[Any, Any]:
    """The synthesizer's condition at its size S, one rule for its training batches and for the
    requests it serves (torch tensors only).

    lung (B, H, W), infection (B, 1, H, W) (> 0.5 = infection), image (B, 1, H, W) in [0, 1] or
    None; maps are nearest-resized and the image bilinear-resized when their size is not S. With
    ``vessels`` the 5th class is read from the image (:mod:`plsynth.data.vessels`), which is then
    required.
    Returns (image (B, 1, S, S) clamped to [0, 1], or None; map (B, S, S) long).
    """
    import torch.nn.functional as F

    infection = (infection.float() > 0.5).float()
    lung = lung.long()
    if tuple(lung.shape[-2:]) != (size, size):
        lung = F.interpolate(lung[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    if tuple(infection.shape[-2:]) != (size, size):
        infection = F.interpolate(infection, size=(size, size), mode="nearest")
    if image is not None:
        image = image.float()
        if tuple(image.shape[-2:]) != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        image = image.clamp(0, 1)
    vessel = None
    if vessels:
        if image is None:
            raise ValueError("a map with vessels (synth.vessels) reads them from the slices: it needs its images")
        from plsynth.data.vessels import vessel_mask

        vessel = vessel_mask(image, lung)
    return image, semantic_map(lung, infection[:, 0], vessel)


def one_hot(semantic: Any, num_classes: int = NUM_CLASSES) -> Any:
    """(..., H, W) integer map -> (..., num_classes, H, W) float32 one-hot (channel before H, W).

    This is the SEAN generator's input layout (the reference code's ``scatter_`` on dim 1 for a
    (B, 1, H, W) map gives the same as this on (B, H, W)). Values outside 0..num_classes-1 raise.
    """
    if semantic.ndim < 2:
        raise ValueError(f"one_hot: need at least (H, W), got shape {tuple(semantic.shape)}")
    if _min(semantic) < 0 or _max(semantic) >= num_classes:
        raise ValueError(f"one_hot: values must be in 0..{num_classes - 1}, got {_min(semantic)}..{_max(semantic)}")
    if _is_tensor(semantic):
        import torch

        encoded = torch.nn.functional.one_hot(semantic.long(), num_classes)  # (..., H, W, C)
        return encoded.movedim(-1, -3).float()
    semantic = np.asarray(semantic)
    classes = np.arange(num_classes).reshape((num_classes, 1, 1))
    return (semantic[..., None, :, :] == classes).astype(np.float32)


def black_outside_field(image: Any, onehot: Any) -> Any:
    """``image`` (B, 1, S, S) with every pixel outside the map's lung field (background class) set
    to 0: what a segmenter trained on lung-masked slices (``data.lung_handling: mask``) sees."""
    return image * (1 - onehot[:, BACKGROUND : BACKGROUND + 1])


def from_lungmask_labels(labels: Any) -> Any:
    """lungmask's lung labels (1 = right, 2 = left) -> ours (1 = left, 2 = right); 0 stays 0.

    numpy in -> uint8 out, torch in -> same dtype out. Values other than 0, 1, 2 (e.g. a lobe
    model's 1..5) raise ValueError: only the two-lung models R231/R231CovidWeb are meant here.
    """
    if _min(labels) < 0 or _max(labels) > 2:
        raise ValueError(
            f"from_lungmask_labels: expected lungmask R231 labels 0..2, got {_min(labels)}..{_max(labels)}"
            " (lobe models are not supported)"
        )
    if _is_tensor(labels):
        out = labels.clone()
        out[labels == LUNGMASK_RIGHT] = RIGHT_LUNG
        out[labels == LUNGMASK_LEFT] = LEFT_LUNG
        return out
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.uint8)
    out[labels == LUNGMASK_RIGHT] = RIGHT_LUNG
    out[labels == LUNGMASK_LEFT] = LEFT_LUNG
    return out


__all__ = [
    "BACKGROUND",
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "INFECTION",
    "VESSEL",
    "NUM_CLASSES",
    "map_classes",
    "CLASS_NAMES",
    "semantic_map",
    "class_map_at",
    "one_hot",
    "black_outside_field",
    "from_lungmask_labels",
]
