"""CT input/output: NIfTI in any orientation, DICOM series folders, 8-bit slices, exact mask write-back."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from plsynth.data.io import Case, find_cases, read_image, world_affine, write_mask
from plsynth.errors import InputError

SHAPE = (7, 9, 5)  # NIfTI (i, j, k); odd sizes so flips and transposes cannot hide
RAS = np.array([[0.8, 0, 0, -3.0], [0, 0.9, 0, -4.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])
LPS = np.array([[-0.8, 0, 0, 3.0], [0, -0.9, 0, 4.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])


def _oblique() -> np.ndarray:
    """20 degrees about z and 10 about x, axes permuted (i runs superior): closest axes are not i, j, k."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    permute = np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ permute @ np.diag([0.7, 1.1, 2.0])
    affine[:3, 3] = [5.0, -6.0, 7.0]
    return affine


def _save_nifti(path: Path, raw: np.ndarray, affine: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> Path:
    image = nib.Nifti1Image(raw, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_slope_inter(slope, inter)
    image.header["descrip"] = b"test volume"
    nib.save(image, path)
    return path


def _raw_header(path: Path) -> nib.Nifti1Header:
    """The header fields exactly as stored (nibabel's loaded header forgets scl_slope/inter)."""
    with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as handle:
        return nib.Nifti1Header.from_fileobj(handle)


CASES = {
    "ras-int16": (RAS, np.int16, 1.0, 0.0),
    "lps-int16-scaled": (LPS, np.int16, 1.0, -1024.0),
    "oblique-int16-slope2": (_oblique(), np.int16, 2.0, -1000.0),
    "ras-uint16-scaled": (RAS, np.uint16, 1.0, -1024.0),
    "lps-float32": (LPS, np.float32, 1.0, 0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mask_round_trip_keeps_geometry_and_world_position(tmp_path: Path, case: str) -> None:
    affine, dtype, slope, inter = CASES[case]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 2000, SHAPE).astype(dtype)
    path = _save_nifti(tmp_path / "ct.nii.gz", raw, affine, slope, inter)
    hu = raw.astype(np.float64) * slope + inter  # what the voxels mean

    image = read_image(path)
    assert image.kind == "hu" and image.array.dtype == np.float32
    assert sorted(image.array.shape) == sorted(SHAPE)
    np.testing.assert_array_equal(np.sort(image.array.ravel()), np.sort(hu.ravel()).astype(np.float32))  # exact HU

    # A voxel chosen in the CTImage grid: the mask lands at the same world point, over the same CT voxel.
    zyx = (1, image.array.shape[1] - 2, 3)
    mask = np.zeros(image.array.shape, np.uint8)
    mask[zyx] = 1
    out = write_mask(mask, image, tmp_path / "mask.nii.gz")
    written = nib.load(out)
    assert written.shape == SHAPE
    np.testing.assert_array_equal(written.affine, nib.load(path).affine)
    data = np.asarray(written.dataobj)
    assert data.dtype == np.uint8 and int(data.sum()) == 1
    ijk = tuple(int(v) for v in np.argwhere(data == 1)[0])
    world_from_mask = written.affine @ np.array([*ijk, 1.0])
    world_from_image = world_affine(image) @ np.array([*zyx, 1.0])
    np.testing.assert_allclose(world_from_mask, world_from_image, atol=1e-6)
    assert image.array[zyx] == np.float32(hu[ijk])

    before, after = _raw_header(path), _raw_header(out)
    for field in ("dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                  "qoffset_x", "srow_x", "srow_y", "srow_z", "xyzt_units", "descrip"):
        np.testing.assert_array_equal(after[field], before[field], err_msg=field)
    assert after.get_data_dtype() == np.uint8
    assert after["scl_slope"] in (0, 1) or np.isnan(after["scl_slope"])  # no scaling: labels are exact
    assert after["scl_inter"] == 0 or np.isnan(after["scl_inter"])


def test_spacing_follows_the_lps_axes(tmp_path: Path) -> None:
    path = _save_nifti(tmp_path / "ct.nii", np.zeros(SHAPE, np.int16), RAS)
    image = read_image(path)
    assert image.array.shape == (5, 9, 7)  # (z, y, x) from (i, j, k) along R, A, S
    assert image.spacing == pytest.approx((2.5, 0.9, 0.8))
    assert image.voxel_volume_ml == pytest.approx(2.5 * 0.9 * 0.8 / 1000)


@pytest.mark.parametrize("affine", [RAS, LPS, _oblique()], ids=["ras", "lps", "oblique"])
def test_blob_on_patient_left_ends_at_larger_x_index(tmp_path: Path, affine: np.ndarray) -> None:
    shape = (21, 21, 21)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = (affine[:3, :3] @ grid.T).T + affine[:3, 3]
    centre = world.mean(axis=0)
    left = centre + np.array([-6.0, 0.0, 0.0])  # RAS world: patient's left is -x
    raw = np.full(shape, -1000, np.int16)
    raw.reshape(-1)[np.linalg.norm(world - left, axis=1) < 3.0] = 500
    image = read_image(_save_nifti(tmp_path / "blob.nii.gz", raw, affine))
    x_of_blob = np.argwhere(image.array > 0)[:, 2].mean()
    assert x_of_blob > image.array.shape[2] / 2 + 2


def test_trailing_singleton_dimension_is_squeezed_and_kept_on_write(tmp_path: Path) -> None:
    raw = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(*SHAPE, 1)
    path = _save_nifti(tmp_path / "ct4d.nii.gz", raw, RAS)
    image = read_image(path)
    assert image.array.ndim == 3 and image.array.shape == (5, 9, 7)
    out = write_mask(np.ones(image.array.shape, np.uint8), image, tmp_path / "m.nii.gz")
    assert nib.load(out).shape == (*SHAPE, 1)


def test_partial_nan_is_replaced_by_lowest_finite_value(tmp_path: Path) -> None:
    raw = np.linspace(-1000, 100, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    raw[0, 0, 0] = np.nan
    image = read_image(_save_nifti(tmp_path / "nan.nii", raw, RAS))
    assert np.isfinite(image.array).all()
    assert image.array.min() == pytest.approx(float(np.nanmin(raw)))


def test_write_mask_rejects_wrong_shape_values_and_suffix(tmp_path: Path) -> None:
    image = read_image(_save_nifti(tmp_path / "ct.nii.gz", np.zeros(SHAPE, np.int16), RAS))
    with pytest.raises(ValueError, match="shape"):
        write_mask(np.zeros((5, 9, 6), np.uint8), image, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="0..255"):
        write_mask(np.full(image.array.shape, 0.5), image, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match=".nii"):
        write_mask(np.zeros(image.array.shape, np.uint8), image, tmp_path / "m.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


# ----------------------------------------------------------------------------------------- DICOM

PATIENT = "Recognizable^Patientname"


def _write_series(folder: Path, hu: np.ndarray, uid: str, spacing=(0.7, 0.8, 2.5), flip_x: bool = False,
                  modality: str = "CT") -> None:
    """A CT series written with SimpleITK, RescaleIntercept -1024 (GDCM stores HU + 1024), a patient name set."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(hu.astype(np.int16))
    volume.SetSpacing(spacing)
    volume.SetOrigin((-10.0, -20.0, 30.0))
    row = (-1.0, 0.0, 0.0) if flip_x else (1.0, 0.0, 0.0)
    volume.SetDirection((*row, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[0]):
        slice_ = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0010|0010": PATIENT, "0010|0020": "ID-Recognizable", "0008|0060": modality,
            "0020|000e": uid, "0008|0018": f"{uid}.{k + 1}", "0020|0013": str(k + 1),
            "0020|000d": f"{uid}.0", "0020|0052": f"{uid}.9",  # one study, one frame of reference
            "0020|0037": "\\".join(str(v) for v in (*row, 0.0, 1.0, 0.0)),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0028|1052": "-1024", "0028|1053": "1", "0018|0050": str(spacing[2]),
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(slice_)


def _hu(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1500, shape).astype(np.int16)


def test_dicom_series_reads_hu_and_spacing_and_mask_overlays(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hu = _hu((4, 6, 5), 1)
    folder = tmp_path / "series"
    _write_series(folder, hu, "1.2.826.0.1.3680043.2.1125.100")
    image = read_image(folder)
    assert image.kind == "hu" and image.array.shape == hu.shape
    np.testing.assert_array_equal(image.array, hu.astype(np.float32))
    assert image.spacing == pytest.approx((2.5, 0.8, 0.7))

    mask = np.zeros(hu.shape, np.uint8)
    mask[2, 3, 4] = 1
    out = write_mask(mask, image, tmp_path / "out" / "series.nii.gz")
    written = nib.load(out)
    ijk = tuple(np.argwhere(np.asarray(written.dataobj) == 1)[0])
    np.testing.assert_allclose(written.affine @ [*ijk, 1], world_affine(image) @ [2, 3, 4, 1], atol=1e-4)
    # The same world point as SimpleITK puts that CT voxel (LPS world; NIfTI is RAS: x and y negated).
    lps = sitk.ReadImage([str(p) for p in sorted(folder.iterdir())]).TransformIndexToPhysicalPoint((4, 3, 2))
    np.testing.assert_allclose((written.affine @ [*ijk, 1])[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)
    assert PATIENT not in caplog.text and "Recognizable" not in caplog.text


def test_dicom_series_stored_right_to_left_is_reoriented_to_lps(tmp_path: Path) -> None:
    hu = _hu((3, 4, 6), 2)
    folder = tmp_path / "flipped"
    _write_series(folder, hu, "1.2.826.0.1.3680043.2.1125.200", flip_x=True)
    image = read_image(folder)
    np.testing.assert_array_equal(image.array, hu[:, :, ::-1].astype(np.float32))  # x now runs to the left
    mask = (image.array > 0).astype(np.uint8)
    out = write_mask(mask, image, tmp_path / "flipped.nii")
    # Written in the series' own voxel order and geometry, as SimpleITK reads the series itself
    # (row direction -x and column +y make the slice normal -z, so GDCM stacks slices top down).
    series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    written = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), (sitk.GetArrayFromImage(series) > 0).astype(np.uint8))
    np.testing.assert_allclose(written.GetDirection(), series.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), series.GetSpacing(), atol=1e-6)


def test_two_series_in_one_folder_pick_most_files_and_honour_override(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "study"
    big, small = "1.2.826.0.1.3680043.2.1125.900", "1.2.826.0.1.3680043.2.1125.300"
    _write_series(folder, _hu((4, 5, 5), 3), big)
    _write_series(folder, _hu((3, 5, 5), 4), small)
    assert read_image(folder).array.shape[0] == 4  # most files wins, although its UID sorts last
    assert big in caplog.text and "most files" in caplog.text
    assert read_image(folder, series_uid=small).array.shape[0] == 3
    with pytest.raises(InputError, match="not found; available series") as error:
        read_image(folder, series_uid="1.2.3")
    assert big in str(error.value) and small in str(error.value) and error.value.path == folder
    assert PATIENT not in caplog.text and "Recognizable" not in caplog.text


def test_equal_series_are_chosen_by_smallest_uid(tmp_path: Path) -> None:
    folder = tmp_path / "tie"
    _write_series(folder, np.full((3, 4, 4), 100, np.int16), "1.2.826.0.1.3680043.2.1125.555")
    _write_series(folder, np.full((3, 4, 4), -100, np.int16), "1.2.826.0.1.3680043.2.1125.444")
    assert read_image(folder).array.max() == -100.0


# ----------------------------------------------------------------------------------------- slices


def test_png_slice_reads_as_uint8_and_mask_is_written_at_input_size(tmp_path: Path) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (33, 63), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "slice.png")
    image = read_image(tmp_path / "slice.png")
    assert image.kind == "uint8" and image.spacing is None and image.array.shape == (1, 33, 63)
    np.testing.assert_array_equal(image.array[0], pixels.astype(np.float32))

    mask = (image.array > 128).astype(np.uint8)
    out = write_mask(mask, image, tmp_path / "out" / "slice.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), mask[0] * 255)
    labels = np.zeros((33, 63), np.uint8)
    labels[:, 40:] = 3
    np.testing.assert_array_equal(np.asarray(Image.open(write_mask(labels, image, tmp_path / "l.png"))), labels)
    left_lung_only = (image.array[0] > 128).astype(np.uint8)  # a lung mask that happens to hold label 1 only
    raw = write_mask(left_lung_only, image, tmp_path / "lung.png", scale_binary_png=False)
    np.testing.assert_array_equal(np.asarray(Image.open(raw)), left_lung_only)
    with pytest.raises(ValueError, match="labels up to 3"):
        write_mask(labels, image, tmp_path / "x.png", scale_binary_png=True)


def test_rgb_png_and_jpg_slices_become_greyscale(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))  # 20 x 25, smooth so JPEG stays close
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.jpg", quality=95)
    png = read_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(png.array[0], grey)
    jpg = read_image(tmp_path / "rgb.jpg")
    assert jpg.array.shape == (1, 20, 25) and jpg.kind == "uint8"
    assert np.abs(jpg.array[0] - grey).mean() < 3.0  # JPEG is lossy
    with pytest.raises(ValueError, match="png"):
        write_mask(np.zeros((20, 25), np.uint8), jpg, tmp_path / "m.jpg")


# ----------------------------------------------------------------------------------------- bad inputs


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = _save_nifti(tmp / "good.nii.gz", np.zeros((20, 20, 20), np.int16), RAS)
    data = good.read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    plain = _save_nifti(tmp / "plain.nii", np.zeros(SHAPE, np.int16), RAS)
    (tmp / "truncated.nii").write_bytes(plain.read_bytes()[:400])
    (tmp / "empty.nii.gz").write_bytes(b"")
    (tmp / "garbage.nii").write_bytes(b"not a nifti at all" * 40)
    (tmp / "folder.nii.gz").mkdir()
    (tmp / "nodicom").mkdir()
    (tmp / "nodicom" / "readme.txt").write_text("hello")
    (tmp / "emptydir").mkdir()
    (tmp / "notes.txt").write_text("hello")
    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.float32), np.eye(4)), tmp / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 2), np.float32), np.eye(4)), tmp / "time.nii.gz")
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), tmp / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), np.eye(4)), tmp / "voxel.nii.gz")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp / "deep.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp / "cut.png")
    (tmp / "cut.png").write_bytes((tmp / "cut.png").read_bytes()[:40])
    return {
        "missing": (tmp / "missing.nii.gz", "not found"),
        "truncated gzip": (tmp / "truncated.nii.gz", "truncated gzip"),
        "truncated nii": (tmp / "truncated.nii", "truncated"),
        "empty": (tmp / "empty.nii.gz", "empty file"),
        "not nifti": (tmp / "garbage.nii", "not a NIfTI"),
        "folder like file": (tmp / "folder.nii.gz", "is a folder"),
        "folder without dicom": (tmp / "nodicom", "no DICOM"),
        "empty folder": (tmp / "emptydir", "empty folder"),
        "unknown type": (tmp / "notes.txt", "unknown file type"),
        "2D": (tmp / "flat.nii.gz", "2D NIfTI"),
        "4D": (tmp / "time.nii.gz", "4D NIfTI"),
        "all NaN": (tmp / "nan.nii.gz", "NaN"),
        "one voxel": (tmp / "voxel.nii.gz", "single voxel"),
        "16-bit png": (tmp / "deep.png", "8-bit"),
        "truncated png": (tmp / "cut.png", "unreadable or truncated"),
    }


def test_every_bad_input_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    for label, (path, problem) in _bad_inputs(tmp_path).items():
        with pytest.raises(InputError) as error:
            read_image(path)
        assert error.value.path == path, label
        assert str(path) in str(error.value), label
        assert problem in error.value.problem, f"{label}: {error.value.problem}"


# ----------------------------------------------------------------------------------------- cases


def test_find_cases_expands_folders_in_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    _save_nifti(root / "b.nii.gz", np.zeros(SHAPE, np.int16), RAS)
    _save_nifti(root / "a.nii", np.zeros(SHAPE, np.int16), RAS)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "c.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "d.JPG")
    (root / "notes.txt").write_text("ignored inside folders")
    (root / ".tmp-1234-e.nii.gz").write_bytes(b"leftover of a killed writer")
    _write_series(root / "patient1" / "ct", _hu((2, 4, 4), 6), "1.2.826.0.1.3680043.2.1125.700")
    missing = tmp_path / "missing.nii.gz"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = find_cases([root, missing, empty, root / "a.nii"])
    assert cases == [
        Case(root / "a.nii", "a"),
        Case(root / "b.nii.gz", "b"),
        Case(root / "c.png", "c"),
        Case(root / "d.JPG", "d"),
        Case(root / "patient1" / "ct", "ct"),
        Case(missing, "missing"),  # unusable inputs stay cases, so reading them reports the error
        Case(empty, "empty"),
    ]
    assert read_image(cases[4].path).array.shape == (2, 4, 4)


def test_find_cases_gives_colliding_names_a_number(tmp_path: Path) -> None:
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        _save_nifti(tmp_path / sub / "scan.nii.gz", np.zeros(SHAPE, np.int16), RAS)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x" / "scan.png")
    names = [case.name for case in find_cases([tmp_path])]
    assert sorted(names) == ["scan", "scan-2", "scan-3"]
