"""Inputs are checked before any large allocation, and nothing usable is skipped without a word.

Each test reproduces a fault seen on the old main: a 90-byte .nii.gz claiming a billion voxels
(2.5 GB before failing), a .nii.gz whose gzip CRC fails (segmented and reported ok), a DICOM
series with a missing slice (wrong spacing, exit 0), an MR series read as CT numbers, and
.mha / .nii.bz2 files, symlinked DICOM folders and folders named like files skipped at INFO level.
"""

from __future__ import annotations

import bz2
import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from plsynth.data.io import find_cases, read_image, write_mask
from plsynth.errors import InputError
from test_io import RAS, _hu, _write_series


def _header_only_gz(path: Path, shape=(1024, 1024, 1000)) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw))
    return path


def test_a_header_claiming_a_billion_voxels_is_refused_before_reading(tmp_path: Path):
    path = _header_only_gz(tmp_path / "huge.nii.gz")
    assert path.stat().st_size < 200
    # peak RSS from VmHWM: ru_maxrss survives execve on Linux, so it would report the forking pytest's size
    code = ("import re, sys; from pathlib import Path; from plsynth.data.io import read_image; from plsynth.errors import InputError\n"
            "try:\n    read_image(sys.argv[1])\nexcept InputError as e:\n    print(e)\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    message, peak_kb = done.stdout.strip().splitlines()
    assert "1024x1024x1000" in message and "--max-voxels" in message
    assert int(peak_kb) < 600_000, f"peak memory {int(peak_kb) // 1024} MB: something allocated the declared volume"


def test_the_voxel_cap_is_configurable_and_a_short_stream_is_refused(tmp_path: Path):
    path = _header_only_gz(tmp_path / "short.nii.gz", shape=(64, 64, 8))
    with pytest.raises(InputError, match="truncated NIfTI: the header declares"):
        read_image(path)  # under the cap, but the stream holds only the header
    nib.save(nib.Nifti1Image(_hu((7, 9, 5), 1), RAS), tmp_path / "ok.nii.gz")
    assert read_image(tmp_path / "ok.nii.gz").array.shape == (5, 9, 7)
    with pytest.raises(InputError, match="more than the limit 100"):
        read_image(tmp_path / "ok.nii.gz", max_voxels=100)


def test_a_gzip_crc_failure_is_refused(tmp_path: Path):
    path = tmp_path / "crc.nii.gz"
    nib.save(nib.Nifti1Image(_hu((64, 64, 40), 2), RAS), path)  # large enough that nibabel stops before the trailer
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the CRC32 field of the gzip trailer: the voxels decompress fine, the check fails
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="CRC"):
        read_image(path)


def test_a_dicom_series_with_a_missing_slice_is_refused_with_the_reason(tmp_path: Path):
    folder = tmp_path / "gap"
    _write_series(folder, _hu((6, 8, 8), 3), "1.2.826.0.1.3680043.2.1125.301")
    sorted(folder.iterdir())[3].unlink()
    with pytest.raises(InputError, match=r"not uniform \(5 mm between slices 3 and 4, 2.5 mm elsewhere\)"):
        read_image(folder)


def test_an_mr_series_is_refused(tmp_path: Path):
    folder = tmp_path / "mr"
    _write_series(folder, _hu((3, 8, 8), 4), "1.2.826.0.1.3680043.2.1125.302", modality="MR")
    with pytest.raises(InputError, match="Modality MR, not CT"):
        read_image(folder)


def test_a_dicom_series_larger_than_the_cap_is_refused_from_its_headers(tmp_path: Path):
    folder = tmp_path / "big"
    _write_series(folder, _hu((3, 8, 8), 5), "1.2.826.0.1.3680043.2.1125.303")
    with pytest.raises(InputError, match="8x8x3 = 192 voxels, more than the limit 100"):
        read_image(folder, max_voxels=100)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_metaimage_and_nrrd_are_read_through_simpleitk_and_masks_land_on_their_grid(tmp_path: Path, suffix: str):
    hu = _hu((5, 6, 7), 6)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-3.0, 4.0, 10.0))
    image.SetDirection((-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))  # stored right-to-left: reoriented to LPS on reading
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(image, str(path))
    ct = read_image(path)
    assert ct.array.shape == hu.shape and ct.spacing == pytest.approx((2.5, 0.8, 0.7))
    np.testing.assert_array_equal(ct.array, hu[:, :, ::-1].astype(np.float32))
    mask = (ct.array > 0).astype(np.uint8)
    written = sitk.ReadImage(str(write_mask(mask, ct, tmp_path / "mask.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), (hu > 0).astype(np.uint8))
    assert written.GetOrigin() == pytest.approx(image.GetOrigin()) and written.GetDirection() == pytest.approx(image.GetDirection())
    with pytest.raises(InputError, match="more than the limit"):
        read_image(path, max_voxels=10)


def test_nii_bz2_is_read_and_its_stream_checked(tmp_path: Path):
    plain = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(_hu((7, 9, 5), 7), RAS), plain)
    packed = tmp_path / "v.nii.bz2"
    packed.write_bytes(bz2.compress(plain.read_bytes()))
    assert read_image(packed).array.shape == (5, 9, 7)
    (tmp_path / "cut.nii.bz2").write_bytes(packed.read_bytes()[:-40])
    with pytest.raises(InputError, match="bzip2"):
        read_image(tmp_path / "cut.nii.bz2")


def test_find_cases_reports_what_it_once_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "in"
    (root / "fake.nii.gz").mkdir(parents=True)  # a folder named like a file
    (root / "fake.nii.gz" / "x.txt").write_text("x")
    sitk.WriteImage(sitk.GetImageFromArray(_hu((3, 4, 4), 8)), str(root / "a.mha"))
    (root / "b.nii.bz2").write_bytes(b"")
    series = tmp_path / "elsewhere" / "series"
    _write_series(series, _hu((3, 4, 4), 9), "1.2.826.0.1.3680043.2.1125.304")
    os.symlink(series, root / "linked")
    os.symlink(root, root / "loop")  # a symbolic link loop is walked once
    (root / "notes.txt").write_text("skipped, with a warning naming it")
    cases = {c.name: c.path for c in find_cases([root])}
    assert set(cases) == {"fake", "a", "b", "linked"}
    assert "notes.txt" in caplog.text
    with pytest.raises(InputError, match="is a folder"):
        read_image(cases["fake"])
    assert read_image(cases["linked"]).array.shape == (3, 4, 4)


def test_a_slice_larger_than_the_cap_is_refused_from_its_header(tmp_path: Path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "s.png")
    assert read_image(tmp_path / "s.png").array.shape == (1, 20, 30)
    with pytest.raises(InputError, match="30x20 = 600 voxels, more than the limit 100"):
        read_image(tmp_path / "s.png", max_voxels=100)
