"""The real infection's fine texture, laid over the drawn infection (``synth.texture``).

At the CPU preset the generator draws the infection as a smooth grey blob: its fine texture
(mean |image - Gaussian blur, sigma 1 px|) is a third of the real one, and none of the GAN
changes tried raised it without losing faithfulness (BENCHMARKS.md, issue 11). This module
adds it from the data instead, the way CT simulation inserts measured noise: residual patches
(image - blur) from the interior of the labeled slices' infection are stored in the synthesizer
bundle, and a drawing gets a texture field tiled from random patches (rotated and flipped,
overlap-added with sqrt-Hann windows at half-patch hop, so the field keeps the patches'
variance and has no seams) inside its map's infection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from plsynth.data.semantic import INFECTION

PATCH = 12  # px at the synthesizer's size; the infection of a 128 px slice holds few larger squares
SIGMA = 1.0  # the Gaussian of the residual: the finest scale, the one the generator misses
STRIDE = 4  # patch sampling step inside the labeled slices
MAX_PATCHES = 2048


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from monai.networks.layers import GaussianFilter

    return GaussianFilter(2, sigma=sigma)(x)


def residual_patches(images: torch.Tensor, onehot: torch.Tensor, patch: int = PATCH, sigma: float = SIGMA,
                     stride: int = STRIDE, max_patches: int = MAX_PATCHES, seed: int = 0) -> torch.Tensor:
    """(M, patch, patch) residuals (image - blur) of every square lying wholly inside the
    infection eroded by 1 px (so no lesion border is taken for texture).

    images (N, 1, S, S) in [0, 1]; onehot (N, C, S, S) maps; at most ``max_patches`` kept (a
    seeded random subset)."""
    images = images.float()
    residual = images - _blur(images, sigma)
    inside = onehot[:, INFECTION : INFECTION + 1].float()
    inside = -F.max_pool2d(-inside, 3, stride=1, padding=1)  # erode by 1 px
    r = F.unfold(residual, patch, stride=stride)  # (N, P*P, L)
    m = F.unfold(inside, patch, stride=stride)
    keep = m.amin(1) > 0.5  # (N, L)
    patches = r.permute(0, 2, 1)[keep].reshape(-1, patch, patch)
    if len(patches) > max_patches:
        pick = torch.randperm(len(patches), generator=torch.Generator().manual_seed(seed))[:max_patches]
        patches = patches[pick.sort().values]
    return patches.contiguous()


def _window(patch: int) -> torch.Tensor:
    n = torch.arange(patch, dtype=torch.float32)
    w = torch.sin(math.pi * (n + 0.5) / patch)  # sqrt of a periodic Hann: w(n)^2 + w(n + P/2)^2 = 1
    return w[:, None] * w[None, :]


def texture_field(patches: torch.Tensor, batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 1, size, size) stationary texture: random bank patches, each turned by one of the
    8 rotations / flips, overlap-added at half-patch hop, cut at a random offset."""
    p = patches.shape[-1]
    hop = p // 2
    n = math.ceil((size + p) / hop) + 1  # patches per side: every output pixel under 2 x 2 of them
    out = (n - 1) * hop + p
    idx = torch.randint(len(patches), (batch * n * n,), generator=generator)
    turn = torch.randint(8, (batch * n * n,), generator=generator)
    offset = torch.randint(hop, (batch, 2), generator=generator)
    tiles = patches[idx]
    for t in range(1, 8):
        sel = turn == t
        if sel.any():
            turned = torch.rot90(tiles[sel], t % 4, dims=(1, 2))
            tiles[sel] = turned.flip(2) if t >= 4 else turned
    cols = (tiles * _window(p)).reshape(batch, n * n, p * p).permute(0, 2, 1)
    canvas = F.fold(cols, (out, out), p, stride=hop)  # (batch, 1, out, out)
    return torch.stack([canvas[b, :, hop + oy : hop + oy + size, hop + ox : hop + ox + size]
                        for b, (oy, ox) in enumerate(offset.tolist())])


def add_texture(images: torch.Tensor, onehot: torch.Tensor, patches: torch.Tensor, weight: float,
                generator: torch.Generator) -> torch.Tensor:
    """``images`` (B, 1, S, S) in [0, 1] with ``weight`` x a texture field added inside the map's
    infection (its edge softened over 1 px), clamped to [0, 1]; unchanged without patches or weight."""
    if weight <= 0 or len(patches) == 0:
        return images
    b, s = images.shape[0], images.shape[-1]
    field = texture_field(patches.float(), b, s, generator)
    where = F.avg_pool2d(onehot[:, INFECTION : INFECTION + 1].float(), 3, stride=1, padding=1,
                         count_include_pad=False)
    return (images + weight * where * field.to(images.device)).clamp(0, 1)


__all__ = ["PATCH", "SIGMA", "add_texture", "residual_patches", "texture_field"]
