"""bench/semiseg_evidence.py's realism figures on images whose answer is known."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from semiseg_evidence import grid_share  # noqa: E402


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
