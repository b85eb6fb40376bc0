"""Synthesizer GAN training on a small phantom set: the loss lowers the reconstruction error,
a run leaves checkpoints, grids and a loadable bundle, and a rerun resumes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from plsynth.config import load_config
from plsynth.training.synthesizer import build_nets, gan_step, lr_factor, prepare_batch, reconstruction_l1

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset's phantom data, built once through the real build_splits."""
    from plsynth.data.datasets import build_splits

    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml")
    run = tmp_path_factory.mktemp("synth-run")
    return cfg, build_splits(cfg, run), run


def test_a_few_gan_steps_lower_the_reconstruction_error_on_phantoms(smoke):
    cfg, splits, _ = smoke
    torch.manual_seed(0)
    nets = build_nets(cfg)
    batch = next(iter(torch.utils.data.DataLoader(splits.labeled, batch_size=8, shuffle=False)))
    image, onehot = prepare_batch(batch, cfg.synth.image_size)
    before = reconstruction_l1(nets.decoder, nets.encoder, image, onehot)
    loader = torch.utils.data.DataLoader(splits.labeled, batch_size=4, shuffle=True, drop_last=True)
    steps = 0
    while steps < 6:
        for b in loader:
            losses = gan_step(nets, *prepare_batch(b, cfg.synth.image_size), cfg)
            assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
            steps += 1
            if steps == 6:
                break
    after = reconstruction_l1(nets.decoder, nets.encoder, image, onehot)
    print(f'recon L1 {before:.4f} -> {after:.4f}')
    assert after < 0.7 * before, (before, after)


def test_prepare_batch_builds_the_four_class_map_and_resizes():
    lung = torch.zeros(2, 32, 32, dtype=torch.long)
    lung[:, 8:24, 18:28] = 1  # patient-left lung at larger column
    lung[:, 8:24, 4:14] = 2
    label = torch.zeros(2, 1, 32, 32)
    label[0, 0, 10:14, 20:24] = 1
    batch = {"image": torch.rand(2, 1, 32, 32), "lung": lung, "label": label}
    image, onehot = prepare_batch(batch, 64)
    assert image.shape == (2, 1, 64, 64) and image.min() >= -1 and image.max() <= 1
    assert onehot.shape == (2, 4, 64, 64)
    assert torch.all(onehot.sum(1) == 1)
    assert onehot[0, 3].sum() == 4 * 16 and onehot[1, 3].sum() == 0  # 4x4 infection at twice the size
    assert onehot[0, 1, 40, 44] == 1 and onehot[0, 2, 40, 16] == 1


def test_with_vessels_the_map_takes_a_fifth_class_from_the_image_and_a_gan_step_runs(smoke):
    import dataclasses

    from plsynth.data.semantic import VESSEL

    cfg, splits, _ = smoke
    cfg = dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, vessels=True, discriminator="oasis"))
    batch = next(iter(torch.utils.data.DataLoader(splits.labeled, batch_size=4, shuffle=False)))
    image, onehot = prepare_batch(batch, cfg.synth.image_size, vessels=True)
    four = prepare_batch(batch, cfg.synth.image_size)[1]
    assert onehot.shape[1] == 5 and torch.all(onehot.sum(1) == 1)
    vessel = onehot[:, VESSEL] > 0
    assert vessel.any() and torch.all(four[:, 1:3].sum(1)[vessel] == 1)  # vessels only where the lung was
    assert torch.equal(onehot[:, :4].sum(1) + onehot[:, 4], four.sum(1))
    torch.manual_seed(0)
    nets = build_nets(cfg)
    losses = gan_step(nets, image, onehot, cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_lr_schedule_is_constant_then_decays_linearly():
    factors = [lr_factor(e, 10) for e in range(10)]
    assert factors[:5] == [1.0] * 5
    assert all(a > b for a, b in zip(factors[5:], factors[6:])) and factors[-1] > 0


def test_training_run_leaves_checkpoint_grids_and_a_bundle_and_resumes(smoke, tmp_path):
    from plsynth.bundles.synthesizer import load_decoder_bundle
    from plsynth.training.synthesizer import train_synthesizer

    cfg, splits, _ = smoke
    small = torch.utils.data.Subset(splits.labeled, range(8))
    # a narrower synthesizer at half the data's size (64 px slices resized to 32 px)
    tiny = dataclasses.replace(cfg.synth, image_size=32, width=4, style_dim=8, num_up=3, epochs=1)
    cfg1 = cfg.replace(synth=tiny)
    bundle = train_synthesizer(cfg1, tmp_path, "cpu", labeled=small)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "grids" / "epoch_001.png").is_file()
    loaded = load_decoder_bundle(bundle)
    assert len(loaded.pool) == 8
    assert loaded.pool.n_positive == sum(float(small[i]["label"].sum()) > 0 for i in range(8))
    assert loaded.meta["export_parity_max_abs"] <= 1e-4
    assert loaded.config.image_size == 32 and loaded.pool.style_dim == 8

    cfg2 = cfg.replace(synth=dataclasses.replace(tiny, epochs=2))
    train_synthesizer(cfg2, tmp_path, "cpu", labeled=small)  # resumes after epoch 1: trains only epoch 2
    history = json.loads((tmp_path / "bundle" / "meta.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert (tmp_path / "grids" / "epoch_002.png").is_file()


def test_synthesizer_augmentation_moves_image_and_map_together_and_a_flip_swaps_the_lungs():
    from plsynth.training.synthesizer import augment_batch

    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml")
    cfg = cfg.replace(synth=dataclasses.replace(cfg.synth, flip=True, rotate_degrees=0.0, scale=0.0, intensity=0.0))
    lung = torch.zeros(8, 32, 32, dtype=torch.long)
    lung[:, 8:24, 18:28] = 1  # patient-left lung at larger column, taller than the right one
    lung[:, 12:20, 4:14] = 2
    image = (lung > 0).float()[:, None] * 0.5
    batch = {"image": image, "lung": lung, "label": torch.zeros(8, 1, 32, 32)}
    out = augment_batch(batch, cfg, torch.Generator().manual_seed(0))
    flipped = [i for i in range(8) if out["lung"][i, 10, 22] == 0]  # the tall lung went to the left side
    kept = [i for i in range(8) if out["lung"][i, 10, 22] == 1]
    assert flipped and kept and len(flipped) + len(kept) == 8
    # after a flip the lung on the image's right (the old right lung) is labelled 1, the other 2
    assert torch.all(out["lung"][flipped][:, 16, 22] == 1) and torch.all(out["lung"][flipped][:, 10, 9] == 2)
    assert torch.all(out["lung"][kept] == lung[kept])
    assert torch.equal(out["image"][:, 0] > 0.25, out["lung"] > 0)  # image and map moved jointly


def test_oasis_discriminator_labels_pixels_and_a_gan_step_runs(smoke):
    from plsynth.models.discriminator import SegmentationDiscriminator, class_balanced_ce

    cfg, splits, _ = smoke
    d = SegmentationDiscriminator(4, 8, depth=3)
    assert d(torch.zeros(2, 1, 32, 32)).shape == (2, 5, 32, 32)
    onehot = torch.zeros(1, 4, 4, 4)
    onehot[:, 0], onehot[0, 0, 0, 0], onehot[0, 3, 0, 0] = 1, 0, 1  # one infection pixel in 16
    sure_real = torch.zeros(1, 5, 4, 4)
    sure_real[:, 0], sure_real[0, 0, 0, 0], sure_real[0, 3, 0, 0] = 10, 0, 10
    wrong_infection = sure_real.clone()
    wrong_infection[0, 3, 0, 0], wrong_infection[0, 0, 0, 0] = 0, 10
    wrong_background = sure_real.clone()
    wrong_background[0, 0, 1, 1], wrong_background[0, 3, 1, 1] = 0, 10
    # class balance: the one infection pixel weighs as much as the 15 background pixels together
    assert class_balanced_ce(wrong_infection, onehot, True) > 10 * class_balanced_ce(wrong_background, onehot, True)
    assert class_balanced_ce(sure_real, onehot, False) > class_balanced_ce(sure_real, onehot, True)
    tiny = dataclasses.replace(cfg.synth, image_size=32, width=4, style_dim=8, num_up=3, discriminator="oasis", d_width=8)
    cfg1 = cfg.replace(synth=tiny)
    nets = build_nets(cfg1)
    assert isinstance(nets.discriminator, SegmentationDiscriminator)
    batch = next(iter(torch.utils.data.DataLoader(splits.labeled, batch_size=2)))
    losses = gan_step(nets, *prepare_batch(batch, 32), cfg1)
    assert set(losses) >= {"g_gan", "d_loss"} and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_synthesizer_flip_mirrors_left_and_right_when_the_lungs_lie_one_above_the_other():
    """COVID-SemiSeg's slices arrive with class 1 above class 2: the flip must mirror rows there,
    so that class 1 stays on top (a column flip with the label swap put class 2 on top)."""
    from plsynth.training.synthesizer import augment_batch

    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml")
    cfg = cfg.replace(synth=dataclasses.replace(cfg.synth, flip=True, rotate_degrees=0.0, scale=0.0, intensity=0.0))
    lung = torch.zeros(8, 32, 32, dtype=torch.long)
    lung[:, 4:14, 8:24] = 1  # class 1 on top, wider than class 2 below
    lung[:, 18:28, 12:20] = 2
    label = torch.zeros(8, 1, 32, 32)
    label[:, 0, 6:8, 8:12] = 1  # an infection in the top lung's left corner
    batch = {"image": (lung > 0).float()[:, None] * 0.5, "lung": lung, "label": label}
    out = augment_batch(batch, cfg, torch.Generator().manual_seed(0))
    flipped = [i for i in range(8) if out["lung"][i, 20, 9] == 2]  # the wide lung went to the bottom
    assert flipped and len(flipped) < 8
    assert torch.all(out["lung"][:, 8, 16] == 1) and torch.all(out["lung"][:, 23, 16] == 2)  # class 1 stays on top
    # in a flipped slice the infection moved with its lung: bottom rows, same columns
    assert torch.all(out["label"][flipped][:, 0, 24:26, 8:12] == 1)


def test_a_frozen_segmenter_adds_its_loss_on_the_drawn_infection_and_only_the_generator_learns(smoke, tmp_path):
    """synth.segmenter / lambda_seg: the generator is also trained to make a frozen segmenter find the
    map's infection in the drawn image; the segmenter's weights never change."""
    from _fixtures import tiny_config, write_tiny_bundle

    from plsynth.data.semantic import INFECTION
    from plsynth.errors import BundleError
    from plsynth.training.losses import seg_loss

    cfg, splits, _ = smoke
    with pytest.raises(ValueError, match="synth.segmenter"):
        dataclasses.replace(cfg.synth, lambda_seg=1.0)
    missing = dataclasses.replace(cfg.synth, image_size=32, width=4, style_dim=8, num_up=3,
                                  segmenter=str(tmp_path / "nowhere"), lambda_seg=1.0)
    with pytest.raises(BundleError, match="nowhere"):
        build_nets(cfg.replace(synth=missing))

    bundle = write_tiny_bundle(tmp_path / "seg", tiny_config(16), seeds=(3,))  # a 16 px segmenter: resized to it
    tiny = dataclasses.replace(missing, segmenter=str(bundle), lambda_seg=2.0, lambda_l1=0.0)
    cfg1 = cfg.replace(synth=tiny)
    torch.manual_seed(0)
    nets = build_nets(cfg1)
    frozen = {k: v.clone() for k, v in nets.consistency.state_dict().items()}
    batch = next(iter(torch.utils.data.DataLoader(splits.labeled, batch_size=4)))
    image, onehot = prepare_batch(batch, 32)
    assert onehot[:, INFECTION].any()

    decoder_before = [p.detach().clone() for p in nets.decoder.parameters()]
    losses = gan_step(nets, image, onehot, cfg1)
    assert losses["g_seg"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, nets.decoder.parameters()))
    assert all(torch.equal(frozen[k], v) for k, v in nets.consistency.state_dict().items())
    assert not nets.consistency.training and not any(p.requires_grad for p in nets.consistency.parameters())

    # the term is the segmentation loss SA-CPS uses, of the frozen net on the drawn image at its size
    fake = torch.rand(4, 1, 32, 32) * 2 - 1
    small = torch.nn.functional.interpolate((fake + 1) / 2, size=(16, 16), mode="bilinear", align_corners=False)
    target = torch.nn.functional.interpolate(onehot[:, INFECTION:INFECTION + 1], size=(16, 16), mode="nearest")
    with torch.no_grad():
        assert torch.allclose(nets.consistency(fake, onehot), seg_loss(nets.consistency.net(small), target))


def test_a_frozen_segmenter_sees_the_drawn_image_as_it_saw_its_training_slices(tmp_path):
    """A segmenter trained on lung boxes (the covid19-20 and mosmed presets) or on lung-masked slices
    judges the drawn image cut to the map's lung box, or black outside the map's lung field, as it was trained."""
    from _fixtures import tiny_config, write_tiny_bundle

    from plsynth.data.semantic import INFECTION, LEFT_LUNG, NUM_CLASSES
    from plsynth.training.synthesizer import ConsistencyLoss

    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 2:14, 2:14] = LEFT_LUNG  # lung in one corner: its box is a fraction of the frame
    labels[:, 5:9, 5:9] = INFECTION
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()
    fake = torch.rand(2, 1, 32, 32) * 2 - 1
    seen = []

    def judge(cfg):
        loss = ConsistencyLoss(write_tiny_bundle(tmp_path / str(len(seen)), cfg, seeds=(3,)))
        loss.net.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
        with torch.no_grad():
            return float(loss(fake, onehot))

    tiny = tiny_config(16)
    whole = judge(tiny)
    assert seen[-1].shape[-2:] == (16, 16)
    boxed = judge(tiny.replace(data=dataclasses.replace(tiny.data, lung_box=2)))
    # 12 px of lung at 32 px = 6 px at 16, + 2 px margin each side = 10, rounded up to the U-Net's multiple of 4
    assert seen[-1].shape[-2:] == (12, 12) and boxed != pytest.approx(whole)
    judge(tiny.replace(data=dataclasses.replace(tiny.data, lung_handling="mask")))
    assert seen[-1][:, :, 7:, :].abs().max() == 0 and seen[-1][:, :, 1:7, 1:7].min() > 0  # lung: rows and columns 1-6 at 16 px


def test_a_damaged_frozen_segmenter_is_named_by_its_config_key(tmp_path):
    """synth.segmenter that is no bundle, or a bundle with a file missing, fails naming the key and the file."""
    from _fixtures import tiny_config, write_tiny_bundle

    from plsynth.errors import BundleError
    from plsynth.training.synthesizer import ConsistencyLoss

    with pytest.raises(BundleError, match=r"synth\.segmenter: .*empty: model bundle folder not found.*train the baseline first"):
        ConsistencyLoss((tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"synth\.segmenter: .*meta\.json: missing"):
        ConsistencyLoss(tmp_path / "empty")
    bundle = write_tiny_bundle(tmp_path / "b", tiny_config(16), seeds=(3,))
    weights = next(p for p in bundle.iterdir() if p.suffix in (".onnx", ".safetensors", ".pt"))
    weights.unlink()
    with pytest.raises(BundleError, match=rf"synth\.segmenter: .*{weights.name}.*missing"):
        ConsistencyLoss(bundle)


def test_with_texture_the_bundle_carries_the_labeled_infection_s_texture_and_draws_it(tmp_path, caplog):
    """``synth.texture``: the export keeps residual patches of the labeled slices' infection
    interior (none from the lung around it), the bundle loads them and its drawings carry them
    inside the map's infection only; where no patch fits, a warning and plain drawings."""
    from plsynth.bundles.synthesizer import load_decoder_bundle
    from plsynth.config import Config, SynthConfig
    from plsynth.models.texture import PATCH
    from plsynth.synth_service.local import LocalSynthesizer
    from plsynth.training.synthesizer import train_synthesizer

    g = torch.Generator().manual_seed(0)
    size, items = 32, []
    for i in range(4):
        lung = torch.zeros(size, size, dtype=torch.long)
        lung[4:28, 3:15], lung[4:28, 17:29] = 2, 1
        label = torch.zeros(1, size, size)
        label[0, 6:24, 10:28] = 1
        image = torch.where(lung > 0, 0.2, 0.6)[None] + 0.1 * torch.randn(1, size, size, generator=g) * label
        items.append({"image": image.clamp(0, 1), "lung": lung, "label": label, "case": f"c{i}", "index": i})
    synth = SynthConfig(image_size=size, width=4, style_dim=8, num_up=3, epochs=1, pool_k=2, texture=1.0)
    bundle = load_decoder_bundle(train_synthesizer(Config(synth=synth), tmp_path / "run", "cpu", labeled=items))
    assert bundle.texture.shape[1:] == (PATCH, PATCH) and len(bundle.texture) >= 4
    assert 0.04 < bundle.texture.std() < 0.12  # the grain, not the lung / infection step
    assert bundle.meta["texture"]["patches"] == len(bundle.texture) and "texture.npz" in bundle.meta["files"]

    infection, lung = torch.stack([it["label"] for it in items[:2]]), torch.stack([it["lung"] for it in items[:2]])
    drawn = LocalSynthesizer(bundle.path, backend="ort").synthesize(infection, lung, seed=3)
    plain = LocalSynthesizer(bundle.path, backend="ort")
    plain.bundle.texture = plain.bundle.texture[:0]
    without = plain.synthesize(infection, lung, seed=3)
    near = torch.nn.functional.max_pool2d(infection, 3, stride=1, padding=1) > 0
    assert (drawn - without)[~near].abs().max() == 0 and (drawn - without)[near].abs().max() > 0.02

    flat = [{**it, "label": torch.zeros_like(it["label"])} for it in items]
    with caplog.at_level("WARNING"):
        empty = load_decoder_bundle(train_synthesizer(Config(synth=synth), tmp_path / "flat", "cpu", labeled=flat))
    assert len(empty.texture) == 0 and "no 12 px square" in caplog.text
