"""Reading CT inputs into a CTImage, writing masks back in the input's exact geometry, finding cases.

Inputs: NIfTI volumes (``.nii``, ``.nii.gz``, ``.nii.bz2``; any orientation, oblique included;
int16, uint16, float; scl_slope/scl_inter honoured), MetaImage and NRRD volumes (``.mha``,
``.mhd``, ``.nrrd``, ``.nhdr``, through SimpleITK), DICOM series folders (see
``plsynth.data.dicom``), and 2D 8-bit PNG/JPG slices that were windowed before we got them.

Every volume is checked before its voxels are read: the header's voxel count against a cap
(``max_voxels``), and a compressed NIfTI's whole stream (CRC and length) against what the
header declares, so a 90-byte file claiming a billion voxels costs nothing.

Every volume becomes a float32 ``(z, y, x)`` array in LPS order (see ``CTImage``): the array is
only permuted and flipped, never resampled; an oblique affine is reoriented to the closest
axis-aligned LPS order. ``geometry`` keeps what is needed to undo that exactly, and
:func:`write_mask` does so. Everything that can go wrong with an input raises
``InputError(path, problem)``; wrong arguments from calling code raise ``ValueError``.

Trailing singleton dimensions of a NIfTI (e.g. ``(X, Y, Z, 1)``) are squeezed on reading; the
mask written back keeps the input's full shape (and so its header's ``dim`` exactly), because
viewers overlay a mask most reliably when its header matches the image's.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plsynth.atomic import atomic_write
from plsynth.data.dicom import ItkGeometry, is_dicom_file, itk_reason, oriented_lps, read_dicom_series, write_itk_mask
from plsynth.data.image import CTImage
from plsynth.errors import InputError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")  # what masks are written as
NIFTI_READ_SUFFIXES = NIFTI_SUFFIXES + (".nii.bz2",)
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
CASE_SUFFIXES = NIFTI_READ_SUFFIXES + ITK_SUFFIXES + SLICE_SUFFIXES
DEFAULT_MAX_VOXELS = 512 * 512 * 2000  # 2 GB as float32: the largest chest CT we accept (--max-voxels)
LPS = ("L", "P", "S")  # nibabel axis codes of the CTImage array's (x, y, z) axes


@dataclass(frozen=True)
class Case:
    """One input to process: a NIfTI or slice file, or a DICOM series folder (or something unusable)."""

    path: Path
    name: str  # output stem: file name without .nii.gz/.nii/.png/.jpg(.jpeg), or the folder's name


@dataclass(frozen=True)
class NiftiGeometry:
    """What ``write_mask`` needs to put a mask into a NIfTI input's exact grid.

    ``header`` is the input's header (nibabel, copied), ``shape`` its full data shape (trailing
    singletons included), ``to_lps`` the nibabel orientation transform from the input's first
    three axes to the CTImage's (x, y, z) LPS axes, ``affine_ras`` the 4x4 from CTImage array
    index ``(z, y, x, 1)`` to world (RAS+ mm, NIfTI convention).
    """

    header: Any
    image_class: type
    shape: tuple[int, ...]
    to_lps: np.ndarray
    affine_ras: np.ndarray


@dataclass(frozen=True)
class SliceGeometry:
    """A 2D slice: its size (rows, columns) and the file's image mode (``"L"``, ``"RGB"``, ...)."""

    size: tuple[int, int]
    mode: str


def case_name(path: Path) -> str:
    """Output stem of an input: ``a.nii.gz`` -> ``a``, ``b.png`` -> ``b``, a folder -> its name."""
    path = Path(path)
    name = path.name or path.resolve().name
    lower = name.lower()
    for suffix in CASE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def world_affine(image: CTImage) -> np.ndarray | None:
    """4x4 from ``image.array`` index ``(z, y, x, 1)`` to world RAS+ mm; None for 2D slices."""
    geometry = image.geometry
    if isinstance(geometry, (NiftiGeometry, ItkGeometry)):
        return np.array(geometry.affine_ras, dtype=float)
    return None


def content_sha256(path: Path) -> str:
    """sha256 of an input's content: a file's bytes, or a folder's (name, sha256) list of its visible files.

    ``--continue`` keys finished cases by it, so another volume under the same name is redone.
    """
    from plsynth.hashing import sha256_file, text_digest

    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    listing = [f"{child.name}\0{sha256_file(child)}\n" for child in sorted(path.iterdir())
               if child.is_file() and not child.name.startswith(".")]
    return text_digest("".join(listing))


# ----------------------------------------------------------------------------------------- reading


def read_image(path: Path, series_uid: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS) -> CTImage:
    """Read a NIfTI, MetaImage or NRRD file, a DICOM series folder or an 8-bit PNG/JPG slice into a CTImage.

    ``series_uid`` chooses the DICOM series when a folder holds several (see
    ``plsynth.data.dicom``); volumes whose header declares more than ``max_voxels`` voxels are
    refused before reading. Raises InputError naming the file and the problem.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise InputError(path, "not found")
    if not path.exists():
        raise InputError(path, "broken symbolic link")
    lower = path.name.lower()
    if path.is_dir():
        if lower.endswith(CASE_SUFFIXES) and not any(is_dicom_file(p) for p in path.iterdir() if p.is_file()):
            raise InputError(path, "is a folder, not a file (named like a NIfTI/PNG file, holds no DICOM)")
        array, geometry = read_dicom_series(path, series_uid, max_voxels)
        return _volume(path, array, tuple(float(v) for v in geometry.spacing[::-1]), geometry)
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise InputError(path, "not readable (permission denied)")
    if lower.endswith(NIFTI_READ_SUFFIXES):
        return _read_nifti(path, max_voxels)
    if lower.endswith(ITK_SUFFIXES):
        return _read_itk(path, max_voxels)
    if lower.endswith(SLICE_SUFFIXES):
        return _read_slice(path, max_voxels)
    if is_dicom_file(path):
        raise InputError(path, "a single DICOM file; pass the folder that holds the whole series")
    raise InputError(
        path, f"unknown file type {path.suffix!r}; expected .nii(.gz/.bz2), .mha, .nrrd, .png, .jpg or a DICOM series folder"
    )


def _volume(path: Path, array: np.ndarray, spacing: tuple[float, float, float], geometry: Any) -> CTImage:
    """Checks shared by NIfTI and DICOM volumes; NaN/inf voxels are set to the lowest finite value."""
    if array.size == 1:
        raise InputError(path, "a single voxel, not a CT volume")
    if sum(n > 1 for n in array.shape) < 2:
        raise InputError(path, f"shape {array.shape} has only one axis longer than 1; not a CT volume")
    finite = np.isfinite(array)
    if not finite.any():
        raise InputError(path, "all voxels are NaN or infinite")
    if not finite.all():
        low = float(array[finite].min())
        logger.warning("%s: %d NaN/infinite voxels set to %.1f (the lowest finite value)", path, (~finite).sum(), low)
        array = np.where(finite, array, np.float32(low))
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(path, f"voxel spacing {spacing} is not positive and finite (broken affine or header)")
    return CTImage(np.ascontiguousarray(array, dtype=np.float32), "hu", spacing, path, geometry)


def _open_compressed(path: Path):
    import bz2

    return bz2.open(path, "rb") if path.name.lower().endswith(".bz2") else gzip.open(path, "rb")


def _compressed_problem(path: Path, expected: int | None = None) -> str | None:
    """Read a compressed file's whole stream (which checks its CRC) without keeping it; a reason or None.

    ``expected``: bytes the header says the stream holds at least (voxel offset + voxel data).
    """
    import bz2  # noqa: F401 - its OSError subclasses come through _open_compressed

    kind = "bzip2" if path.name.lower().endswith(".bz2") else "gzip"
    total = 0
    try:
        with _open_compressed(path) as handle:
            while block := handle.read(1 << 24):
                total += len(block)
    except EOFError:
        return f"truncated {kind} data (the file ends early; was the copy interrupted?)"
    except (gzip.BadGzipFile, zlib.error, OSError, ValueError) as error:
        return f"corrupt or not {kind} data ({error})"
    if expected is not None and total < expected:
        return f"truncated NIfTI: the header declares {expected} bytes, the file holds {total}"
    return None


def _nifti_read_problem(path: Path, error: BaseException) -> str:
    """A human reason for a NIfTI that nibabel could not read; diagnoses compression damage first."""
    if path.name.lower().endswith((".gz", ".bz2")):
        problem = _compressed_problem(path)
        if problem is not None:
            return problem
    elif isinstance(error, OSError) and "Expected" in str(error):
        return "truncated NIfTI (the file ends before its voxel data does)"
    reason = str(error).replace(str(path), "the file").strip() or type(error).__name__
    return f"unreadable, not a NIfTI file ({reason})"


def _check_voxels(path: Path, shape: Sequence[int], max_voxels: int) -> int:
    count = int(np.prod([int(n) for n in shape], dtype=np.int64))
    if count > max_voxels:
        raise InputError(path, f"the header declares {'x'.join(str(int(n)) for n in shape)} = {count} voxels, more than "
                               f"the limit {max_voxels} (--max-voxels); not read")
    return count


def _read_itk(path: Path, max_voxels: int) -> CTImage:
    """A MetaImage or NRRD volume through SimpleITK: header first (size cap), then the voxels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(path, f"unreadable image header ({itk_reason(error)})") from None
    _check_voxels(path, reader.GetSize(), max_voxels)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(path, f"unreadable or truncated image ({itk_reason(error)})") from None
    array, geometry = oriented_lps(path, image)
    return _volume(path, array, tuple(float(v) for v in geometry.spacing[::-1]), geometry)


def _read_nifti(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> CTImage:
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises ImageFileError, OSError, ValueError, EOFError ...
        raise InputError(path, _nifti_read_problem(path, error)) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(image).__name__})")
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3:
        raise InputError(path, f"2D NIfTI with shape {shape}; expected a 3D CT volume")
    if any(n > 1 for n in shape[3:]):
        raise InputError(path, f"{len(shape)}D NIfTI with shape {shape} (time series or channels); expected one 3D volume")
    dtype = image.header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "uif":
        raise InputError(path, f"unsupported voxel type {dtype}; expected integer or float greyscale")
    count = _check_voxels(path, shape, max_voxels)
    if path.name.lower().endswith((".gz", ".bz2")):  # nibabel never reads to the end, so never checks the CRC
        problem = _compressed_problem(path, int(image.header.get_data_offset()) + count * dtype.itemsize)
        if problem is not None:
            raise InputError(path, problem)
    try:
        data = image.get_fdata(dtype=np.float32)  # applies scl_slope / scl_inter
    except Exception as error:
        raise InputError(path, _nifti_read_problem(path, error)) from None
    data = data.reshape(shape[:3])
    affine = np.asarray(image.affine, dtype=float)
    if int(image.header["sform_code"]) == 0 and int(image.header["qform_code"]) == 0:
        logger.warning("%s: NIfTI has neither qform nor sform; orientation assumed from pixdim (left/right unsure)", path)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "the affine is singular or not finite; cannot tell the orientation")
    to_lps = ornt_transform(io_orientation(affine), axcodes2ornt(LPS))
    xyz = apply_orientation(data, to_lps)
    affine_xyz = affine @ inv_ornt_aff(to_lps, shape[:3])
    columns = affine_xyz[:3, :3] / np.linalg.norm(affine_xyz[:3, :3], axis=0)
    if np.abs(columns).max(axis=0).min() < 1 - 1e-4:
        logger.info("%s: oblique affine; reoriented to the closest axis-aligned LPS order, not resampled", path)
    spacing_xyz = np.linalg.norm(affine_xyz[:3, :3], axis=0)
    geometry = NiftiGeometry(
        header=image.header.copy(),
        image_class=type(image),
        shape=shape,
        to_lps=to_lps,
        affine_ras=affine_xyz[:, [2, 1, 0, 3]],
    )
    spacing = (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0]))
    return _volume(path, xyz.transpose(2, 1, 0), spacing, geometry)


def _read_slice(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> CTImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as handle:  # reads the header only
            _check_voxels(path, handle.size, max_voxels)
            handle.load()
            mode = handle.mode
            frames = getattr(handle, "n_frames", 1)
            if frames > 1:
                raise InputError(path, f"{frames} frames; expected one 2D slice")
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise InputError(
                    path, f"{mode} image (16/32-bit); expected an 8-bit slice already windowed (save HU data as NIfTI)"
                )
            if mode != "L":
                logger.info("%s: %s image converted to greyscale", path, mode)
            grey = handle.convert("L")
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        reason = str(error).replace(str(path), "the file").strip() or type(error).__name__
        raise InputError(path, f"unreadable or truncated image ({reason})") from None
    array = np.asarray(grey, dtype=np.float32)
    if array.size <= 1:
        raise InputError(path, "a single pixel, not a CT slice")
    return CTImage(array[np.newaxis], "uint8", None, path, SliceGeometry(size=array.shape, mode=mode))


# ----------------------------------------------------------------------------------------- writing


def _mask_array(mask: np.ndarray, like: CTImage, path: Path) -> np.ndarray:
    mask = np.asarray(mask)
    if like.is_slice and mask.shape == like.array.shape[1:]:
        mask = mask[np.newaxis]
    if mask.shape != like.array.shape:
        raise ValueError(f"{path}: mask shape {mask.shape} differs from the image's {like.array.shape} ({like.source})")
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"{path}: mask dtype {mask.dtype} is not numeric")
    if mask.size and (mask.min() < 0 or mask.max() > 255 or (mask.dtype.kind == "f" and np.any(mask != np.round(mask)))):
        raise ValueError(f"{path}: mask values must be integers in 0..255 (labels), got {mask.min()}..{mask.max()}")
    return mask.astype(np.uint8)


def _require_suffix(path: Path, suffixes: tuple[str, ...], like: CTImage) -> None:
    if not path.name.lower().endswith(suffixes):
        raise ValueError(f"{path}: a mask for {like.source} must be written as {' or '.join(suffixes)}")


def write_mask(mask: np.ndarray, like: CTImage, path: Path, *, scale_binary_png: bool | None = None) -> Path:
    """Write a label mask in ``like``'s array grid back in the input's exact geometry; returns ``path``.

    ``mask``: shape ``like.array.shape`` ((z, y, x); ``(rows, columns)`` is also accepted for a
    slice), integer values 0..255 (0/1 infection, 0..2 lungs, 0..3 semantic maps), stored as uint8.

    - NIfTI input -> NIfTI (``.nii``/``.nii.gz``) with the input's full shape (trailing singletons
      kept), affine, qform/sform and codes, pixdim, units and the rest of the header; only the
      data type (uint8), scl_slope/scl_inter (unset, so values are exact) and cal_min/cal_max
      (reset to 0, the CT's display range makes no sense for labels) change.
    - DICOM, .mha or .nrrd input -> NIfTI in the input's own voxel order whose affine reproduces
      its geometry (it overlays the series in 3D Slicer).
    - 2D slice -> ``.png`` of the input's size. ``scale_binary_png``: True writes ``mask * 255``
      (0/255, the infection output; labels above 1 are then a ValueError), False the raw label
      values (use it for lung masks 0..2, whose content may happen to hold only label 1), None
      (default) decides by content: 0/255 when the mask holds only 0 and 1, else raw values.
      JPEG is refused: it is lossy.

    Written atomically (``plsynth.atomic.atomic_write``): no half-written file under ``path``.
    """
    path = Path(path)
    geometry = like.geometry
    labels = _mask_array(mask, like, path)
    if isinstance(geometry, NiftiGeometry):
        _require_suffix(path, NIFTI_SUFFIXES, like)
        return _write_nifti_mask(labels, geometry, path)
    if isinstance(geometry, ItkGeometry):  # DICOM series, .mha, .nrrd
        _require_suffix(path, NIFTI_SUFFIXES, like)
        return write_itk_mask(labels, like, path)
    if isinstance(geometry, SliceGeometry) or like.is_slice:
        _require_suffix(path, (".png",), like)
        binary = labels.max(initial=0) <= 1
        if scale_binary_png and not binary:
            raise ValueError(f"{path}: scale_binary_png=True but the mask holds labels up to {labels.max()}")
        if scale_binary_png or (scale_binary_png is None and binary):
            labels = labels * np.uint8(255)
        return _write_png_mask(labels[0], path)
    raise ValueError(f"{path}: {like.source} has no geometry that write_mask knows ({type(geometry).__name__})")


def _write_nifti_mask(labels: np.ndarray, geometry: NiftiGeometry, path: Path) -> Path:
    from nibabel.orientations import apply_orientation

    # Undo the reorientation: (z, y, x) -> LPS (x, y, z) -> the input's own axes.
    xyz = labels.transpose(2, 1, 0)
    original = apply_orientation(xyz, _inverse_ornt(geometry.to_lps))
    # NIfTI stores x fastest (Fortran order), as the (z, y, x) C-order array already is: no transposing copy
    original = np.asfortranarray(original).reshape(geometry.shape, order="F")
    header = geometry.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)
    header["cal_min"] = 0
    header["cal_max"] = 0
    image = geometry.image_class(original, None, header)  # affine None: keep qform/sform exactly as in header
    with atomic_write(path) as tmp:
        image.to_filename(tmp)
    return path


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """Inverse of a nibabel orientation transform (row i: input axis i -> output axis, flip)."""
    inverse = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = (axis, flip)
    return inverse


def _write_png_mask(labels: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray(np.ascontiguousarray(labels), mode="L").save(tmp, format="PNG")
    return path


# ----------------------------------------------------------------------------------------- cases


def _is_case_file(path: Path) -> bool:
    return path.name.lower().endswith(CASE_SUFFIXES)


def _expand_folder(folder: Path) -> list[Path]:
    """Cases under ``folder``, recursively (symbolic links followed once; hidden entries skipped).

    A folder holding DICOM files is one case; a sub-folder named like a file is a case of its
    own (it fails with the reason). Files of other types (notes, sidecars) are skipped with a
    warning that names them: nothing is skipped without a word.
    """
    found: list[Path] = []
    skipped: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symbolic link loop, or the same folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        root_path = Path(root)
        visible = sorted(f for f in files if not f.startswith("."))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):  # a folder named like a file: one case of its own (read_image says why it fails)
            if d.lower().endswith(CASE_SUFFIXES) and not any(is_dicom_file(p) for p in (root_path / d).iterdir()
                                                             if p.is_file()):
                found.append(root_path / d)
                dirs.remove(d)
        paths = [root_path / f for f in visible]
        others = [p for p in paths if not _is_case_file(p)]
        dicom = [p for p in others if is_dicom_file(p)]
        if dicom:
            found.append(root_path)
            if len(dicom) < len(others):
                logger.info("%s: %d non-DICOM file(s) beside the DICOM series ignored", root_path, len(others) - len(dicom))
            others = []
        found.extend(p for p in paths if _is_case_file(p))
        skipped.extend(others)
    if skipped:
        names = ", ".join(str(p.relative_to(folder)) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d file(s) that are neither a volume, a slice nor DICOM: %s", folder, len(skipped), names)
    return sorted(found)


def find_cases(inputs: Sequence[Path]) -> list[Case]:
    """Expand files and folders into cases, in the order given, folders sorted.

    A folder becomes its volume and slice files and DICOM series folders (a folder holding DICOM
    files is one case), recursively; hidden entries are skipped, every other file is a case
    (an unknown type fails with its reason).
    Anything given explicitly that is not usable (missing path, unknown type, a folder with
    nothing usable) still becomes a case, so that reading it gives its own error and a batch
    reports it and goes on. The same path is listed once. Names that collide get ``-2``,
    ``-3``, ... in order (logged), so outputs never overwrite each other.
    """
    paths: list[Path] = []
    for given in inputs:
        given = Path(given)
        if given.is_dir():
            expanded = _expand_folder(given)
            paths.extend(expanded or [given])
        else:
            paths.append(given)
    cases: list[Case] = []
    seen_paths: set[Path] = set()
    seen_names: dict[str, int] = {}
    for path in paths:
        key = Path(os.path.abspath(path))
        if key in seen_paths:
            continue
        seen_paths.add(key)
        name = case_name(path)
        count = seen_names.get(name, 0) + 1
        seen_names[name] = count
        if count > 1:
            unique = f"{name}-{count}"
            while unique in seen_names:
                count += 1
                unique = f"{name}-{count}"
            seen_names[name] = count
            seen_names[unique] = 1
            logger.warning("%s: case name %r already used; named %r", path, name, unique)
            name = unique
        cases.append(Case(path=path, name=name))
    return cases


__all__ = [
    "Case",
    "NiftiGeometry",
    "SliceGeometry",
    "case_name",
    "find_cases",
    "read_image",
    "world_affine",
    "write_mask",
]
