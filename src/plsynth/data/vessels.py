"""The lung's vessels and the chest wall, read from the slice itself: the synthesizer's 5th and
6th map classes.

Neither the labels nor the pseudo-labels say where the vessels are, so a generator trained on
4-class maps with a pixel L1 averages them away and draws flat lungs. Every slice the trainers
synthesize from has its image (SA-CPS / SA-ST draw from unlabeled slices), so the vessel map can
be read from that image: bright, thin structures on dark parenchyma.

Method (grey-scale morphology, as classic lung-vessel pre-segmentation): white top-hat (image
minus its opening) with a square of ``kernel`` pixels. A pixel is vessel when
- it lies in the lung at least ``margin`` pixels from the field's border (the field takes in a rim
  of chest wall, whose curved edge the top-hat also finds);
- its opening (the local background) is darker than the level ``background`` of the way from the
  slice's lung (median over the field) to its body (median of what is brighter outside the
  field): parenchyma, not chest wall, mediastinum or consolidation, on bright and on
  dark-windowed slices alike;
- its top-hat exceeds the slice's own threshold, median + ``mads`` robust deviations of the
  top-hat over that region, and at least ``floor`` (windowed 8-bit slices differ in brightness
  and noise, so no fixed threshold fits all).
The defaults are for 128 px slices of a 512 px chest CT (vessels 1-4 px wide); ``kernel`` and
``margin`` scale with the slice size. Torch only (batched, on the caller's device).

The chest wall (:func:`wall_mask`) is the rest of the same split: the lung field of a tight crop
takes in a rim of chest wall and mediastinal border, which the 4-class map calls lung, so a
generator has nothing to draw it from. A field pixel is wall when its opening is brighter than
that same level; vessels, whose opening is darker, are never wall.

Inside the infection (``infection`` given, ``synth.infection_vessels``): ground glass is hazy
lung through which the vessels still show, but its pixels sit above the lung's threshold and a
consolidation's opening above the level, so the lung's rule finds either too many or none there.
There a pixel is vessel when its top-hat exceeds the infection's own threshold (median + ``mads``
robust deviations over the slice's infection in the field, at least ``floor``), at any level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_SIZE = 128  # the slice size the pixel defaults below are for


def _erode(x: torch.Tensor, k: int) -> torch.Tensor:
    return -F.max_pool2d(-x, k, 1, k // 2)


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x, k, 1, k // 2)


def _kernel(pixels: int, size: int) -> int:
    """An odd square side of ``pixels`` at 128 px, scaled to slices ``size`` px wide (at least 3)."""
    return max(3, int(round(pixels * size / REFERENCE_SIZE)) | 1)


def closing(mask: torch.Tensor, kernel: int = 5) -> torch.Tensor:
    """Grey closing of (B, 1, H, W) with a square of ``kernel`` px at 128 px (scaled to the size):
    fills holes narrower than it, e.g. the vessels drawn through an infection."""
    k = _kernel(kernel, mask.shape[-1])
    return _erode(_dilate(mask, k), k)


def _median(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Per-slice median of x (B, H, W) over where (B, H, W); NaN where a slice has none."""
    return torch.where(where, x, torch.full_like(x, float("nan"))).flatten(1).nanmedian(dim=1).values


def _above_own_threshold(tophat: torch.Tensor, region: torch.Tensor, mads: float, floor: float) -> torch.Tensor:
    """region & top-hat above the region's own median + ``mads`` robust deviations (>= floor), per slice."""
    median = _median(tophat, region)
    spread = 1.4826 * _median((tophat - median[:, None, None]).abs(), region)
    threshold = torch.clamp(median + mads * spread, min=floor).nan_to_num(nan=float("inf"))
    return region & (tophat > threshold[:, None, None])


def slice_classes(image: torch.Tensor, lung: torch.Tensor, wall: bool = False, infection: torch.Tensor | None = None,
                  *, kernel: int = 5, margin: int = 2, background: float = 0.5, mads: float = 3.0, floor: float = 0.03
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(vessels, chest wall or None), each (B, H, W) bool, of images (B, 1, H, W) in [0, 1] inside
    lung maps (B, H, W) (> 0 = lung), from one opening and one pair of levels (the map's hot path).
    With ``infection`` (B, H, W) bool, vessels inside it follow the infection's own threshold."""
    if image.ndim != 4 or image.shape[1] != 1 or lung.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"slice_classes: image (B, 1, H, W) and lung (B, H, W) expected, got "
                         f"{tuple(image.shape)} and {tuple(lung.shape)}")
    k = _kernel(kernel, image.shape[-1])
    m = max(0, int(round(margin * image.shape[-1] / REFERENCE_SIZE)))
    x = image.float()
    opened = _dilate(_erode(x, k), k)
    field = lung > 0
    # the slice's own levels: its lung, and the body around it (what outside the field is brighter)
    lung_level = _median(x[:, 0], field)
    body_level = _median(x[:, 0], ~field & (x[:, 0] > lung_level[:, None, None]))
    level = (lung_level + background * (body_level - lung_level)).nan_to_num(nan=float("inf"))[:, None, None]
    # no body: no limit for vessels, no wall
    chest_wall = field & (opened[:, 0] > level) if wall else None
    tophat = (x - opened)[:, 0]
    region = field
    if m:
        region = _erode(field.float()[:, None], 2 * m + 1)[:, 0] > 0.5
    if infection is None:
        return _above_own_threshold(tophat, region & (opened[:, 0] < level), mads, floor), chest_wall
    infection = infection.bool()
    lung_vessels = _above_own_threshold(tophat, region & ~infection & (opened[:, 0] < level), mads, floor)
    return lung_vessels | _above_own_threshold(tophat, region & infection, mads, floor), chest_wall


def vessel_mask(image: torch.Tensor, lung: torch.Tensor, **rule) -> torch.Tensor:
    """Vessels (B, H, W) bool (:func:`slice_classes`)."""
    return slice_classes(image, lung, **rule)[0]


def wall_mask(image: torch.Tensor, lung: torch.Tensor, **rule) -> torch.Tensor:
    """Chest wall (B, H, W) bool inside the lung field: field pixels whose opening (vessels
    removed) is brighter than the vessel rule's level; a slice with no body outside the field has
    none (:func:`slice_classes`)."""
    return slice_classes(image, lung, wall=True, **rule)[1]


__all__ = ["closing", "slice_classes", "vessel_mask", "wall_mask"]
