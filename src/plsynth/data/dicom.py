"""DICOM series folders: pick one series by an explicit, logged rule; read it as LPS HU; write masks back.

Reading goes through SimpleITK (GDCM), which applies RescaleSlope/RescaleIntercept, so voxels are
HU. Only SeriesInstanceUIDs and file counts are ever logged or put into error messages: no
patient, study or institution tag is read into a log, a report or an exception.

Series rule (when a folder holds several series): the series with the most files wins; ties
are broken by the smallest SeriesInstanceUID (string order), so the choice is deterministic. The
choice and the alternatives are logged; ``series_uid`` overrides it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plsynth.atomic import atomic_write
from plsynth.data.image import CTImage
from plsynth.errors import InputError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (``DICM`` at byte 128) or a file named ``*.dcm``/``*.dicom``/``*.ima``.

    Old ACR-NEMA files without the Part 10 preamble and without such a suffix are not recognised.
    """
    path = Path(path)
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@dataclass(frozen=True)
class DicomGeometry:
    """How to write a mask back over a DICOM series.

    ``origin``/``spacing``/``direction`` (ITK order, LPS world) describe the CTImage's grid, which
    is the series reoriented to LPS; ``original_orientation`` is the series' own orientation code
    (e.g. ``"LPS"``, ``"RAI"``) so a mask can be put back into the series' own voxel order.
    """

    series_uid: str
    n_files: int
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]  # ITK order (x, y, z)
    direction: tuple[float, ...]  # 9 numbers, row-major, ITK order
    original_orientation: str

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 from CTImage array index ``(z, y, x, 1)`` to NIfTI world (RAS+ mm)."""
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = direction @ np.diag(self.spacing)
        lps[:3, 3] = self.origin
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS world -> RAS world
        return ras[:, [2, 1, 0, 3]]  # ITK index (x, y, z) -> array index (z, y, x)


def list_series(folder: Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> sorted file names (as GDCM orders them) for the DICOM files directly in ``folder``."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series: dict[str, list[str]] = {}
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        series[uid] = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return series


def choose_series(folder: Path, series: dict[str, list[str]], series_uid: str | None) -> str:
    """Apply the rule (most files, ties by smallest UID) or the override; log the choice."""
    available = ", ".join(f"{uid} ({len(files)} files)" for uid, files in sorted(series.items()))
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(folder, f"DICOM series {series_uid} not found; available series: {available}")
        logger.info("%s: using DICOM series %s (%d files) as requested", folder, series_uid, len(series[series_uid]))
        return series_uid
    chosen = min(series, key=lambda uid: (-len(series[uid]), uid))
    if len(series) > 1:
        logger.warning(
            "%s: %d DICOM series found; chose %s with %d files (rule: most files, ties broken by the smallest "
            "SeriesInstanceUID; choose another with series_uid / --series-uid). Available: %s",
            folder, len(series), chosen, len(series[chosen]), available,
        )
    else:
        logger.info("%s: DICOM series %s with %d files", folder, chosen, len(series[chosen]))
    return chosen


def read_dicom_series(folder: Path, series_uid: str | None = None) -> tuple[np.ndarray, DicomGeometry]:
    """Read one series of ``folder`` as a float32 HU array ``(z, y, x)`` in LPS order, and its geometry.

    Oblique series are reoriented to the closest axis-aligned LPS order (``sitk.DICOMOrient``),
    never resampled. Raises InputError for a folder without a readable series or an unknown uid.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise InputError(folder, "empty folder (expected a DICOM series folder)")
    n_dicom = sum(is_dicom_file(p) for p in files)
    if not n_dicom:  # checked first: GDCM would print a warning to stderr for every such folder
        raise InputError(
            folder, f"no DICOM files in folder ({len(files)} other file(s)); pass NIfTI or PNG files directly"
        )
    series = list_series(folder)
    if not series:
        raise InputError(folder, f"{n_dicom} DICOM file(s) found but none is part of a readable image series")
    uid = choose_series(folder, series, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[uid])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        # ITK's message names files and the failure, never tag values; keep its last line (the description).
        lines = str(error).strip().splitlines()
        reason = lines[-1].strip() if lines else type(error).__name__
        raise InputError(folder, f"cannot read DICOM series {uid}: {reason}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(folder, f"DICOM series {uid} is not a greyscale 3D image")
    original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    oriented = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(oriented).astype(np.float32, copy=False)
    geometry = DicomGeometry(
        series_uid=uid,
        n_files=len(series[uid]),
        origin=tuple(float(v) for v in oriented.GetOrigin()),
        spacing=tuple(float(v) for v in oriented.GetSpacing()),
        direction=tuple(float(v) for v in oriented.GetDirection()),
        original_orientation=original,
    )
    return array, geometry


def write_dicom_mask(mask: np.ndarray, like: CTImage, path: Path) -> Path:
    """Write ``mask`` (uint8, CTImage grid) as NIfTI in the series' own voxel order and world geometry.

    The NIfTI affine reproduces the series geometry (ITK's LPS -> NIfTI RAS conversion), so the
    mask overlays the series in 3D Slicer or ITK-SNAP.
    """
    import SimpleITK as sitk

    geometry: DicomGeometry = like.geometry
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    image = sitk.DICOMOrient(image, geometry.original_orientation)
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp))
    return Path(path)


__all__ = ["DicomGeometry", "choose_series", "is_dicom_file", "list_series", "read_dicom_series", "write_dicom_mask"]
