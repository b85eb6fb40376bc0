"""Synthesizer bundle: ONNX export parity, dynamic batch, sha256 checks, LocalSynthesizer backends."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _fixtures import TINY_SYNTH as TINY
from _fixtures import write_synth_bundle
from plsynth.bundles.onnx_export import ort_session
from plsynth.bundles.synthesizer import bundle_sha256, load_decoder_bundle, parity_inputs
from plsynth.config import Config, SynthConfig
from plsynth.errors import BundleError
from plsynth.synth_service.protocol import SynthesisClient

torch.set_num_threads(1)


def _bundle(path, synth: SynthConfig = TINY):
    return write_synth_bundle(path, Config(synth=synth), has_infection=(1, 1, 0, 1, 0, 0), varied=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _bundle(tmp_path_factory.mktemp("synth") / "bundle")


def _lungs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    lung = torch.zeros(batch, size, size, dtype=torch.long)
    lung[:, size // 4 : 3 * size // 4, size // 2 + 2 : size - 3] = 1
    lung[:, size // 4 : 3 * size // 4, 3 : size // 2 - 2] = 2
    infection = torch.zeros(batch, 1, size, size)
    infection[:, :, size // 3 : size // 2, size // 2 + 4 : size - 6] = 1
    return infection, lung


def test_bundle_holds_every_file_and_records_export_parity_under_1e_4(bundle):
    path, _ = bundle
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["files"]) == {"decoder.pt", "encoder.pt", "decoder.onnx", "pool.npz"}
    assert meta["export_parity_max_abs"] <= 1e-4
    assert meta["onnx"]["inputs"] == ["onehot", "style", "noise"]
    assert meta["image_size"] == 32 and meta["style_dim"] == 8 and meta["classes"][3] == "infection"
    assert meta["pool"] == {**meta["pool"], "n": 6, "n_positive": 3, "default_mode": "positive"}
    assert bundle_sha256(path) == load_decoder_bundle(path).sha256


def test_onnx_decoder_matches_torch_at_another_batch_size(bundle):
    path, decoder = bundle
    inputs = parity_inputs(TINY, batch=3, seed=5)
    decoder.eval()
    with torch.no_grad():
        expected = decoder(inputs["onehot"], inputs["style"], inputs["noise"]).numpy()
    session = ort_session(path / "decoder.onnx")
    (got,) = session.run(["image"], {k: v.numpy() for k, v in inputs.items()})
    assert got.shape == (3, 1, 32, 32)
    assert np.abs(got - expected).max() <= 1e-4


def test_loaded_decoder_reproduces_the_written_one(bundle):
    path, decoder = bundle
    loaded = load_decoder_bundle(path)
    inputs = parity_inputs(TINY)
    decoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decoder(**inputs), decoder(**inputs))
    assert loaded.pool.n_positive == 3


def test_tampered_or_missing_file_is_a_bundle_error(tmp_path):
    path, _ = _bundle(tmp_path / "b", SynthConfig(image_size=16, width=2, style_dim=4, num_up=2, noise=False))
    assert json.loads((path / "meta.json").read_text())["onnx"]["inputs"] == ["onehot", "style"]
    data = bytearray((path / "pool.npz").read_bytes())
    data[-10] ^= 0xFF
    (path / "pool.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="pool.npz: sha256"):
        load_decoder_bundle(path)
    (path / "encoder.pt").unlink()
    with pytest.raises(BundleError, match="encoder.pt: missing"):
        load_decoder_bundle(path)
    with pytest.raises(BundleError, match="no meta.json"):
        load_decoder_bundle(tmp_path)


def test_local_synthesizer_torch_and_ort_agree_and_return_unit_images_at_the_request_size(bundle):
    from plsynth.synth_service.local import LocalSynthesizer

    path, _ = bundle
    torch_synth = LocalSynthesizer(path, backend="torch")
    ort_synth = LocalSynthesizer(path, backend="ort")
    assert isinstance(torch_synth, SynthesisClient)
    assert torch_synth.backend == "torch:cpu" and ort_synth.backend == "ort:CPUExecutionProvider"
    infection, lung = _lungs(2, 48)  # request at 48 px, decoder at 32 px
    a = torch_synth.synthesize(infection, lung, seed=3)
    b = ort_synth.synthesize(infection, lung, seed=3)
    assert a.shape == (2, 1, 48, 48) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert (a - b).abs().max() <= 1e-4
    assert torch.equal(torch_synth.synthesize(infection, lung, seed=3), a)
    assert not torch.equal(torch_synth.synthesize(infection, lung, seed=4), a)
    # same map and one reference style for the batch, but noise is drawn per sample (weights non-zero here)
    assert not torch.equal(a[0], a[1])
    style = torch_synth.reference_style(3, torch.Generator().manual_seed(0))
    assert torch.equal(style[0], style[2])
    assert torch_synth.bundle_sha256 == bundle_sha256(path)


def test_local_synthesizer_self_mode_needs_images_and_trt_is_refused(bundle):
    from plsynth.synth_service.local import LocalSynthesizer

    path, _ = bundle
    synth = LocalSynthesizer(path, pool_mode="self")
    infection, lung = _lungs(2, 32)
    with pytest.raises(ValueError, match="needs the request's images"):
        synth.synthesize(infection, lung)
    images = torch.rand(2, 1, 32, 32)
    out = synth.synthesize(infection, lung, images=images, seed=0)
    assert out.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="TensorRT engine cache"):
        LocalSynthesizer(path, backend="trt")


def test_decode_takes_onehot_and_style_directly(bundle):
    from plsynth.synth_service.local import LocalSynthesizer

    path, _ = bundle
    synth = LocalSynthesizer(path, backend="ort")
    inputs = parity_inputs(TINY, batch=2)
    out = synth.decode(inputs["onehot"], inputs["style"], noise_seed=1)
    assert out.shape == (2, 1, 32, 32) and torch.equal(out, synth.decode(inputs["onehot"], inputs["style"], noise_seed=1))
    with pytest.raises(ValueError, match="expected onehot"):
        synth.decode(inputs["onehot"][:, :3], inputs["style"])


def test_a_rewrite_that_fails_at_the_final_rename_keeps_the_old_bundle(bundle, tmp_path, monkeypatch):
    """The old bundle is moved aside, never deleted, until the new one is in place (was: rmtree, then rename)."""
    import os
    import shutil

    path = shutil.copytree(bundle[0], tmp_path / "bundle")
    before = (path / "meta.json").read_text()
    real_replace, failed = os.replace, []

    def failing_replace(src, dst):
        if Path(dst) == path and Path(src).is_dir() and not failed:
            failed.append(src)  # the new folder's rename fails; putting the old one back must work
            raise OSError("disk failure during the final rename (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    monkeypatch.setattr(Path, "rename", lambda self, target: failing_replace(self, target))
    with pytest.raises(OSError, match="injected"):
        _bundle(path)
    monkeypatch.undo()
    assert (path / "meta.json").read_text() == before
    assert load_decoder_bundle(path).sha256 == bundle_sha256(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary left behind


def test_a_training_run_draws_with_its_own_config_pool_k_and_mode(tmp_path):
    """synth.pool_k / synth.pool_mode of the run's config are use-time choices: the in-process
    synthesizer and the Ray actor's decoder factory take them, not the bundle's training values."""
    import dataclasses

    from plsynth.synth_service.actor import BundleDecoderFactory
    from plsynth.training.methods import make_synthesis_client

    path, _ = write_synth_bundle(tmp_path / "bundle", Config(synth=TINY))
    built = load_decoder_bundle(path).config
    cfg = Config(synth=dataclasses.replace(TINY, bundle=str(path), backend="torch", pool_k=built.pool_k + 1,
                                           pool_mode="all"))
    local = make_synthesis_client(cfg)
    assert (local.k, local.pool_mode) == (built.pool_k + 1, "all") != (built.pool_k, built.pool_mode)
    factory = BundleDecoderFactory(str(path), backend="torch", k=cfg.synth.pool_k, pool_mode=cfg.synth.pool_mode)
    assert (factory().local.k, factory().local.pool_mode) == (built.pool_k + 1, "all")


def test_a_vessel_synthesizer_reads_the_vessels_from_the_request_s_slices(tmp_path):
    """synth.vessels: a 5-class decoder (ONNX parity included), whose map takes its 5th class from the
    request's images, in-process and in the Ray actor's condition step alike; without images it refuses."""
    import dataclasses

    from plsynth.data.semantic import INFECTION, VESSEL
    from plsynth.synth_service.actor import LocalDecoderAdapter
    from plsynth.synth_service.local import LocalSynthesizer
    from plsynth.training.synthesizer import prepare_batch

    path, _ = _bundle(tmp_path / "bundle", dataclasses.replace(TINY, vessels=True))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["classes"][-1] == "vessel" and len(meta["classes"]) == 5
    assert meta["export_parity_max_abs"] <= 1e-4
    infection, lung = _lungs(2, 64)
    images = torch.full((2, 1, 64, 64), 0.15)
    images[0, 0, 16:48, 44:46] = 0.6  # a 2-px vessel through the patient-left lung of the first slice
    images[0, 0, 21:32, :] = 0.15  # not where the infection is
    synth, ort_synth = LocalSynthesizer(path, backend="torch"), LocalSynthesizer(path, backend="ort")
    with pytest.raises(ValueError, match="needs its images"):
        synth.synthesize(infection, lung, seed=0)
    semantic = synth.semantic(infection, lung, images)
    assert semantic.shape == (2, 32, 32)  # at the decoder's size
    assert (semantic[0] == VESSEL).sum() > 0 and (semantic[1] == VESSEL).sum() == 0
    assert torch.equal(semantic == INFECTION, infection[:, 0, ::2, ::2] > 0)  # nearest to 32 px; vessels never over it
    _, trained_on = prepare_batch({"image": images, "lung": lung, "label": infection}, 32, vessels=True)
    assert torch.equal(trained_on.argmax(1), semantic)  # the map it trains on is the map it serves
    a = synth.synthesize(infection, lung, images=images, seed=3)
    assert a.shape == (2, 1, 64, 64) and (a - ort_synth.synthesize(infection, lung, images=images, seed=3)).abs().max() <= 1e-4
    adapter = LocalDecoderAdapter(synth)
    onehot, style = adapter.condition(infection, lung, images, 3)
    assert onehot.shape == (2, 5, 32, 32) and style.shape[:2] == (2, 5)
    assert torch.equal(onehot.argmax(1), semantic)
    assert torch.equal(adapter.decode(onehot, style, 5), synth.decode(onehot, style, 5))


def test_maps_edited_away_from_the_slice_s_infection_read_no_vessel_from_the_old_lesion(tmp_path):
    """draw_variants (the evidence bench, the preview): the infection-removed and moved maps are the
    as-given map's slice classes except inside the slice's own lesion, which is plain lung there
    (a lesion's reticulation reads as vessels); all variants share one pool draw and noise."""
    import dataclasses

    from plsynth.data.semantic import INFECTION, VESSEL
    from plsynth.synth_service.local import LocalSynthesizer
    from plsynth.training.synth_preview import draw_variants

    path, _ = _bundle(tmp_path / "bundle", dataclasses.replace(TINY, vessels=True))
    synth = LocalSynthesizer(path, backend="ort")
    infection, lung = _lungs(1, 64)
    image = torch.full((64, 64), 0.6)
    image[lung[0] > 0] = 0.15
    lesion = infection[0, 0] > 0
    image[lesion] = 0.25  # ground glass
    image[::4][lesion[::4]] = 0.6  # with a reticulation of thin bright lines
    inf, lung, image = infection[0, 0].numpy().astype("uint8"), lung[0].numpy(), image.numpy()
    variants = np.stack([inf, np.zeros_like(inf), inf[:, ::-1] & (lung > 0)])
    plain = synth.semantic(torch.from_numpy(variants[:, None]).float(),
                           torch.from_numpy(np.stack([lung] * 3)).long(), torch.from_numpy(np.stack([image] * 3)[:, None]))
    old = inf[::2, ::2] > 0
    assert (plain[1][old] == VESSEL).any()  # read from the slice as it is, the removed lesion has vessels
    maps, drawn = draw_variants(synth, variants, lung, image, seed=4)
    assert drawn.shape == (3, 64, 64) and np.array_equal(maps[0], plain[0].numpy())
    assert (maps[0][old] == INFECTION).all() and not (maps[1][old] >= INFECTION).any()
    assert np.array_equal(maps[1][old], lung[::2, ::2][old]) and np.array_equal(maps[1][~old], plain[1].numpy()[~old])
    again, redrawn = draw_variants(synth, variants, lung, image, seed=4)
    assert np.array_equal(again, maps) and np.array_equal(redrawn, drawn)  # the seed fixes pool draw and noise


def test_a_bilinear_decoder_exports_to_onnx_at_parity(tmp_path):
    import onnx

    path, _ = _bundle(tmp_path / "b", dataclasses.replace(TINY, upsample="bilinear"))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["export_parity_max_abs"] <= 1e-4 and meta["synth"]["upsample"] == "bilinear"
    graph = onnx.load(path / "decoder.onnx").graph
    modes = {(n.op_type, a.s.decode()) for n in graph.node for a in n.attribute if a.name == "mode"}
    assert ("Resize", "linear") in modes
    assert ("Resize", "nearest") in modes  # the one-hot map is still resized nearest, as SPADE
    assert load_decoder_bundle(path).decoder.config.upsample == "bilinear"


def test_a_bundle_saved_with_a_removed_switch_loads_at_its_old_default_and_is_refused_otherwise(tmp_path):
    """synth.wall / infection_vessels / padding / margin / augment_padding / ignore_padding were tried and removed; bundles written before hold
    them: at the old default they load as before, a bundle trained with one on is refused by name
    (it would build the wrong networks or the wrong maps)."""
    import shutil

    path, _ = _bundle(tmp_path / "b", TINY)
    for key, value, ok in (("wall", False, True), ("padding", "zeros", True), ("wall", True, False),
                           ("infection_vessels", True, False), ("padding", "reflect", False), ("margin", 8, False),
                           ("augment_padding", "zeros", True), ("augment_padding", "border", False),
                           ("ignore_padding", False, True), ("ignore_padding", True, False)):
        old = tmp_path / f"{key}-{value}"
        shutil.copytree(path, old)
        meta = json.loads((old / "meta.json").read_text())
        meta["synth"][key] = value
        (old / "meta.json").write_text(json.dumps(meta))
        if ok:
            assert load_decoder_bundle(old).decoder.config == load_decoder_bundle(path).decoder.config
        else:
            with pytest.raises(BundleError, match=rf"synth\.{key}: {value!r}.*not kept"):
                load_decoder_bundle(old)


def test_a_synthesizer_trained_on_lung_masked_slices_draws_black_outside_the_lung_field(tmp_path):
    """With ``data.lung_handling: mask`` every slice the synthesizer and the segmenters see is black
    outside the lung field; a drawing is a training slice of the segmenter, so the service returns it
    in that domain (the rule the consistency loss applies), on both back-ends and through the Ray
    actor's decode; a synthesizer trained on whole slices draws outside the field as it learned."""
    from plsynth.synth_service.actor import LocalDecoderAdapter
    from plsynth.synth_service.local import LocalSynthesizer

    cfg = Config(synth=TINY)
    masked_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, lung_handling="mask"))
    whole, _ = write_synth_bundle(tmp_path / "whole", cfg, varied=True)
    masked, _ = write_synth_bundle(tmp_path / "masked", masked_cfg, varied=True)
    infection, lung = _lungs(2, TINY.image_size)
    outside = (lung == 0)[:, None]
    for backend in ("torch", "ort"):
        drawn = LocalSynthesizer(masked, backend=backend).synthesize(infection, lung, seed=1)
        assert drawn[outside].abs().max() == 0 and drawn[~outside].mean() > 0.05
        assert LocalSynthesizer(whole, backend=backend).synthesize(infection, lung, seed=1)[outside].abs().max() > 0
    adapter = LocalDecoderAdapter(LocalSynthesizer(masked, backend="torch"))
    onehot, style = adapter.condition(infection, lung, None, 1)
    assert adapter.decode(onehot, style, 1)[outside].abs().max() == 0


def test_a_texture_bundle_checks_its_patches_and_both_backends_lay_the_same_texture(tmp_path):
    """``synth.texture``: texture.npz is hashed like every file (a changed or missing one is a
    BundleError), and torch, ONNX Runtime and the Ray actor's decode draw the same texture from a
    seed, inside the map's infection only."""
    from plsynth.synth_service.actor import LocalDecoderAdapter
    from plsynth.synth_service.local import LocalSynthesizer

    patches = 0.05 * torch.randn(30, 12, 12, generator=torch.Generator().manual_seed(0))
    cfg = Config(synth=dataclasses.replace(TINY, texture=1.0))
    path, _ = write_synth_bundle(tmp_path / "tex", cfg, varied=True, texture=patches)
    plain, _ = write_synth_bundle(tmp_path / "plain", Config(synth=TINY), varied=True)
    assert torch.equal(load_decoder_bundle(path).texture, patches)
    infection, lung = _lungs(2, TINY.image_size)
    drawn = {b: LocalSynthesizer(path, backend=b).synthesize(infection, lung, seed=5) for b in ("torch", "ort")}
    assert (drawn["torch"] - drawn["ort"]).abs().max() < 1e-4
    without = LocalSynthesizer(plain, backend="torch").synthesize(infection, lung, seed=5)
    near = torch.nn.functional.max_pool2d(infection, 3, stride=1, padding=1) > 0
    assert (drawn["torch"] - without)[~near].abs().max() == 0 and (drawn["torch"] - without)[near].std() > 0.02
    adapter = LocalDecoderAdapter(LocalSynthesizer(path, backend="torch"))
    onehot, style = adapter.condition(infection, lung, None, 5)
    assert torch.equal(adapter.decode(onehot, style, 7), adapter.decode(onehot, style, 7))

    np.savez(path / "texture.npz", patches=patches.numpy() * 2)
    with pytest.raises(BundleError, match="texture.npz: sha256"):
        load_decoder_bundle(path)
    (path / "texture.npz").unlink()
    with pytest.raises(BundleError, match="texture.npz: missing"):
        load_decoder_bundle(path)
