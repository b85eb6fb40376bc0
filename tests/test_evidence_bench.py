"""bench/semiseg_evidence.py's realism figures on images whose answer is known."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from semiseg_evidence import fine_texture, grid_share  # noqa: E402


def _blobs(seed: int, size: int = 128) -> np.ndarray:
    """Smooth round blobs plus noise: content with no preferred direction."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(0, 0.05, (size, size))
    for _ in range(12):
        cy, cx, r = rng.uniform(20, size - 20, 2).tolist() + [rng.uniform(4, 15)]
        image += ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) * rng.uniform(0.2, 0.8)
    return image


def test_grid_lines_and_a_frame_raise_the_grid_share_and_round_content_keeps_it_low():
    clean = np.stack([_blobs(s) for s in range(4)])
    gridded = clean.copy()
    gridded[:, ::8, :] += 0.3  # full-width rows every 8 pixels
    gridded[:, :, ::8] += 0.3
    framed = clean.copy()
    framed[:, :3, :] = framed[:, -3:, :] = framed[:, :, :3] = framed[:, :, -3:] = -1
    base = grid_share(clean)
    assert base < 0.05
    assert grid_share(gridded) > 5 * base
    assert grid_share(framed) > 3 * base


def test_fine_texture_is_near_zero_on_flat_regions_and_grows_with_detail_inside_the_mask():
    size = 64
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - 32) ** 2 + (xx - 32) ** 2 < 20**2)[None]
    flat = np.where(mask, 0.4, 0.9)  # one grey disc: only its edge has detail, and the inset drops it
    rng = np.random.default_rng(0)
    textured = flat + mask * rng.normal(0, 0.05, (1, size, size))
    shaded = flat + mask * (xx / size * 0.3)[None]  # a smooth ramp is shading, not texture
    assert fine_texture(flat, mask) < 1e-3
    assert fine_texture(textured, mask) > 20 * max(fine_texture(flat, mask), 1e-4)
    assert fine_texture(shaded, mask) < 1e-3
    outside = np.where(mask, 0.4, 0.9 + rng.normal(0, 0.05, (1, size, size)))  # detail outside the mask is not counted
    assert fine_texture(outside, mask) < 1e-3
    assert np.isnan(fine_texture(flat, np.zeros_like(mask)))
