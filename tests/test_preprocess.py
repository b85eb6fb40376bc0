"""The one slice preprocessing: shapes, ranges, lung masking, label resizing and its inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plsynth.data.preprocess import SLAB, resize_labels, to_input_grid, to_model_input


def _volume(z=3, y=33, x=63, seed=0):
    rng = np.random.default_rng(seed)
    unit = rng.random((z, y, x), dtype=np.float32)
    lung = np.zeros((z, y, x), dtype=np.uint8)
    lung[:, 5:25, 5:30] = 2  # patient's right lung: smaller x
    lung[:, 5:25, 33:58] = 1  # patient's left lung: larger x
    return unit, lung


def test_model_input_has_the_contract_shape_dtype_and_range():
    unit, lung = _volume()
    out = to_model_input(unit, lung, 32, "none")
    assert out.shape == (3, 1, 32, 32) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_same_size_input_passes_through_unchanged():
    unit, lung = _volume(y=32, x=32)
    np.testing.assert_array_equal(to_model_input(unit, lung, 32, "none")[:, 0], unit)


def test_mask_handling_zeroes_outside_the_lung_before_resizing():
    unit = np.ones((2, 32, 32), dtype=np.float32)
    lung = np.zeros((2, 32, 32), dtype=np.uint8)
    lung[:, 8:24, 8:24] = 1
    masked = to_model_input(unit, lung, 32, "mask")[:, 0]
    np.testing.assert_array_equal(masked, (lung > 0).astype(np.float32))
    assert to_model_input(unit, lung, 32, "none").min() == 1.0
    # Down-sized, the lung interior stays 1 and the far background stays 0.
    small = to_model_input(unit, lung, 16, "mask")[:, 0]
    np.testing.assert_allclose(small[:, 8, 8], 1.0, atol=1e-6)
    assert (small[:, 0, 0] == 0.0).all()


def test_unknown_lung_handling_is_rejected():
    unit, lung = _volume()
    with pytest.raises(ValueError, match="lung_handling"):
        to_model_input(unit, lung, 32, "crop")
    with pytest.raises(ValueError, match="lung mask shape"):
        to_model_input(unit, lung[:, :-1], 32, "none")


def test_bilinear_resize_matches_torch_with_antialias_when_shrinking():
    unit, lung = _volume(z=2, y=70, x=90)
    out = to_model_input(unit, lung, 32, "none")
    ref = F.interpolate(torch.from_numpy(unit)[:, None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-6)


def test_resize_labels_is_nearest_and_keeps_the_label_set_and_dtype():
    _, lung = _volume(y=37, x=53)
    out = resize_labels(lung, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 1, 2}
    ref = F.interpolate(torch.from_numpy(lung).float()[:, None], size=(64, 64), mode="nearest-exact")
    np.testing.assert_array_equal(out, ref[:, 0].numpy().astype(np.uint8))
    # Left stays on the larger-x side after resizing.
    assert np.argwhere(out == 1)[:, 2].min() > np.argwhere(out == 2)[:, 2].max()


def test_to_input_grid_inverts_the_resize_of_a_smooth_image():
    yy, xx = np.mgrid[0:48, 0:80].astype(np.float32)
    smooth = np.stack([(xx / 79.0) * 0.5 + (yy / 47.0) * 0.5] * 2)  # a linear ramp survives resampling
    lung = np.ones_like(smooth, dtype=np.uint8)
    small = to_model_input(smooth, lung, 64, "none")[:, 0]
    back = to_input_grid(small, (48, 80))
    assert back.shape == (2, 48, 80) and back.dtype == np.float32
    # Away from the borders (where bilinear clamps), the round trip is close to identity.
    np.testing.assert_allclose(back[:, 4:-4, 4:-4], smooth[:, 4:-4, 4:-4], atol=0.02)


def test_a_mask_round_trip_through_probabilities_keeps_its_dice():
    from plsynth.metrics import dice

    mask = np.zeros((1, 120, 90), dtype=np.uint8)
    mask[0, 30:90, 20:70] = 1
    small = to_model_input(mask.astype(np.float32), np.ones_like(mask), 64, "none")[:, 0]
    back = to_input_grid(small, (120, 90)) >= 0.5
    assert dice(back, mask) > 0.97


def test_volumes_longer_than_one_slab_are_processed_whole():
    unit, lung = _volume(z=SLAB + 5, y=20, x=24)
    unit[-1] = 0.25
    out = to_model_input(unit, lung, 16, "none")
    assert out.shape == (SLAB + 5, 1, 16, 16)
    np.testing.assert_allclose(out[-1], 0.25, atol=1e-6)
    assert resize_labels(lung, 16).shape == (SLAB + 5, 16, 16)
    assert to_input_grid(out[:, 0], (20, 24)).shape == (SLAB + 5, 20, 24)
