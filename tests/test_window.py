"""Intensity window: the paper's HU window [-1250, 250] linearly to [0, 1]; 8-bit slices / 255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plsynth.data.image import CTImage
from plsynth.data.window import PAPER_WINDOW_HU, to_unit, unit_to_hu, window_array


def _hu_image(values: np.ndarray) -> CTImage:
    return CTImage(values.astype(np.float32).reshape(1, 1, -1), "hu", (1.0, 1.0, 1.0), Path("v.nii.gz"))


def test_paper_window_maps_ends_and_midpoint_linearly() -> None:
    low, high = PAPER_WINDOW_HU
    assert (low, high) == (-1250.0, 250.0)  # Zhang et al., section IV-A
    hu = np.array([low, high, (low + high) / 2, low + 0.25 * (high - low)])
    unit = to_unit(_hu_image(hu))
    assert unit.dtype == np.float32 and unit.shape == (1, 1, 4)
    np.testing.assert_allclose(unit.ravel(), [0.0, 1.0, 0.5, 0.25], atol=1e-6)


def test_values_outside_the_window_are_clipped() -> None:
    unit = to_unit(_hu_image(np.array([-3024.0, -1251.0, 251.0, 3071.0])))
    np.testing.assert_array_equal(unit.ravel(), [0.0, 0.0, 1.0, 1.0])


def test_custom_window_and_inverse_round_trip_inside_the_window() -> None:
    window = (-1000.0, 500.0)
    hu = np.linspace(-1000.0, 500.0, 31, dtype=np.float32).reshape(31, 1)
    unit = window_array(hu, window)
    assert unit.shape == hu.shape
    np.testing.assert_allclose(unit[10, 0], 10 / 30, atol=1e-6)
    np.testing.assert_allclose(unit_to_hu(unit, window), hu, atol=1e-3)


def test_uint8_slices_are_divided_by_255_whatever_the_window() -> None:
    values = np.array([0, 1, 128, 255], dtype=np.float32).reshape(1, 1, 4)
    image = CTImage(values, "uint8", None, Path("s.png"))
    expected = values / 255.0
    np.testing.assert_allclose(to_unit(image), expected, atol=1e-7)
    np.testing.assert_allclose(to_unit(image, (-1000.0, 400.0)), expected, atol=1e-7)  # window unknown: ignored


@pytest.mark.parametrize("window", [(250.0, -1250.0), (0.0, 0.0), (float("nan"), 1.0)])
def test_bad_window_is_a_value_error(window: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="window_hu"):
        window_array(np.zeros(3), window)
