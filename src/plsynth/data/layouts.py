"""Finding volumes (and their infection masks) in each supported dataset layout.

A layout gives a list of :class:`VolumeRecord` (name, image file, label file or None). Names
are what the paper's split files use, so records and split files can be matched:

- ``covid19-20`` (COVID-19-20 challenge, and plsynth's phantoms): ``<name>_ct.nii.gz`` with
  ``<name>_seg.nii.gz`` beside it, anywhere below the root (``Train/``, ``Validation/``...).
  Other files (such as phantoms' ``<name>_lung.nii.gz``) are ignored.
- ``mosmed`` (MosMedData COVID19_1110): studies ``studies/CT-<k>/study_XXXX.nii.gz``, masks
  ``masks/study_XXXX_mask.nii.gz``; any ``<name>.nii(.gz)`` below the root is a study and a
  ``<name>_mask.nii(.gz)`` anywhere below it is its mask (so the re-oriented test volumes
  named by study UID with a ``_rot`` suffix fit too).
- ``semiseg`` (COVID-SemiSeg): ``labeled/images/<name>.jpg`` + ``labeled/masks/<name>.png``
  (0/255), ``unlabeled/images/<name>.jpg``; every slice is its own record.
- ``folder``: every NIfTI volume below the root (no labels; unlabeled data only).

Hidden files (``.tmp-*`` from interrupted writes) are never taken.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from plsynth.errors import InputError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class VolumeRecord:
    """One case on disk: its name (as in split files), image file and infection mask (or None)."""

    name: str
    image: Path
    label: Path | None = None


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


DATA_ENV = "PLSYNTH_DATA"


@dataclass(frozen=True)
class DatasetSource:
    """A public dataset a layout reads: its folder under ``$PLSYNTH_DATA`` and where to get it."""

    folder: str
    title: str
    where: str


# One variable for every dataset, with one subfolder each (the names of the shipped split sets):
# a user sets one thing once, and a dataset kept elsewhere takes `--set data.root=DIR`.
SOURCES = {
    "covid19-20": DatasetSource(
        "covid19-20", "COVID-19-20 (MICCAI 2020 COVID-19 Lung CT Lesion Segmentation Challenge, Roth et al.)",
        "https://covid-segmentation.grand-challenge.org/ (images: TCIA, 'CT Images in COVID-19')"),
    "mosmed": DatasetSource(
        "mosmeddata", "MosMedData COVID19_1110 (Morozov et al., Digital Diagnostics 2020)",
        "https://mosmed.ai/datasets/covid19_1110/"),
    "semiseg": DatasetSource(
        "covid-semiseg", "COVID-SemiSeg (Inf-Net's authors, Fan et al., IEEE TMI 2020)",
        "https://github.com/DengPingFan/Inf-Net (COVID-SemiSeg Dataset)"),
}


def dataset_root(layout: str, root: str | Path = "") -> Path:
    """The folder a layout reads: ``data.root`` when set, else ``$PLSYNTH_DATA/<folder>``.

    Absent data is an InputError (exit 3) that names the dataset and where to get it.
    """
    source = SOURCES.get(layout)
    if not str(root):
        base = os.environ.get(DATA_ENV, "")
        if source is None:
            raise InputError(Path("data.root"), f"empty; the {layout} layout needs the dataset folder")
        if not base:
            raise InputError(Path("data.root"), f"not set, and {DATA_ENV} is not set. {_get_it(source)}")
        root = Path(base) / source.folder
    path = Path(root).expanduser()
    if not path.is_dir():
        hint = f" {_get_it(source)}" if source else ""
        raise InputError(path, f"dataset root of layout {layout!r} is not a folder.{hint}")
    return path


def _get_it(source: DatasetSource) -> str:
    return (f"{source.title}: get it from {source.where}, then pass --set data.root=DIR "
            f"or set {DATA_ENV}=DIR with the dataset in DIR/{source.folder}")


def _unique(records: list[VolumeRecord], root: Path) -> list[VolumeRecord]:
    seen: dict[str, Path] = {}
    for record in records:
        if record.name in seen:
            raise InputError(root, f"two volumes named {record.name!r}: {seen[record.name]} and {record.image}")
        seen[record.name] = record.image
    return sorted(records, key=lambda r: r.name)


def find_covid19_20(root: str | Path) -> list[VolumeRecord]:
    """``<name>_ct.nii.gz`` + ``<name>_seg.nii.gz`` below ``root`` (label None where no seg file exists)."""
    root = dataset_root("covid19-20", root)
    records = []
    for image in root.rglob("*_ct.nii*"):
        stem = _strip(image.name, tuple("_ct" + s for s in NIFTI_SUFFIXES))
        if stem is None or not _visible(image, root):
            continue
        label = next((image.with_name(f"{stem}_seg{s}") for s in NIFTI_SUFFIXES if image.with_name(f"{stem}_seg{s}").is_file()), None)
        records.append(VolumeRecord(stem, image, label))
    return _unique(records, root)


def find_mosmed(root: str | Path) -> list[VolumeRecord]:
    """MosMedData studies (``<name>.nii.gz``) with masks ``<name>_mask.nii.gz`` found anywhere below ``root``."""
    root = dataset_root("mosmed", root)
    studies: list[tuple[str, Path]] = []
    masks: dict[str, Path] = {}
    for path in root.rglob("*.nii*"):
        stem = _strip(path.name, NIFTI_SUFFIXES)
        if stem is None or not _visible(path, root) or not path.is_file():
            continue
        if stem.endswith("_mask"):
            masks[stem[: -len("_mask")]] = path
        else:
            studies.append((stem, path))
    records = [VolumeRecord(stem, path, masks.get(stem)) for stem, path in studies]
    orphans = sorted(set(masks) - {stem for stem, _ in studies})
    if orphans:
        log.warning("%s: %d mask(s) without a study, e.g. %s", root, len(orphans), orphans[0])
    return _unique(records, root)


def find_folder(root: str | Path) -> list[VolumeRecord]:
    """Every NIfTI volume below ``root``, named by its stem, without labels."""
    root = dataset_root("folder", root)
    records = []
    for path in root.rglob("*.nii*"):
        stem = _strip(path.name, NIFTI_SUFFIXES)
        if stem is not None and _visible(path, root) and path.is_file():
            records.append(VolumeRecord(stem, path, None))
    return _unique(records, root)


def find_slices(folder: str | Path) -> dict[str, Path]:
    """``{stem: path}`` of the 8-bit slices (.jpg/.jpeg/.png) directly in ``folder`` ({} if absent)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for path in folder.iterdir():
        stem = _strip(path.name, SLICE_SUFFIXES)
        if stem is not None and not path.name.startswith(".") and path.is_file():
            out[stem] = path
    return out


def find_semiseg(root: str | Path) -> tuple[list[VolumeRecord], list[VolumeRecord]]:
    """COVID-SemiSeg: ``(labeled, unlabeled)`` single-slice records.

    Every labeled image needs its mask (same stem, ``labeled/masks/``); a missing one is an
    InputError rather than a silently unlabeled slice.
    """
    root = dataset_root("semiseg", root)
    images = find_slices(root / "labeled" / "images")
    masks = find_slices(root / "labeled" / "masks")
    if not images:
        raise InputError(root / "labeled" / "images", "no labeled .jpg/.png slices found (COVID-SemiSeg layout)")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise InputError(root / "labeled" / "masks", f"{len(missing)} labeled slice(s) without a mask, e.g. {missing[0]}")
    labeled = [VolumeRecord(stem, images[stem], masks[stem]) for stem in sorted(images)]
    unlabeled = [VolumeRecord(stem, path, None) for stem, path in sorted(find_slices(root / "unlabeled" / "images").items())]
    return labeled, unlabeled


def find_volumes(layout: str, root: str | Path) -> list[VolumeRecord]:
    """Records of a volume layout (``covid19-20``, ``phantom`` (same files), ``mosmed``, ``folder``)."""
    if layout in ("covid19-20", "phantom"):
        return find_covid19_20(root)
    if layout == "mosmed":
        return find_mosmed(root)
    if layout == "folder":
        return find_folder(root)
    raise ValueError(f"data.layout {layout!r} has no volume finder; expected covid19-20, phantom, mosmed or folder")
