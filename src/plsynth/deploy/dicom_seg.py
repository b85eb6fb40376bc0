"""DICOM Segmentation (SEG) output for DICOM inputs, written with highdicom.

PACS and viewers that speak only DICOM take the result as a SEG object in the source study:
one binary segment for the infection and one for the lungs, one frame per source slice (empty
frames omitted), each frame referencing its source image (SOP Instance UID) and carrying its
plane position, so it lands on the source geometry. The SEG copies the source's patient and
study module (it must, to be filed with the study); nothing of it goes into a log or the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plsynth.atomic import atomic_write
from plsynth.errors import InputError

SEGMENTS = ("infection", "lungs")  # segment numbers 1 and 2
MANUFACTURER = "plsynth"
MODEL_NAME = "plsynth-infer"


def _descriptions(algorithm_version: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="plsynth semi-supervised COVID-19 infection segmenter", version=algorithm_version,
        family=codes.cid7162.ArtificialIntelligence,
    )
    infection = hd.seg.SegmentDescription(
        segment_number=1, segment_label="COVID-19 infection",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Lung],
    )
    lungs = hd.seg.SegmentDescription(
        segment_number=2, segment_label="Lungs",
        segmented_property_category=codes.SCT.Organ, segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
    )
    return [infection, lungs]


def _in_series_order(mask: np.ndarray, like) -> np.ndarray:
    """A (z, y, x) LPS mask back in the series' own order: (slice as in ``geometry.files``, row, column)."""
    import SimpleITK as sitk

    from plsynth.data.dicom import in_original_orientation

    return sitk.GetArrayFromImage(in_original_orientation(mask, like.geometry))


def write_dicom_seg(infection: np.ndarray, lung: np.ndarray, like, path: Path, algorithm_version: str = "unknown") -> Path:
    """Write ``OUT/<name>.seg.dcm`` for a DICOM input: segments infection (1) and lungs (2); returns ``path``.

    ``infection`` 0/1 and ``lung`` 0/1/2 (left/right) are on the CTImage grid (z, y, x). The
    source files' headers are read again (no pixel data) for the references; written atomically.
    """
    import highdicom as hd
    import pydicom

    geometry = like.geometry
    files = list(getattr(geometry, "files", ()))
    if not files:
        raise InputError(like.source, "a DICOM SEG needs a DICOM series input")
    sources = [pydicom.dcmread(name, stop_before_pixels=True) for name in files]
    stacked = np.stack([_in_series_order(infection > 0, like), _in_series_order(lung > 0, like)], axis=-1)
    if stacked.shape[:3] != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(f"{like.source}: mask {stacked.shape[:3]} does not match the series "
                         f"({len(sources)} x {sources[0].Rows} x {sources[0].Columns})")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stacked.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(algorithm_version),
        series_instance_uid=hd.UID(),
        series_number=9701,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=str(algorithm_version),
        device_serial_number="0",
        series_description="plsynth infection and lungs",
        content_label="PLSYNTH",
        content_description="COVID-19 infection and lungs",
    )
    with atomic_write(path) as tmp:
        seg.save_as(tmp)
    return Path(path)


__all__ = ["SEGMENTS", "write_dicom_seg"]
