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
    assert (low, high) == (-1250.0, 250.0)  # Lyu et al., section IV-A
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


def test_calibrate_puts_slices_exported_with_different_windows_on_one_scale():
    # one phantom slice exported twice, with the paper's lung window and with a darker, wider one
    # (COVID-SemiSeg's two parts differ like this); calibrated, both land on the same scale
    from plsynth.data.lungs import lung_field, lung_mask
    from plsynth.data.phantom import make_phantom
    from plsynth.data.window import calibrate_slices

    p = make_phantom(3, (12, 160, 160), lesions=True)
    z = int(np.argmax((p.lung > 0).sum(axis=(1, 2))))
    units = []
    for low, high in ((-1250.0, 250.0), (-1100.0, 900.0)):
        grey = np.rint(window_array(p.hu[z], (low, high)) * 255.0).astype(np.float32)
        image = CTImage(array=grey[None], kind="uint8", spacing=None, source=Path("s.png"))
        lung = lung_field(image, lung_mask(image))
        units.append((to_unit(image), to_unit(image, intensity="calibrate", lung=lung)))
    (raw_a, cal_a), (raw_b, cal_b) = units
    body = window_array(p.hu[z]) > 0.05
    assert np.abs(raw_a - raw_b)[0][body].mean() > 0.1  # the exports really differ
    assert np.abs(cal_a - cal_b)[0][body].mean() < 0.1 * np.abs(raw_a - raw_b)[0][body].mean()
    # the paper's window is already right: calibration moves it little
    assert np.abs(cal_a - raw_a)[0][body].mean() < 0.05
    # HU volumes are calibrated already; a slice without tissue is left alone
    flat = np.full((1, 32, 32), 0.5, np.float32)
    assert np.array_equal(calibrate_slices(flat, np.ones((1, 32, 32), np.uint8)), flat)
    with pytest.raises(ValueError, match="lung"):
        to_unit(CTImage(array=grey[None], kind="uint8", spacing=None, source=Path("s.png")), intensity="calibrate")
