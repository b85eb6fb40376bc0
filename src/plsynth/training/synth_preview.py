"""Pictures of what the synthesizer draws: the preview gallery and the tiles of the training grid.

Gallery (``plsynth synth preview``, the paper's Fig. 7 idea): one row per labeled slice,
columns: map | drawn image | map with the infection removed | its image | map with the
infection moved elsewhere in the lungs | its image. The three images of a row share the
pool draw and the noise (same seed), so they differ only where the map was edited.

Map colours: background black, patient-left lung blue, patient-right lung green, infection red,
vessel yellow, chest wall grey.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plsynth.atomic import atomic_write
from plsynth.config import Config

log = logging.getLogger(__name__)

PALETTE = np.array([[0, 0, 0], [60, 110, 210], [60, 170, 90], [230, 50, 40], [250, 220, 90], [150, 150, 150]],
                   dtype=np.uint8)


def colorize_map(semantic: np.ndarray) -> np.ndarray:
    """(H, W) classes 0..5 (``plsynth.data.semantic``) -> (H, W, 3) uint8 RGB."""
    return PALETTE[np.clip(np.asarray(semantic, dtype=np.int64), 0, len(PALETTE) - 1)]


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8."""
    g = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def save_grid(rows: list[list[np.ndarray]], path: Path, gap: int = 2) -> Path:
    """Tile equally sized (H, W, 3) uint8 tiles into a PNG with a white gap (written atomically)."""
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = tile
    with atomic_write(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def move_infection(infection: np.ndarray, lung: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The infection mirrored to the other side and kept inside the lungs; a disk when that is empty.

    Mirroring left-right (x -> W - 1 - x) puts a lesion of one lung into the other lung at the
    same height, a plausible edit that keeps its shape. Without any infection (or if the mirror
    misses the lungs) a disk of radius ~W/16 is placed at a random lung pixel.
    """
    lungs = lung > 0
    moved = infection[:, ::-1].copy() & lungs
    if moved.sum() >= max(4, infection.sum() // 4):
        return moved.astype(np.uint8)
    ys, xs = np.nonzero(lungs)
    if len(ys) == 0:
        return np.zeros_like(infection, dtype=np.uint8)
    k = rng.integers(len(ys))
    r = max(2, lung.shape[1] // 16)
    yy, xx = np.mgrid[: lung.shape[0], : lung.shape[1]]
    return ((((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) <= r * r) & lungs).astype(np.uint8)


def heal_infection(image: np.ndarray, infection: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """The slice with its infection filled with its infection-free lung level (median over the field).

    A synthesizer that reads vessels and chest wall from the slice would otherwise find them in
    the old lesion of a map whose infection was removed or moved: a consolidation's bright opening
    reads as chest wall, its reticulation as vessels. Maps edited away from their slice's
    infection are read from this slice instead.
    """
    lesion = np.asarray(infection) > 0
    clear = (np.asarray(lung) > 0) & ~lesion
    if not lesion.any() or not clear.any():
        return np.asarray(image)
    healed = np.array(image, copy=True)
    healed[lesion] = np.median(healed[clear])
    return healed


def preview_rows(synth, lung: np.ndarray, infection: np.ndarray, seed: int,
                 image: np.ndarray | None = None) -> list[np.ndarray]:
    """One gallery row for a slice: three maps (as given, infection removed, moved) and their images.

    ``image`` (H, W) in [0, 1] is the slice the maps belong to (a vessel synthesizer reads its
    vessels from it, from :func:`heal_infection`'s slice for the edited maps); each map is shown as
    the synthesizer built it (``LocalSynthesizer.semantic``).
    """
    rng = np.random.default_rng(seed)
    variants = [infection.astype(np.uint8), np.zeros_like(infection, dtype=np.uint8), move_infection(infection, lung, rng)]
    lung_t = torch.from_numpy(lung[None].astype(np.int64))
    tiles = []
    for k, inf in enumerate(variants):
        images = None
        if image is not None:
            given = image if k == 0 else heal_infection(image, infection, lung)
            images = torch.from_numpy(np.asarray(given, dtype=np.float32)[None, None])
        inf_t = torch.from_numpy(inf[None, None].astype(np.float32))
        drawn = synth.synthesize(inf_t, lung_t, images=images, seed=seed)
        tiles += [colorize_map(synth.semantic(inf_t, lung_t, images)[0].numpy()), gray_to_rgb(drawn[0, 0].numpy())]
    return tiles


def write_preview(bundle: Path, labeled, out: Path, n: int = 8, seed: int = 0, backend: str = "torch") -> Path:
    """Gallery of ``n`` labeled slices (those with infection first) drawn by ``bundle``."""
    from plsynth.synth_service.local import LocalSynthesizer

    synth = LocalSynthesizer(bundle, backend=backend, seed=seed)
    size = synth.image_size
    infected, clean = [], []
    for i in range(len(labeled)):
        (infected if float(labeled[i]["label"].sum()) > 0 else clean).append(i)
        if len(infected) >= n:
            break
    chosen = (infected + clean)[:n]
    if not chosen:
        raise ValueError("no labeled slices to preview")
    rows = []
    for row, i in enumerate(chosen):
        item = labeled[i]  # resized to the synthesizer's size: every tile of the grid has one size
        lung = torch.as_tensor(item["lung"]).float()[None, None]
        label = torch.as_tensor(item["label"]).float()[None]
        image = torch.as_tensor(item["image"]).float()[None]
        if lung.shape[-1] != size:
            lung, label = (F.interpolate(t, size=(size, size), mode="nearest") for t in (lung, label))
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        rows.append(preview_rows(synth, lung[0, 0].long().numpy(), (label[0, 0] > 0.5).numpy().astype(np.uint8),
                                 seed + row, image[0, 0].numpy()))
    log.info("preview of %d slices (%s) -> %s", len(rows), synth.backend, out)
    return save_grid(rows, Path(out))
