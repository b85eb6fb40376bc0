"""Dice and NSD: analytic cases, spacing order, the empty-mask conventions, 2D without spacing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from plsynth.metrics import dice, nsd, score_case, score_slices


def _cube(shape=(10, 10, 10), lo=3, hi=7) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[lo:hi, lo:hi, lo:hi] = 1
    return mask


def test_identical_masks_score_one():
    a = _cube()
    assert dice(a, a) == 1.0
    assert nsd(a, a, spacing=(5.0, 0.7, 0.7)) == pytest.approx(1.0)


def test_dice_of_a_cube_shifted_by_one_voxel_is_exact():
    a = _cube()  # 4 x 4 x 4 = 64 voxels
    b = np.roll(a, 1, axis=0)  # overlap 3 x 4 x 4 = 48 voxels
    assert dice(b, a) == pytest.approx(2 * 48 / (64 + 64))


def test_nsd_of_a_cube_shifted_along_a_2mm_axis_depends_on_the_tolerance():
    a = _cube()
    b = np.roll(a, 1, axis=0)
    spacing = (2.0, 1.0, 1.0)
    # The two faces across the shift are 2 mm apart; the four side faces overlap except at the ends.
    tight = nsd(b, a, spacing, tolerance_mm=1.0)
    assert tight < 1.0
    # Continuous geometry: side faces 4 x (4 mm x 8 mm) = 128 mm2 of each cube's 160 mm2 surface are
    # within 1 mm, so 0.8; the surfel discretisation differs only at the cube's edges.
    assert tight == pytest.approx(128 / 160, abs=0.05)
    assert nsd(b, a, spacing, tolerance_mm=2.5) == pytest.approx(1.0)
    assert nsd(b, a, spacing, tolerance_mm=2.5) > tight


def test_nsd_reads_spacing_in_array_axis_order():
    a = _cube()
    along_z = np.roll(a, 1, axis=0)
    along_x = np.roll(a, 1, axis=2)
    spacing = (0.5, 2.0, 2.0)  # thin in z, coarse in plane
    # A one-voxel shift along z is 0.5 mm: every surfel within 1 mm.
    assert nsd(along_z, a, spacing, tolerance_mm=1.0) == pytest.approx(1.0)
    # The same shift along x is 2 mm: not all within 1 mm, but all within 2 mm.
    assert nsd(along_x, a, spacing, tolerance_mm=1.0) < 0.95
    assert nsd(along_x, a, spacing, tolerance_mm=2.0) == pytest.approx(1.0)
    # Dice ignores spacing entirely.
    assert dice(along_z, a) == dice(along_x, a)


def test_both_empty_masks_score_one_and_one_empty_mask_scores_zero():
    empty = np.zeros((6, 8, 8), dtype=np.uint8)
    full = _cube((6, 8, 8), 2, 5)
    assert dice(empty, empty) == 1.0
    assert nsd(empty, empty, (1.0, 1.0, 1.0)) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert nsd(full, empty, (1.0, 1.0, 1.0)) == 0.0 and nsd(empty, full, None) == 0.0
    assert score_case(empty, empty, None) == {"dice": 1.0, "nsd": 1.0}


def test_2d_square_shifted_one_pixel_without_spacing_uses_a_one_pixel_tolerance():
    a = np.zeros((12, 13), dtype=bool)
    a[3:8, 3:8] = True
    b = np.roll(a, 1, axis=1)
    assert dice(b, a) == pytest.approx(2 * 20 / 50)
    # Contour of 4 sides x 5 px: the 2 sides along the shift coincide, the 2 across it are 1 px
    # apart, so 10 of 20 within any tolerance below 1 px, and all of it at the default 1 px.
    assert nsd(b, a, None, tolerance_mm=0.5) == pytest.approx(10 / 20)
    assert nsd(b, a, None) == pytest.approx(1.0)
    # With a real pixel spacing of 2 mm the same shift is 2 mm: a 1 mm tolerance is too tight.
    assert nsd(b, a, (2.0, 2.0), tolerance_mm=1.0) == pytest.approx(0.5)


def test_score_slices_scores_each_slice_in_plane():
    ref = np.zeros((3, 12, 12), dtype=np.uint8)
    ref[1, 3:8, 3:8] = 1
    ref[2, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[1] = np.roll(ref[1], 1, axis=1)
    pred[2] = 0
    scores = score_slices(pred, ref, spacing=(5.0, 1.0, 1.0), tolerance_mm=0.5)
    assert scores[0] == {"dice": 1.0, "nsd": 1.0}  # both empty
    assert scores[1]["dice"] == pytest.approx(0.8) and scores[1]["nsd"] == pytest.approx(0.5)
    assert scores[2] == {"dice": 0.0, "nsd": 0.0}  # missed entirely


def test_nsd_rejects_mismatched_inputs():
    a = _cube()
    with pytest.raises(ValueError, match="shape"):
        dice(a, a[:5])
    with pytest.raises(ValueError, match="spacing"):
        nsd(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, a, None, tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="2D"):
        dice(a[None], a[None])


def test_nsd_does_not_leak_monai_deprecation_warnings():
    a = _cube()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nsd(np.roll(a, 1, axis=1), a, (1.0, 1.0, 1.0))


def test_nsd_does_not_depend_on_where_the_masks_sit_in_the_array():
    # nsd crops to the masks' bounding box; the score must equal that of the same masks placed
    # elsewhere in a larger array, including touching the array's border.
    rng = np.random.default_rng(0)
    ref = np.zeros((6, 9, 11), dtype=bool)
    ref[1:5, 2:7, 3:9] = rng.random((4, 5, 6)) > 0.3
    pred = np.roll(ref, 1, axis=2) | (rng.random(ref.shape) > 0.95)
    spacing = (2.0, 0.8, 0.8)
    inner = nsd(pred, ref, spacing, 1.0)
    big_ref = np.zeros((14, 30, 31), dtype=bool)
    big_pred = np.zeros_like(big_ref)
    big_ref[5:11, 10:19, 13:24] = ref
    big_pred[5:11, 10:19, 13:24] = pred
    assert nsd(big_pred, big_ref, spacing, 1.0) == pytest.approx(inner, abs=1e-6)
    corner_ref = np.zeros_like(big_ref)
    corner_pred = np.zeros_like(big_ref)
    corner_ref[:6, :9, :11] = ref
    corner_pred[:6, :9, :11] = pred
    assert nsd(corner_pred, corner_ref, spacing, 1.0) == pytest.approx(inner, abs=1e-6)
