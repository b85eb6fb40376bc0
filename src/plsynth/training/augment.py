"""Random flips and rotations applied jointly to images, lung masks and labels (torch ops).

One affine transform per sample (``affine_grid``/``grid_sample``): images are resampled
bilinearly, masks by nearest neighbour, so labels stay binary and lungs stay {0, 1, 2}.
Outside the rotated field everything is 0 (air after the HU window, background in masks).

Lung labels name the patient's side and the project puts the patient's left at the larger
column index (radiological view). A horizontal flip moves each lung to the other side of the
image, so it swaps labels 1 and 2 to keep that convention true for the synthesizer, which has
learned "class 1 sits on the image's right". A vertical flip leaves left and right in place.
Slices whose lungs lie one above the other (COVID-SemiSeg as read) need the flip along rows
instead: ``flip_across_lungs``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_transforms(
    n: int,
    generator: torch.Generator,
    flip: bool = True,
    rotate_degrees: float = 0.0,
    scale: float = 0.0,
    vflip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw per-sample transforms: ``theta`` (n, 2, 3) for affine_grid and ``hflip`` (n,) bool.

    Each flip (horizontal; vertical too when ``vflip``) happens with probability 0.5 when
    ``flip``; the angle is uniform in [-rotate_degrees, rotate_degrees]; the zoom is uniform in
    [1 - scale, 1 + scale] (drawn after the rest, so ``scale=0`` draws what it always drew).
    """
    u = torch.rand(n, 3, generator=generator)
    hflip = (u[:, 0] < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    vflip_ = (u[:, 1] < 0.5) if flip and vflip else torch.zeros(n, dtype=torch.bool)
    angle = (2.0 * u[:, 2] - 1.0) * math.radians(rotate_degrees)
    zoom = 1.0 + (2.0 * torch.rand(n, generator=generator) - 1.0) * scale if scale else torch.ones(n)
    sx = (1.0 - 2.0 * hflip.float()) / zoom
    sy = (1.0 - 2.0 * vflip_.float()) / zoom
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    # theta maps output coordinates to input coordinates: R(angle) @ diag(sx, sy).
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    return theta, hflip


def flip_across_lungs(theta: torch.Tensor, hflip: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
    """Turn each horizontal flip of ``theta`` into a flip along the axis that separates the lungs.

    Where the two lungs lie one above the other (COVID-SemiSeg's slices arrive so), a column
    flip would mirror front and back, and swapping the lung labels would then be wrong; a row
    flip (with the same rotation) mirrors left and right there, so ``apply_transforms``' swap is
    right again. Decided per sample from the lung labels' centroids; slices without both lungs
    keep the horizontal flip.
    """
    rows, cols = torch.meshgrid(torch.arange(lung.shape[-2]), torch.arange(lung.shape[-1]), indexing="ij")
    left, right = (lung == 1).float(), (lung == 2).float()

    def centroid(mask: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return (mask * grid).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)

    dy = centroid(left, rows) - centroid(right, rows)
    dx = centroid(left, cols) - centroid(right, cols)
    stacked = (dy.abs() > dx.abs()) & hflip & (left.sum((1, 2)) > 0) & (right.sum((1, 2)) > 0)
    theta = theta.clone()
    theta[stacked, :, :2] *= -1  # R diag(-1, 1) -> R diag(1, -1): a 180-degree turn of the same flip
    return theta


def invert_transforms(theta: torch.Tensor) -> torch.Tensor:
    """The transforms that undo ``theta`` (same ``hflip``: a flip undone swaps the lungs back)."""
    inverse = torch.zeros_like(theta)
    inverse[:, :, :2] = torch.linalg.inv(theta[:, :, :2])
    return inverse


def jitter_intensity(image: torch.Tensor, generator: torch.Generator, amount: float) -> torch.Tensor:
    """Per-sample contrast and brightness jitter of images in [0, 1]: ``x * (1 + a) + b``, a, b in +-amount."""
    if not amount:
        return image
    a, b = ((2.0 * torch.rand(2, image.shape[0], generator=generator) - 1.0) * amount).view(2, -1, 1, 1, 1)
    return (image * (1.0 + a.to(image)) + b.to(image)).clamp(0.0, 1.0)


def apply_transforms(
    theta: torch.Tensor,
    hflip: torch.Tensor,
    image: torch.Tensor,
    lung: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Apply transforms from `random_transforms`.

    image: (B, C, H, W) float (C > 1 moves several images of one slice together, e.g. a real
    unlabeled slice and its synthetic twin); lung: (B, H, W) integer; label: (B, 1, H, W) float.
    Returns tensors of the same shapes and dtypes.
    """
    theta = theta.to(device=image.device, dtype=image.dtype)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    out_image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_lung = out_label = None
    if lung is not None:
        moved = F.grid_sample(lung[:, None].to(image.dtype), grid, mode="nearest", align_corners=False)
        moved = moved[:, 0].round().to(lung.dtype)
        swap = hflip.to(lung.device)[:, None, None]
        swapped = torch.where(moved == 1, torch.full_like(moved, 2), torch.where(moved == 2, torch.ones_like(moved), moved))
        out_lung = torch.where(swap, swapped, moved)
    if label is not None:
        out_label = F.grid_sample(label.to(image.dtype), grid, mode="nearest", align_corners=False).to(label.dtype)
    return out_image, out_lung, out_label


def augment(
    image: torch.Tensor,
    lung: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
    flip: bool = True,
    rotate_degrees: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Randomly flip and rotate a batch jointly; identity (no resampling) when both are off."""
    if not flip and rotate_degrees == 0.0:
        return image, lung, label
    theta, hflip = random_transforms(image.shape[0], generator, flip, rotate_degrees)
    return apply_transforms(theta, hflip, image, lung, label)
