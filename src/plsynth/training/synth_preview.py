"""Pictures of what the synthesizer draws: the preview gallery and the tiles of the training grid.

Gallery (``plsynth synth preview``, the paper's Fig. 7 idea): one row per labeled slice,
columns: map | drawn image | map with the infection removed | its image | map with the
infection moved elsewhere in the lungs | its image. The three images of a row share the
pool draw and the noise (same seed), so they differ only where the map was edited.

Map colours: background black, patient-left lung blue, patient-right lung green, infection red,
vessel yellow.
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

PALETTE = np.array([[0, 0, 0], [60, 110, 210], [60, 170, 90], [230, 50, 40], [250, 220, 90]],
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


def draw_variants(synth, infections: np.ndarray, lung: np.ndarray, image: np.ndarray | None, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Draw maps of one slice that differ only in their infection (e.g. as given, removed, moved),
    with one pool draw and one noise for all, so the images differ only where the maps do.

    infections (V, H, W), the first as the slice has it; lung (H, W); image (H, W) in [0, 1], the
    slice a vessel synthesizer reads them from. Inside the slice's own infection they are not read
    on the other maps (what the slice shows there is the lesion, whose reticulation would read as
    vessels): those maps get plain lung there.
    Returns (maps (V, S, S) as drawn, images (V, H, W) in [0, 1]).
    """
    from plsynth.data.semantic import VESSEL, one_hot

    v, (h, w) = len(infections), lung.shape
    lung_t = torch.from_numpy(np.stack([lung] * v).astype(np.int64))
    images = None if image is None else torch.from_numpy(np.stack([image] * v).astype(np.float32)[:, None])
    onehot, style = synth.condition(torch.from_numpy(np.asarray(infections, np.float32)[:, None]), lung_t, images,
                                    torch.Generator().manual_seed(seed))
    semantic = onehot.argmax(1)
    if onehot.shape[1] > VESSEL:
        s = semantic.shape[-1]
        new, side = (F.interpolate(torch.from_numpy(np.asarray(a, np.float32))[:, None], size=(s, s),
                                   mode="nearest")[:, 0] for a in (infections, lung[None]))
        # the old lesion outside each map's own: lung
        semantic = torch.where((new[:1] > 0) & (new == 0), side.long(), semantic)
        onehot = one_hot(semantic, onehot.shape[1])
    drawn = synth.decode(onehot, style, noise_seed=seed)
    if tuple(drawn.shape[-2:]) != (h, w):
        drawn = F.interpolate(drawn, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    return semantic.numpy(), drawn[:, 0].numpy()


def preview_rows(synth, lung: np.ndarray, infection: np.ndarray, seed: int,
                 image: np.ndarray | None = None) -> list[np.ndarray]:
    """One gallery row for a slice: three maps (as given, infection removed, moved) and their images.

    ``image`` (H, W) in [0, 1] is the slice the maps belong to (a vessel synthesizer reads its
    vessels from it); each map is shown as it was drawn (:func:`draw_variants`).
    """
    rng = np.random.default_rng(seed)
    variants = np.stack([infection.astype(np.uint8), np.zeros_like(infection, dtype=np.uint8),
                         move_infection(infection, lung, rng)])
    maps, drawn = draw_variants(synth, variants, lung, image, seed)
    return [tile for m, d in zip(maps, drawn) for tile in (colorize_map(m), gray_to_rgb(d))]


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
