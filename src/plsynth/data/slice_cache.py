"""On-disk cache of preprocessed volumes, read back lazily through memory maps.

Preparing a volume (read, window, lung mask, resize) is slow (a lung model per slice), and a
thousand MosMedData volumes do not fit in RAM, so every volume is prepared once and stored as
``.npy`` files that datasets open with ``np.load(mmap_mode="r")``: memory stays flat however
many volumes a split holds, and the OS page cache does the rest.

Layout::

    <cache_root>/<config key>/<volume name>-<source key>/
        image.npy   (Z, 1, S, S) float32 in [0, 1]   to_model_input(to_unit(image), lung, S, handling)
        lung.npy    (Z, S, S) uint8 {0, 1, 2}          resize_labels(lung_field(image, lung_mask(image, backend)), S)
        label.npy   (Z, S, S) uint8 {0, 1}             resize_labels(infection > 0, S) (labeled files only)
        meta.json   written last: its presence marks a complete entry

"lung" is the lung field (lungs grown into the dense lung around them), the region that clips
pseudo-labels and predictions everywhere. The config key hashes everything that changes the
arrays (image size, HU window, intensity handling, lung backend, model and field algorithm, lung
handling, and ``PREPROCESS_VERSION``); the source key hashes the image and label
files' resolved paths, sizes and modification times, so an edited file is prepared again. Each
file is written under a temporary name and renamed, so an interrupted run never leaves a
half-written entry, and two processes preparing the same volume both end with the same files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plsynth.atomic import atomic_write_npy, atomic_write_text
from plsynth.config import DataConfig
from plsynth.data.layouts import VolumeRecord
from plsynth.data.lungs import lung_record
from plsynth.errors import InputError
from plsynth.hashing import json_digest, text_digest

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 2  # bump when preprocessing changes in a way the config key does not capture (2: lung masks)
ARRAYS = ("image", "lung", "label")


def config_key(data: DataConfig) -> str:
    """Hash of the preprocessing-relevant part of ``data`` (16 hex digits)."""
    relevant = {
        "version": PREPROCESS_VERSION,
        "image_size": data.image_size,
        "window_hu": [float(v) for v in data.window_hu],
        "lung_handling": data.lung_handling,
        "intensity": data.intensity,
        "lungs": lung_record(data.lung_backend, data.lungmask_model),
    }
    if data.lung_backend == "lungmask":
        relevant["lungmask_weights"] = data.lungmask_weights
    return json_digest(relevant)


def source_key(image: Path, label: Path | None) -> str:
    """Hash of the source files' resolved path, size and mtime (12 hex digits)."""
    parts = []
    for path in (image, label):
        if path is None:
            parts.append("-")
            continue
        try:
            stat = Path(path).stat()
        except OSError as exc:
            raise InputError(path, f"cannot read: {exc}") from exc
        parts.append(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return text_digest("\n".join(parts), 12)


@dataclass(frozen=True)
class CachedVolume:
    """A prepared volume on disk: small metadata in memory, arrays opened on demand as memmaps.

    ``spacing`` is the voxel size of the *prepared* grid in mm, ``(z, y * Y / S, x * X / S)``,
    or None for 2D slices; ``shape`` is the original in-plane ``(Y, X)``; ``lung_any[z]`` says
    whether slice z has any lung (what training uses to skip slices).
    """

    name: str
    folder: Path
    n_slices: int
    shape: tuple[int, int]
    spacing: tuple[float, float, float] | None
    source_spacing: tuple[float, float, float] | None
    lung_any: np.ndarray
    has_label: bool
    source: Path

    def open(self, array: str, mode: str = "r") -> np.ndarray:
        """The named array (``image``, ``lung`` or ``label``) as a memmap.

        ``mode="r"`` is read-only; ``"c"`` (copy-on-write) is writable in memory but never
        changes the file, which lets ``torch.as_tensor`` wrap it without a warning. Neither
        reads the array into RAM until its pages are touched.
        """
        if array not in ARRAYS or (array == "label" and not self.has_label):
            raise ValueError(f"{self.folder}: no {array!r} array (has_label={self.has_label})")
        if mode not in ("r", "c"):
            raise ValueError(f"mode must be 'r' or 'c', got {mode!r}")
        return np.load(self.folder / f"{array}.npy", mmap_mode=mode)


def read_label(path: Path, like_shape: tuple[int, ...]) -> np.ndarray:
    """Infection mask file -> uint8 0/1 of ``like_shape`` (NIfTI: any label > 0; 8-bit PNG: 0/255 or 0/1)."""
    from plsynth.data.io import read_image

    label = read_image(path)
    array = np.asarray(label.array)
    if array.shape != tuple(like_shape):
        raise InputError(path, f"mask shape {array.shape} differs from its image's {tuple(like_shape)}")
    threshold = 127.0 if label.kind == "uint8" and array.max() > 1 else 0.5
    return (array > threshold).astype(np.uint8)


def prepare_volume(record: VolumeRecord, data: DataConfig) -> dict:
    """Read and prepare one volume: ``{"image", "lung", "label" (or None), "meta"}`` arrays at size S.

    The single place that turns a file into training/evaluation arrays: ``to_unit`` with
    ``data.window_hu``, ``lung_mask`` with ``data.lung_backend``, ``to_model_input`` with
    ``data.lung_handling``, ``resize_labels`` for the lung and infection masks.
    """
    from plsynth.data.io import read_image
    from plsynth.data.lungs import lung_field, lung_mask
    from plsynth.data.preprocess import resize_labels, to_model_input
    from plsynth.data.window import to_unit

    image = read_image(record.image)
    size = data.image_size
    lung = lung_field(image, np.asarray(_lung_mask(lung_mask, image, data), dtype=np.uint8))
    if lung.shape != image.array.shape:
        raise InputError(record.image, f"lung mask shape {lung.shape} differs from the image's {image.array.shape}")
    label = read_label(record.label, image.array.shape) if record.label is not None else None
    unit = to_unit(image, data.window_hu, data.intensity, lung)
    prepared = to_model_input(unit, lung, size, data.lung_handling)
    del unit
    z, y, x = image.array.shape
    spacing = None
    if image.spacing is not None and not image.is_slice:
        spacing = (float(image.spacing[0]), float(image.spacing[1]) * y / size, float(image.spacing[2]) * x / size)
    lung_small = resize_labels(lung, size)
    meta = {
        "name": record.name,
        "source": str(record.image),
        "label_source": None if record.label is None else str(record.label),
        "n_slices": int(z),
        "shape": [int(y), int(x)],
        "spacing": None if spacing is None else list(spacing),
        "source_spacing": None if image.spacing is None else [float(v) for v in image.spacing],
        # From the full-resolution mask, so a lung sliver lost in resizing still counts.
        "lung_any": np.flatnonzero(lung.reshape(z, -1).any(axis=1)).tolist(),
        "has_label": label is not None,
        "infection_slices": None if label is None else int(label.reshape(z, -1).any(axis=1).sum()),
        "version": PREPROCESS_VERSION,
    }
    return {
        "image": prepared,
        "lung": lung_small,
        "label": None if label is None else resize_labels(label, size),
        "meta": meta,
    }


def _lung_mask(lung_mask, image, data: DataConfig) -> np.ndarray:
    """Call ``lung_mask`` with the config's backend (and lungmask model/weights where used)."""
    if data.lung_backend == "lungmask":
        return lung_mask(
            image, backend="lungmask", lungmask_model=data.lungmask_model, lungmask_weights=data.lungmask_weights or None
        )
    return lung_mask(image, backend=data.lung_backend)


def _from_meta(folder: Path, meta: dict) -> CachedVolume:
    z = int(meta["n_slices"])
    lung_any = np.zeros(z, dtype=bool)
    lung_any[np.asarray(meta["lung_any"], dtype=np.int64)] = True
    return CachedVolume(
        name=meta["name"],
        folder=folder,
        n_slices=z,
        shape=(int(meta["shape"][0]), int(meta["shape"][1])),
        spacing=None if meta["spacing"] is None else tuple(float(v) for v in meta["spacing"]),
        source_spacing=None if meta["source_spacing"] is None else tuple(float(v) for v in meta["source_spacing"]),
        lung_any=lung_any,
        has_label=bool(meta["has_label"]),
        source=Path(meta["source"]),
    )


class SliceCache:
    """Prepared volumes under ``root/<config key>/``; :meth:`get` prepares a volume at most once."""

    def __init__(self, root: str | Path, data: DataConfig) -> None:
        self.data = data
        self.key = config_key(data)
        self.folder = Path(root) / self.key
        self.prepared = 0  # volumes prepared (not found in the cache) by this object
        self.reused = 0

    def entry(self, record: VolumeRecord) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in record.name)
        return self.folder / f"{safe}-{source_key(record.image, record.label)}"

    def get(self, record: VolumeRecord) -> CachedVolume:
        """The cached volume for ``record``, prepared and written first if missing."""
        folder = self.entry(record)
        meta_path = folder / "meta.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                if all((folder / f"{a}.npy").is_file() for a in ("image", "lung")) and (
                    not meta["has_label"] or (folder / "label.npy").is_file()
                ):
                    self.reused += 1
                    return _from_meta(folder, meta)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s: unreadable cache entry (%s); preparing again", folder, exc)
        arrays = prepare_volume(record, self.data)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            if arrays[name] is not None:
                atomic_write_npy(folder / f"{name}.npy", arrays[name])
        atomic_write_text(meta_path, json.dumps(arrays["meta"], indent=1) + "\n")
        self.prepared += 1
        log.debug("prepared %s -> %s", record.image, folder)
        return _from_meta(folder, arrays["meta"])
