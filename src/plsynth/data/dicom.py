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
class ItkGeometry:
    """How to write a mask back over an image read by SimpleITK (a DICOM series, .mha, .nrrd).

    ``origin``/``spacing``/``direction`` (ITK order, LPS world) describe the CTImage's grid, which
    is the image reoriented to LPS; ``original_orientation`` is the image's own orientation code
    (e.g. ``"LPS"``, ``"RAI"``) so a mask can be put back into its own voxel order.
    """

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


@dataclass(frozen=True)
class DicomGeometry(ItkGeometry):
    """An ItkGeometry read from a DICOM series: its UID and files (a DICOM SEG references them)."""

    series_uid: str = ""
    files: tuple[str, ...] = ()

    @property
    def n_files(self) -> int:
        return len(self.files)


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


SPACING_TOLERANCE = 0.01  # relative spread of slice gaps accepted as "uniform" (1 %, and at least 0.01 mm)


def check_series_headers(folder: Path, uid: str, files: list[str], max_voxels: int | None = None) -> None:
    """Refuse a series before its pixels are read: not CT, too many voxels, or slices not evenly spaced.

    Reads only the header tags needed (pydicom, no pixel data). Missing slices show as a gap
    larger than the others; ITK would silently average the spacing and every volume would be wrong.
    """
    import pydicom

    tags = ["Modality", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames"]
    headers = []
    for name in files:
        try:
            headers.append(pydicom.dcmread(name, stop_before_pixels=True, specific_tags=tags))
        except Exception as error:  # noqa: BLE001 - pydicom raises InvalidDicomError, OSError, ...
            raise InputError(folder, f"DICOM series {uid}: cannot read the header of {Path(name).name} ({type(error).__name__})") from None
    modalities = sorted({str(getattr(h, "Modality", "") or "missing") for h in headers})
    if modalities != ["CT"]:
        raise InputError(folder, f"DICOM series {uid} has Modality {', '.join(modalities)}, not CT; "
                                 "this model reads CT numbers (HU) only")
    rows, columns = int(getattr(headers[0], "Rows", 0) or 0), int(getattr(headers[0], "Columns", 0) or 0)
    frames = sum(int(getattr(h, "NumberOfFrames", 1) or 1) for h in headers)
    if max_voxels is not None and rows * columns * frames > max_voxels:
        raise InputError(folder, f"DICOM series {uid} declares {columns}x{rows}x{frames} = {rows * columns * frames} "
                                 f"voxels, more than the limit {max_voxels} (--max-voxels)")
    if len(headers) < 3 or frames != len(headers):
        return
    try:
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient], dtype=float).reshape(2, 3)
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers], dtype=float)
    except (AttributeError, TypeError, ValueError):
        raise InputError(folder, f"DICOM series {uid}: ImagePositionPatient/ImageOrientationPatient missing or "
                                 "malformed; cannot tell the slice spacing") from None
    normal = np.cross(orientation[0], orientation[1])
    heights = np.sort(positions @ normal)
    gaps = np.diff(heights)
    if np.any(gaps < 1e-3):
        raise InputError(folder, f"DICOM series {uid}: two or more slices share one position (duplicates, or "
                                 "several volumes in one series); pass a folder with one volume")
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > max(SPACING_TOLERANCE * median, 0.01):
        raise InputError(folder, f"DICOM series {uid}: slice spacing is not uniform ({gaps[worst]:.3g} mm between "
                                 f"slices {worst + 1} and {worst + 2}, {median:.3g} mm elsewhere): slices are missing "
                                 "or the series mixes acquisitions; refusing to guess the geometry")


def read_dicom_series(folder: Path, series_uid: str | None = None, max_voxels: int | None = None) -> tuple[np.ndarray, DicomGeometry]:
    """Read one series of ``folder`` as a float32 HU array ``(z, y, x)`` in LPS order, and its geometry.

    Oblique series are reoriented to the closest axis-aligned LPS order (``sitk.DICOMOrient``),
    never resampled. Raises InputError for a folder without a readable series, an unknown uid,
    a series that is not CT, larger than ``max_voxels`` or with unevenly spaced (missing) slices.
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
    check_series_headers(folder, uid, series[uid], max_voxels)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[uid])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(folder, f"cannot read DICOM series {uid}: {itk_reason(error)}") from None
    array, itk = oriented_lps(folder, image)
    geometry = DicomGeometry(**vars(itk), series_uid=uid, files=tuple(series[uid]))
    return array, geometry


def itk_reason(error: Exception) -> str:
    """The last line of a SimpleITK error: its description. ITK's message names files and the
    failure, never tag values, so it may go into logs and reports."""
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else f"SimpleITK {type(error).__name__}"


def oriented_lps(path: Path, image) -> tuple[np.ndarray, ItkGeometry]:
    """A SimpleITK image as a float32 ``(z, y, x)`` array in LPS order and the geometry to undo that."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"not a greyscale 3D image ({image.GetDimension()}D, "
                               f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel)")
    original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    oriented = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(oriented).astype(np.float32, copy=False)
    geometry = ItkGeometry(
        origin=tuple(float(v) for v in oriented.GetOrigin()),
        spacing=tuple(float(v) for v in oriented.GetSpacing()),
        direction=tuple(float(v) for v in oriented.GetDirection()),
        original_orientation=original,
    )
    return array, geometry


def write_itk_mask(mask: np.ndarray, like: CTImage, path: Path) -> Path:
    """Write ``mask`` (uint8, CTImage grid) as NIfTI in the image's own voxel order and world geometry.

    For DICOM series, .mha and .nrrd inputs. The NIfTI affine reproduces the input's geometry
    (ITK's LPS -> NIfTI RAS conversion), so the mask overlays it in 3D Slicer or ITK-SNAP.
    """
    import SimpleITK as sitk

    image = in_original_orientation(mask, like.geometry)
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp))
    return Path(path)


def in_original_orientation(mask: np.ndarray, geometry: ItkGeometry):
    """A (z, y, x) LPS uint8 mask as a SimpleITK image in the input's own voxel order and world geometry
    (the inverse of :func:`oriented_lps`)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    return sitk.DICOMOrient(image, geometry.original_orientation)


__all__ = ["DicomGeometry", "ItkGeometry", "check_series_headers", "choose_series", "in_original_orientation",
           "is_dicom_file", "itk_reason", "list_series", "oriented_lps", "read_dicom_series", "write_itk_mask"]
