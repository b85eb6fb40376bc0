"""Phantoms: deterministic, anatomically sane, written in the COVID-19-20 layout with correct affines."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from plsynth.cli import app
from plsynth.data.phantom import dataset_seed, make_phantom, phantom_paths, write_phantom_dataset

SHAPE = (16, 96, 96)


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom(seed, SHAPE) for seed in range(8)]


def test_same_seed_gives_identical_arrays_and_another_seed_differs():
    a, b, c = make_phantom(3, SHAPE), make_phantom(3, SHAPE), make_phantom(4, SHAPE)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.lung, b.lung) and np.array_equal(a.infection, b.infection)
    assert a.spacing == b.spacing
    assert not np.array_equal(a.hu, c.hu)


def test_arrays_have_the_contract_types_and_a_realistic_geometry(phantoms):
    for p in phantoms:
        assert p.hu.shape == p.lung.shape == p.infection.shape == SHAPE
        assert p.hu.dtype == np.float32 and p.lung.dtype == np.uint8 and p.infection.dtype == np.uint8
        assert p.hu.min() >= -1024 and p.hu.max() <= 3071
        assert np.array_equal(p.hu, np.rint(p.hu))  # exactly representable as int16
        assert set(np.unique(p.lung)) <= {0, 1, 2} and set(np.unique(p.infection)) <= {0, 1}
        fov = p.spacing[2] * SHAPE[2]
        assert 300 <= fov <= 420 and 1.0 <= p.spacing[0] <= 5.0


def test_lungs_are_darker_than_tissue_and_left_lung_is_at_larger_x(phantoms):
    for p in phantoms:
        healthy = (p.lung > 0) & (p.infection == 0)
        body_tissue = (p.hu > -200) & (p.hu < 200) & (p.lung == 0)
        assert np.median(p.hu[healthy]) < -700 < np.median(p.hu[body_tissue])
        left_x = np.nonzero(p.lung == 1)[2].mean()
        right_x = np.nonzero(p.lung == 2)[2].mean()
        assert left_x > SHAPE[2] / 2 > right_x


def test_lesions_lie_only_inside_lungs_and_some_volumes_are_lesion_free(phantoms):
    for p in phantoms:
        assert not np.any((p.infection > 0) & (p.lung == 0))
    assert any(p.infection.sum() == 0 for p in phantoms)
    assert any(p.infection.sum() > 0 for p in phantoms)
    assert make_phantom(0, SHAPE, lesions=False).infection.sum() == 0
    assert make_phantom(0, SHAPE, lesions=True).infection.sum() > 0


def test_some_volume_has_a_consolidation_touching_the_pleura(phantoms):
    def touches(p) -> bool:
        consolidation = (p.infection > 0) & (p.hu > -250)
        outside_lung = p.lung == 0
        near_wall = ndimage.binary_dilation(outside_lung, structure=np.ones((1, 3, 3), bool))
        return bool(np.any(consolidation & near_wall))

    assert any(touches(p) for p in phantoms)


def test_written_files_round_trip_with_lps_voxel_axes(tmp_path: Path):
    paths = write_phantom_dataset(tmp_path, n=4, seed=7, shape=(8, 40, 48))
    assert [p.name for p in paths] == [f"phantom-{i:03d}_ct.nii.gz" for i in range(4)]
    truth = make_phantom(dataset_seed(7, 0), (8, 40, 48), lesions=True, name="phantom-000")
    ct_path, seg_path, lung_path = phantom_paths(tmp_path, "phantom-000")
    ct, seg, lung = nib.load(ct_path), nib.load(seg_path), nib.load(lung_path)
    assert nib.aff2axcodes(ct.affine) == ("L", "P", "S")
    assert ct.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    assert ct.shape == (48, 40, 8)  # stored (x, y, z)
    assert np.allclose(ct.header.get_zooms(), truth.spacing[::-1])
    # reorient to LPS the way a reader would: nibabel's orientation tools, then (x, y, z) -> (z, y, x)
    to_lps = nib.orientations.ornt_transform(nib.io_orientation(ct.affine), nib.orientations.axcodes2ornt("LPS"))
    back = np.transpose(nib.orientations.apply_orientation(np.asanyarray(ct.dataobj), to_lps), (2, 1, 0))
    assert np.array_equal(back, truth.hu)
    assert np.array_equal(np.transpose(np.asanyarray(lung.dataobj), (2, 1, 0)), truth.lung)
    assert np.array_equal(np.transpose(np.asanyarray(seg.dataobj), (2, 1, 0)), truth.infection)
    # nibabel's world is RAS+ (+x toward the patient's right), so the patient-left lung has the smaller world x
    left_world_x = (lung.affine @ np.r_[np.nonzero(np.asanyarray(lung.dataobj) == 1)[0].mean(), 0, 0, 1])[0]
    right_world_x = (lung.affine @ np.r_[np.nonzero(np.asanyarray(lung.dataobj) == 2)[0].mean(), 0, 0, 1])[0]
    assert left_world_x < right_world_x
    # 4th volume is lesion-free (1 in 4)
    assert np.asanyarray(nib.load(phantom_paths(tmp_path, "phantom-003")[1]).dataobj).sum() == 0


def test_writing_again_skips_existing_files_and_leaves_no_temporaries(tmp_path: Path):
    write_phantom_dataset(tmp_path, n=2, seed=0, shape=(8, 32, 32))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    write_phantom_dataset(tmp_path, n=2, seed=0, shape=(8, 32, 32))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert len(before) == 6 and not any(p.name.startswith(".") for p in before)


def test_cli_writes_the_phantom_files(tmp_path: Path):
    result = CliRunner().invoke(app, ["data", "phantom", "--out", str(tmp_path), "--n", "2", "--seed", "1",
                                      "--shape", "8", "32", "32"])
    assert result.exit_code == 0, result.output
    for name in ("phantom-000", "phantom-001"):
        for path in phantom_paths(tmp_path, name):
            assert path.is_file()
            assert nib.load(path).shape == (32, 32, 8)


def test_large_phantom_is_possible_quickly_at_moderate_size():
    import time

    start = time.perf_counter()
    p = make_phantom(0, (24, 128, 128))
    assert time.perf_counter() - start < 3.0  # ~0.1 s alone; generous for a shared 2-core CI machine
    assert p.name == "phantom-s0"
