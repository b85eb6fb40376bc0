"""The one slice preprocessing shared by training, evaluation and inference.

A volume reaches the network as ``to_model_input(to_unit(image), lung, size, lung_handling)``:
intensities in [0, 1] (see ``plsynth.data.window``), optionally zeroed outside the lung, each
axial slice resized to ``size x size``. Labels follow with ``resize_labels`` (nearest), and
predictions go back to the input's grid with ``to_input_grid`` (bilinear on probabilities,
then threshold), the inverse of the resize step. Using these three functions everywhere is
what keeps training, validation and ``plsynth-infer`` consistent.

Every function works in slabs of slices, so a 512 x 512 x 300 volume never needs more than
the input, the output and one slab of temporaries at a time.

Resizing is anisotropic when a slice is not square (``rows x columns -> size x size``), as the
paper resizes every slice to 512 x 512; ``to_input_grid`` undoes exactly that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LUNG_HANDLINGS = ("none", "mask")
SLAB = 32  # slices resized per torch call: bounds the temporaries to 32 slices


def _check_handling(lung_handling: str) -> None:
    if lung_handling not in LUNG_HANDLINGS:
        raise ValueError(f"lung_handling must be one of {LUNG_HANDLINGS}, got {lung_handling!r}")


def _resize_bilinear(slices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(n, y, x)`` float32 to ``(n, *shape)``; antialiased when shrinking.

    ``align_corners=False`` (pixel areas, not centres, are matched), so resizing there and back
    keeps the image registered; antialiasing on down-sizing avoids aliasing of thin structures.
    """
    if slices.shape[1:] == tuple(shape):
        return np.ascontiguousarray(slices, dtype=np.float32)
    import torch
    import torch.nn.functional as F

    shrink = slices.shape[1] > shape[0] or slices.shape[2] > shape[1]
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]
        out = F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0].numpy()


def to_model_input(unit: np.ndarray, lung: np.ndarray, size: int, lung_handling: str) -> np.ndarray:
    """Network input ``(Z, 1, size, size)`` float32 in [0, 1] from a windowed volume.

    ``unit``: ``(Z, Y, X)`` float32 in [0, 1] (``window.to_unit``); ``lung``: ``(Z, Y, X)``
    labels (0 background, 1 left, 2 right lung). ``lung_handling``: ``"mask"`` zeroes pixels
    outside the lung (``lung == 0``) *before* resizing, as the paper's inputs are black outside
    the lungs; ``"none"`` leaves the image as it is. A 2D slice is a volume with ``Z = 1``.
    """
    _check_handling(lung_handling)
    unit = np.asarray(unit)
    lung = np.asarray(lung)
    if unit.ndim != 3:
        raise ValueError(f"image must be (Z, Y, X), got shape {unit.shape}")
    if lung.shape != unit.shape:
        raise ValueError(f"lung mask shape {lung.shape} differs from image shape {unit.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    out = np.empty((unit.shape[0], 1, size, size), dtype=np.float32)
    for start in range(0, unit.shape[0], SLAB):
        slab = np.asarray(unit[start : start + SLAB], dtype=np.float32)
        if lung_handling == "mask":
            slab = np.where(lung[start : start + SLAB] > 0, slab, np.float32(0.0))
        out[start : start + SLAB, 0] = _resize_bilinear(slab, (size, size))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest resizing, pixel centres matched.

    Output pixel ``i`` covers ``[i, i+1) * n_in / n_out`` of the input; its centre falls in
    input pixel ``floor((i + 0.5) * n_in / n_out)`` (torch's ``nearest-exact``, PIL's NEAREST).
    """
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resize_labels(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest resize of integer labels ``(Z, Y, X)`` to ``(Z, size, size)``, dtype kept.

    Nearest keeps the label set (no blended values between 1 and 2). Inverse for masks:
    ``resize_labels``-style nearest back to ``(Y, X)`` is lossy; predictions should instead go
    back as probabilities through ``to_input_grid`` and be thresholded on the input grid.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X), got shape {mask.shape}")
    if np.issubdtype(mask.dtype, np.floating):
        raise ValueError(f"labels must be integers, got dtype {mask.dtype}")
    iy = _nearest_index(mask.shape[1], size)
    ix = _nearest_index(mask.shape[2], size)
    out = np.empty((mask.shape[0], size, size), dtype=mask.dtype)
    for start in range(0, mask.shape[0], SLAB):
        out[start : start + SLAB] = np.asarray(mask[start : start + SLAB])[:, iy][:, :, ix]
    return out


def to_input_grid(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of the resize in ``to_model_input``: ``(Z, size, size)`` -> ``(Z, Y, X)`` float32.

    Bilinear with ``align_corners=False`` (antialiased when the input grid is smaller than the
    model's), applied to probabilities, which are then thresholded on the input grid; this
    gives smoother, better-registered masks than resizing a thresholded mask with nearest.
    Lung masking is not undone (nothing to undo: masked pixels simply had no image content).
    """
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"probabilities must be (Z, size, size), got shape {prob.shape}")
    shape = (int(shape[0]), int(shape[1]))
    out = np.empty((prob.shape[0], *shape), dtype=np.float32)
    for start in range(0, prob.shape[0], SLAB):
        out[start : start + SLAB] = _resize_bilinear(np.asarray(prob[start : start + SLAB], dtype=np.float32), shape)
    return out


def lung_boxes(lung: np.ndarray, size: int, margin: int, multiple: int) -> np.ndarray:
    """Per-slice lung bounding boxes on the model's ``size x size`` grid: ``(Z, 4)`` int (y0, y1, x0, x1).

    The network is fully convolutional, so it can run on the box cut from the resized frame
    instead of the whole frame: same pixel scale, fewer pixels. Each box covers the slice's
    ``lung > 0`` (mapped through the same resize as ``to_model_input``) plus ``margin`` model
    pixels, is grown to a multiple of ``multiple`` (the U-Net needs ``2**depth``) and kept inside
    the frame. A slice without lung gets an empty box (y0 == y1).
    """
    lung = np.asarray(lung)
    if lung.ndim != 3:
        raise ValueError(f"lung must be (Z, Y, X), got shape {lung.shape}")
    if size % multiple:
        raise ValueError(f"size {size} is not a multiple of {multiple}")
    z, ny, nx = lung.shape
    boxes = np.zeros((z, 4), np.int64)
    rows, cols = lung.any(axis=2), lung.any(axis=1)
    for i in np.flatnonzero(rows.any(axis=1)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        for axis, (lo, hi, n) in enumerate(((ys[0], ys[-1] + 1, ny), (xs[0], xs[-1] + 1, nx))):
            start = max(0, int(np.floor(lo * size / n)) - margin)
            stop = min(size, int(np.ceil(hi * size / n)) + margin)
            length = -(-(stop - start) // multiple) * multiple
            boxes[i, 2 * axis : 2 * axis + 2] = grow_box(start, stop, size, length)
    return boxes


def volume_box(lung: np.ndarray, size: int, margin: int, multiple: int) -> np.ndarray:
    """One lung box for a whole volume ``(Z, Y, X)``: ``(4,)`` int (y0, y1, x0, x1) on the model grid.

    The `lung_boxes` of the union of its slices' lungs (all zeros without lung). plsynth-infer and
    validation run every slice of a volume on this box: training grows each slice's box to its
    batch's largest (`box_corners`: slices of other levels and volumes), so a network trained on
    lung boxes is used to context beyond its own slice's box; measured, the volume's box gives it
    back its accuracy, the slice's own tight box does not (BENCHMARKS.md, issue 16).
    """
    return lung_boxes(np.asarray(lung).any(axis=0)[None], size, margin, multiple)[0]


def grow_box(start: int, stop: int, size: int, length: int) -> tuple[int, int]:
    """[start, stop) grown evenly on both sides to ``length`` (>= stop - start), kept in [0, size)."""
    if stop <= start:  # an empty box (no lung): centred
        start = stop = size // 2
    start = max(0, min(start - (length - (stop - start)) // 2, size - length))
    return start, start + length


def box_corners(boxes: np.ndarray, size: int, multiple: int) -> tuple[np.ndarray, int, int]:
    """One crop size for a batch: ``(corners (b, 2) y0, x0; h; w)``.

    Every box is grown to the batch's largest height and width (more context, never less) and
    kept inside the ``size x size`` frame: a training step's slices, which share one forward pass.
    """
    boxes = np.asarray(boxes)
    h = max(multiple, int((boxes[:, 1] - boxes[:, 0]).max()))
    w = max(multiple, int((boxes[:, 3] - boxes[:, 2]).max()))
    corners = [(grow_box(y0, y1, size, h)[0], grow_box(x0, x1, size, w)[0]) for y0, y1, x0, x1 in boxes]
    return np.array(corners, np.int64).reshape(-1, 2), h, w


def crop_at(frames: Any, corners: np.ndarray, h: int, w: int) -> Any:
    """``frames[i, ..., y0:y0+h, x0:x0+w]`` stacked (numpy or torch; spatial axes last)."""
    crops = [frames[i, ..., y0 : y0 + h, x0 : x0 + w] for i, (y0, x0) in enumerate(corners)]
    if isinstance(frames, np.ndarray):
        return np.stack(crops)
    import torch

    return torch.stack(crops)


def paste_at(crops: Any, corners: np.ndarray, size: int, fill: float = 0.0) -> Any:
    """Inverse of `crop_at`: frames ``(..., size, size)`` holding each crop at its corner, ``fill`` elsewhere."""
    h, w = crops.shape[-2:]
    shape = (*crops.shape[:-2], size, size)
    if isinstance(crops, np.ndarray):
        out = np.full(shape, fill, crops.dtype)
    else:
        import torch

        out = torch.full(shape, fill, dtype=crops.dtype, device=crops.device)
    for i, (y0, x0) in enumerate(corners):
        out[i, ..., y0 : y0 + h, x0 : x0 + w] = crops[i]
    return out


OUTSIDE_BOX_LOGIT = -30.0  # what a network run on lung boxes answers outside its box: probability ~1e-13


@dataclass(frozen=True)
class FieldOfView:
    """What a network is run on: whole frames (``lung_box`` None) or lung boxes with that margin."""

    lung_box: int | None = None
    multiple: int = 16  # 2 ** model.depth: what box sides are rounded up to

    @classmethod
    def of(cls, cfg: Any) -> FieldOfView:
        """The field of view a config trains (``data.lung_box``, ``model.depth``)."""
        return cls(cfg.data.lung_box, 2 ** int(cfg.model.depth))

    def batch_corners(self, lung: np.ndarray) -> tuple[np.ndarray, int, int]:
        """`box_corners` of the slices' `lung_boxes` (``lung`` (b, S, S) on the model grid): one size per batch."""
        size = int(lung.shape[-1])
        return box_corners(lung_boxes(lung, size, self.lung_box, self.multiple), size, self.multiple)


def run_on_lung_boxes(run: Any, frames: Any, lung: Any, view: FieldOfView) -> Any:
    """Logits ``(b, 1, S, S)`` of ``run`` on ``frames`` ``(b, 1, S, S)``, each cut to its lung box.

    ``lung`` ``(b, S, S)`` on the frames' grid. Whole frames with ``view.lung_box`` None (networks
    trained on whole frames); otherwise each slice's `lung_boxes` with that margin, one size per
    call (`box_corners`), and `OUTSIDE_BOX_LOGIT` outside the box.
    """
    if view.lung_box is None:
        return run(frames)
    corners, h, w = view.batch_corners(lung.cpu().numpy() if hasattr(lung, "cpu") else np.asarray(lung))
    return paste_at(run(crop_at(frames, corners, h, w)), corners, int(frames.shape[-1]), OUTSIDE_BOX_LOGIT)
