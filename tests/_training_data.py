"""Tiny in-test training data for the method tests: ellipse lungs with infection blobs at 32 px.

Made here (not downloaded) so the tests run in seconds; the fake synthesizer stands in for a
trained SEAN bundle, which cannot be trained inside a unit test's time budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch


def slice_item(rng: np.random.Generator, size: int, case: str, index: int, labeled: bool) -> dict:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = size / 2 + rng.uniform(-1.5, 1.5)
    ry, rx = size * 0.32, size * 0.16
    lung = np.zeros((size, size), np.int64)
    right = ((yy - cy) / ry) ** 2 + ((xx - size * 0.3) / rx) ** 2 <= 1  # image left = patient right
    left = ((yy - cy) / ry) ** 2 + ((xx - size * 0.7) / rx) ** 2 <= 1
    lung[right], lung[left] = 2, 1
    infection = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        side = left if rng.random() < 0.5 else right
        ys, xs = np.nonzero(side)
        k = int(rng.integers(len(ys)))
        r = rng.uniform(2.5, 4.5)
        infection[((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2 <= r * r) & (lung > 0)] = 1.0
    image = np.where(lung > 0, 0.12, 0.55).astype(np.float32)
    image[infection > 0] = 0.45
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    item = {"image": np.clip(image, 0, 1)[None], "lung": lung, "case": case, "index": index}
    if labeled:
        item["label"] = infection[None]
    return item


@dataclass
class ValCase:
    name: str
    image: np.ndarray  # (Z, 1, S, S)
    lung: np.ndarray
    label: np.ndarray  # (Z, S, S)
    spacing: tuple | None = None


def tiny_splits(n_labeled: int = 6, n_unlabeled: int = 12, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    labeled = [slice_item(rng, size, f"L{i}", i, True) for i in range(n_labeled)]
    unlabeled = [slice_item(rng, size, f"U{i}", i, True) for i in range(n_unlabeled)]
    for item in unlabeled:
        item["truth"] = item.pop("label")  # kept only so tests can score pseudo-labels
    val = [
        ValCase(f"L{i}", it["image"][None], it["lung"][None], it["label"], None) for i, it in enumerate(labeled)
    ]
    return SimpleNamespace(labeled=labeled, unlabeled=unlabeled, val=val, info={})


class FakeSynthesizer:
    """Stands in for a trained SEAN decoder: paints the semantic map's classes with fixed grey levels."""

    backend = "fake:test"
    bundle_sha256 = "0" * 64

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def synthesize(self, infection, lung, images=None, seed=None):
        from plsynth.data.semantic import semantic_map

        self.calls.append({"infection": infection.clone(), "lung": lung.clone(), "seed": seed})
        semantic = semantic_map(lung, (infection[:, 0] > 0.5).to(lung.dtype))
        g = torch.Generator().manual_seed(int(seed or 0) % 2**31)
        levels = torch.tensor([0.55, 0.12, 0.12, 0.45])
        out = levels[semantic.long()] + 0.02 * torch.randn(semantic.shape, generator=g)
        return out.clamp(0, 1)[:, None].float()
