"""The lung's vessels, read from the slice itself: the synthesizer's 5th map class.

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
  dark-windowed slices alike; a lung-masked slice (black just outside the field) has no body
  there, so the chest wall the field takes in stands for it, outside the field too;
- its top-hat exceeds the slice's own threshold, median + ``mads`` robust deviations of the
  top-hat over that region, and at least ``floor`` (windowed 8-bit slices differ in brightness
  and noise, so no fixed threshold fits all).
The defaults are for 128 px slices of a 512 px chest CT (vessels 1-4 px wide); ``kernel`` and
``margin`` scale with the slice size. Torch only (batched, on the caller's device).
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


def _median(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Per-slice median of x (B, H, W) over where (B, H, W); NaN where a slice has none."""
    return torch.where(where, x, torch.full_like(x, float("nan"))).flatten(1).nanmedian(dim=1).values


def _above_own_threshold(tophat: torch.Tensor, region: torch.Tensor, mads: float, floor: float) -> torch.Tensor:
    """region & top-hat above the region's own median + ``mads`` robust deviations (>= floor), per slice."""
    median = _median(tophat, region)
    spread = 1.4826 * _median((tophat - median[:, None, None]).abs(), region)
    threshold = torch.clamp(median + mads * spread, min=floor).nan_to_num(nan=float("inf"))
    return region & (tophat > threshold[:, None, None])


def vessel_mask(image: torch.Tensor, lung: torch.Tensor, *, kernel: int = 5, margin: int = 2,
                background: float = 0.5, mads: float = 3.0, floor: float = 0.03) -> torch.Tensor:
    """Vessels (B, H, W) bool of images (B, 1, H, W) in [0, 1] inside lung maps (B, H, W)
    (> 0 = lung), by the rule in the module docstring."""
    if image.ndim != 4 or image.shape[1] != 1 or lung.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"vessel_mask: image (B, 1, H, W) and lung (B, H, W) expected, got "
                         f"{tuple(image.shape)} and {tuple(lung.shape)}")
    k = _kernel(kernel, image.shape[-1])
    m = max(0, int(round(margin * image.shape[-1] / REFERENCE_SIZE)))
    x = image.float()
    field = lung > 0
    # the slice's own levels: its lung, and the body around it (what outside the field is brighter);
    # no body: no limit
    lung_level = _median(x[:, 0], field)
    body_level = _median(x[:, 0], ~field & (x[:, 0] > lung_level[:, None, None]))
    # a lung-masked slice (data.lung_handling: mask) is black just outside the field: its body is
    # the chest wall the field takes in (its outer rim, brighter than the lung), and stands outside
    # the field, so that the opening does not sink to black at the field's edge
    rim_px = _kernel(7, image.shape[-1])  # 3 px each side of the edge at 128 px
    ring = (_dilate(field.float()[:, None], rim_px)[:, 0] > 0.5) & ~field
    masked = ~(_median(x[:, 0], ring) > lung_level)
    if masked.any():
        rim = field & ~(_erode(field.float()[:, None], rim_px)[:, 0] > 0.5)
        wall = _median(x[:, 0], rim & (x[:, 0] > lung_level[:, None, None]))
        body_level = torch.where(masked, wall, body_level)
        outside = masked[:, None, None, None] & ~field[:, None]
        x = torch.where(outside, body_level.nan_to_num(nan=1.0)[:, None, None, None].expand_as(x), x)
    opened = _dilate(_erode(x, k), k)
    level = (lung_level + background * (body_level - lung_level)).nan_to_num(nan=float("inf"))[:, None, None]
    region = field
    if m:
        region = _erode(field.float()[:, None], 2 * m + 1)[:, 0] > 0.5
    return _above_own_threshold((x - opened)[:, 0], region & (opened[:, 0] < level), mads, floor)


__all__ = ["vessel_mask"]
