"""atomic_write: the final name holds the old content, the complete new content, or nothing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from plsynth.atomic import TEMP_PREFIX, atomic_write, atomic_write_bytes, atomic_write_text


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX))


def test_atomic_write_renames_temp_to_final_name_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"  # parent created on demand
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(".") and tmp.name.endswith("report.json")
        assert not target.exists()  # nothing under the final name while writing
        tmp.write_text("{}")
    assert target.read_text() == "{}"
    assert _leftovers(target.parent) == []


def test_atomic_write_leaves_no_file_on_exception(tmp_path: Path) -> None:
    target = tmp_path / "case.nii.gz"
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("writer died")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_content_when_the_new_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    atomic_write_bytes(target, b"old checkpoint")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"new but incomplete")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old checkpoint"
    assert _leftovers(tmp_path) == []


def test_temp_name_keeps_double_suffix_so_nibabel_writes_gzip(tmp_path: Path) -> None:
    target = tmp_path / "mask.nii.gz"
    image = nib.Nifti1Image(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.eye(4))
    with atomic_write(target) as tmp:
        nib.save(image, tmp)  # nibabel picks gzip from the suffix of tmp
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    assert np.array_equal(np.asarray(nib.load(target).dataobj), np.asarray(image.dataobj))


def test_atomic_write_text_and_bytes_replace_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second é")
    assert target.read_text(encoding="utf-8") == "second é"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_atomic_write_replaces_a_folder_output(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    for version in ("v1", "v2"):
        with atomic_write(bundle) as tmp:
            tmp.mkdir()
            (tmp / "meta.json").write_text(version)
    assert (bundle / "meta.json").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_atomic_write_fails_when_writer_wrote_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="created nothing"):
        with atomic_write(tmp_path / "x.bin"):
            pass
    assert list(tmp_path.iterdir()) == []
