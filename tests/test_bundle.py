"""The model bundle: written atomically, every file hashed, tampering refused, weights-only loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _fixtures import tiny_config, tiny_unet, write_tiny_bundle
from plsynth.hashing import sha256_file
from plsynth.bundles.segmenter import load_bundle, write_bundle
from plsynth.config import config_from_dict
from plsynth.errors import BundleError


@pytest.fixture(scope="module")
def two_net_bundle(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return write_tiny_bundle(tmp_path_factory.mktemp("b") / "bundle", metrics={"val_dice": 0.5}, extra={"note": "t"})


def test_bundle_lists_sha256_of_every_file_and_records_parity(two_net_bundle: Path):
    meta = json.loads((two_net_bundle / "meta.json").read_text())
    on_disk = sorted(p.name for p in two_net_bundle.iterdir() if p.is_file() and p.name != "meta.json")
    assert sorted(meta["files"]) == on_disk == ["model.onnx", "model.pt", "peer.onnx", "peer.pt"]
    for name, digest in meta["files"].items():
        assert sha256_file(two_net_bundle / name) == digest
    for name in ("model", "peer"):
        assert meta["parity"][name]["mask_dice"] >= 0.99
        assert meta["parity"][name]["max_abs_diff"] < 1e-3
    assert meta["image_size"] == 32 and meta["threshold"] == 0.5 and meta["note"] == "t"
    assert config_from_dict(meta["config"]).model.width == 4
    assert meta["metrics"] == {"val_dice": 0.5}


def test_loaded_torch_networks_reproduce_the_written_ones(two_net_bundle: Path):
    bundle = load_bundle(two_net_bundle)
    nets = bundle.torch_networks()
    x = torch.rand(2, 1, 32, 32)
    for name, seed in (("model", 0), ("peer", 1)):
        with torch.inference_mode():
            assert torch.allclose(nets[name](x), tiny_unet(seed)(x), atol=1e-6)
    assert bundle.network_names == ["model", "peer"]


def copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_file_is_refused_naming_it(two_net_bundle: Path, tmp_path: Path):
    b = copy_bundle(two_net_bundle, tmp_path / "b")
    data = bytearray((b / "peer.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "peer.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="peer.onnx"):
        load_bundle(b)


def test_truncated_or_missing_file_is_refused(two_net_bundle: Path, tmp_path: Path):
    b = copy_bundle(two_net_bundle, tmp_path / "b")
    (b / "model.pt").write_bytes((b / "model.pt").read_bytes()[:100])
    with pytest.raises(BundleError, match="model.pt"):
        load_bundle(b)
    (b / "model.pt").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(b)


def test_not_a_bundle_and_bad_meta_are_refused(tmp_path: Path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="meta.json"):
        load_bundle(tmp_path / "empty")
    (tmp_path / "empty" / "meta.json").write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        load_bundle(tmp_path / "empty")


def test_cache_folder_inside_bundle_is_not_hashed(two_net_bundle: Path, tmp_path: Path):
    b = copy_bundle(two_net_bundle, tmp_path / "b")
    (b / "cache").mkdir()
    (b / "cache" / "engine.plan").write_bytes(b"x")
    assert load_bundle(b).image_size == 32


def test_rewriting_a_bundle_replaces_it_whole_and_leaves_no_temporaries(tmp_path: Path):
    cfg = tiny_config()
    out = tmp_path / "bundle"
    write_tiny_bundle(out, cfg, seeds=(0, 1))
    write_tiny_bundle(out, cfg, seeds=(2,), metrics={"epoch": 3})
    bundle = load_bundle(out)
    assert bundle.network_names == ["model"]
    assert not (out / "peer.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_failed_write_keeps_the_old_bundle(tmp_path: Path):
    cfg = tiny_config()
    out = tmp_path / "bundle"
    write_tiny_bundle(out, cfg, seeds=(0,))
    before = (out / "meta.json").read_text()
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("broken network")

    with pytest.raises(Exception):
        write_bundle(out, {"model": tiny_unet(1), "peer": Broken()}, cfg, {})
    assert (out / "meta.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_onnx_in_bundle_accepts_any_batch(two_net_bundle: Path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(two_net_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        out = sess.run(None, {"x": np.zeros((batch, 1, 32, 32), np.float32)})[0]
        assert out.shape == (batch, 1, 32, 32)
