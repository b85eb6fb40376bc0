"""Networks trained on lung boxes (``data.lung_box``): the training step, validation, the exported
bundle and plsynth-infer all cut each slice to its lung-field box, so the network sees at
inference the field of view it was trained on. Tiny in-test slices; the SA-CPS test uses the
fake synthesizer of the method tests (a trained SEAN cannot be trained in a unit test's time)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from _training_data import FakeSynthesizer, tiny_splits
from plsynth.config import Config, ConfigError, DataConfig, OptimConfig, TrainConfig, UNetConfig, load_config
from plsynth.data.preprocess import FieldOfView, volume_box
from plsynth.models.unet import UNet
from plsynth.training.evaluate import predict_slices
from plsynth.training.loop import BatchMaker, train
from plsynth.training.methods import cps_step
from plsynth.training.schedule import BatchPlan

torch.set_num_threads(1)
SIZE, MARGIN = 32, 2


def _cfg(method: str, lung_box: int | None = MARGIN, **train_kw) -> Config:
    base = dict(method=method, epochs=2, batch_labeled=4, batch_unlabeled=4, rotate_degrees=0.0, flip=True,
                val_every_iters=10**6)
    base.update(train_kw)
    return Config(data=DataConfig(image_size=SIZE, lung_box=lung_box), model=UNetConfig(width=4, depth=2),
                  optim=OptimConfig(lr=0.1), train=TrainConfig(**base))


def _batch(cfg: Config, data, step: int = 1) -> dict:
    plan = BatchPlan(len(data.labeled), len(data.unlabeled), 4, 4, 0)
    return BatchMaker(cfg, data.labeled, data.unlabeled, plan, "cpu")(step)


def test_a_lung_box_step_cuts_every_slice_to_its_whole_lung_field_with_one_size_for_the_step():
    data = tiny_splits(4, 4, size=SIZE)
    frames = _batch(_cfg("cps", lung_box=None), data)
    boxed = _batch(_cfg("cps"), data)
    h, w = boxed["image"].shape[-2:]
    assert h * w < SIZE * SIZE, "the tiny lungs must leave room to cut"
    assert h % 4 == 0 and w % 4 == 0  # 2 ** model.depth
    for key in ("image", "label", "lung", "u_image", "u_lung"):
        assert boxed[key].shape[-2:] == (h, w)
    # the whole lung field of every slice is inside its box, and the crop is the frame's pixels there
    assert torch.equal(boxed["lung"].sum(dim=(1, 2)), frames["lung"].sum(dim=(1, 2)))
    assert torch.equal(boxed["u_lung"].sum(dim=(1, 2)), frames["u_lung"].sum(dim=(1, 2)))
    assert torch.equal(boxed["label"].sum(dim=(1, 2, 3)), frames["label"].sum(dim=(1, 2, 3)))
    for i, (y0, x0) in enumerate(boxed["u_corners"].tolist()):
        assert torch.equal(boxed["u_image"][i], frames["u_image"][i, :, y0 : y0 + h, x0 : x0 + w])
    # SA-CPS draws in whole frames: the unlabeled frames stay in the batch
    assert torch.equal(boxed["u_frame"], frames["u_image"]) and torch.equal(boxed["u_frame_lung"], frames["u_lung"])


def test_sa_cps_on_lung_boxes_draws_in_whole_frames_and_trains_on_the_same_boxes_with_exact_labels():
    cfg = _cfg("sa-cps")
    batch = _batch(cfg, tiny_splits(4, 4, size=SIZE))
    assert batch["u_hflip"].any(), "this step must flip a slice for the test to mean anything"
    synth = FakeSynthesizer()
    torch.manual_seed(0)
    nets = {"model": UNet(UNetConfig(width=4, depth=2)), "peer": UNet(UNetConfig(width=4, depth=2))}
    out = cps_step(nets, batch, cfg.train, synth, seed=5, use_pseudo=True, use_synthetic=True)
    (call,) = synth.calls
    assert call["lung"].shape[-2:] == (SIZE, SIZE)  # the synthesizer's own frame
    x1_hat, x2_hat = out.extras["synthetic_model"], out.extras["synthetic_peer"]
    assert x1_hat.shape == batch["u_image"].shape  # cut to the boxes the networks see
    # the fake paints lung 0.12 and infection 0.45: inside the lung, grey above 0.3 is the label
    y1, y2 = out.extras["pseudo_model"], out.extras["pseudo_peer"]
    lung = torch.cat([batch["u_lung"], batch["u_lung"]])[:, None] > 0
    painted = torch.cat([x1_hat, x2_hat]) > 0.3
    labels = torch.cat([y2, y1]) > 0.5
    assert labels.any() and torch.equal(painted & lung, labels & lung)
    assert np.isfinite(out.terms["loss_synthetic"])


class _Shapes(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.net(x)


def test_validation_runs_the_network_on_lung_boxes_and_answers_nothing_outside_them():
    data = tiny_splits(4, 0, size=SIZE)
    images = np.concatenate([c.image for c in data.val])
    lung = np.concatenate([c.lung for c in data.val])
    torch.manual_seed(0)
    net = _Shapes(UNet(UNetConfig(width=4, depth=2)))
    with torch.no_grad():  # infection everywhere the network looks
        net.net.head.weight.zero_()
        net.net.head.bias.fill_(10.0)
    masks = predict_slices(net, images, 0.5, 16, lung, FieldOfView(MARGIN, 4))
    assert net.seen and all(s[0] < SIZE or s[1] < SIZE for s in net.seen)
    for mask, field in zip(masks, lung):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert (len(rows), len(cols)) in net.seen  # exactly the box the network was run on
        assert mask.sum() == len(rows) * len(cols) and mask[field > 0].all()  # a rectangle holding the field
    whole = predict_slices(net, images, 0.5, 16, lung)  # a network trained on whole frames: whole frames
    assert whole.all()


@pytest.fixture(scope="module")
def boxed_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("boxed")
    result = train(_cfg("baseline", epochs=3), out, data=tiny_splits())
    return out / "bundle", result


@pytest.mark.slow
def test_a_lung_box_bundle_records_its_margin_exports_dynamic_sides_and_plsynth_infer_runs_it_on_boxes(boxed_bundle):
    from plsynth.bundles.segmenter import load_bundle
    from plsynth.data.image import CTImage
    from plsynth.data.lungs import lung_field, lung_mask
    from plsynth.data.phantom import make_phantom
    from plsynth.deploy.predictor import Predictor

    path, _ = boxed_bundle
    bundle = load_bundle(path)
    assert bundle.lung_box == MARGIN and bundle.meta["input"]["shape"] == ["batch", 1, "height", "width"]
    p = make_phantom(1, (12, 96, 96), lesions=True)
    image = CTImage(array=p.hu, kind="hu", spacing=p.spacing, source=Path("phantom-1"))
    region = lung_field(image, lung_mask(image, backend="classical"))
    ort = Predictor.from_bundle(path, engine="ort", device="cpu", agreement=False, lung_fn=lambda i: region)
    assert ort.lung_box == MARGIN  # from the bundle, not asked for
    seen = []
    inner = ort.engines["model"]

    class Recording:
        name, provider = inner.name, inner.provider

        def run(self, x):
            seen.append(x.shape)
            return inner.run(x)

    ort.engines["model"] = Recording()
    unit_prob = ort.probabilities(image, region)
    assert seen and all(s[-1] < SIZE or s[-2] < SIZE for s in seen) and all(s[-1] % 4 == 0 for s in seen)
    assert len({s[-2:] for s in seen}) == 1  # every slice of the volume on the volume's box
    torch_pred = Predictor.from_bundle(path, engine="torch", device="cpu", agreement=False, lung_fn=lambda i: region)
    np.testing.assert_allclose(torch_pred.probabilities(image, region), unit_prob, atol=1e-4)
    whole = Predictor.from_bundle(path, engine="ort", device="cpu", agreement=False, lung_fn=lambda i: region,
                                  lung_box=None)
    assert whole.lung_box is None  # the benchmark's override still runs whole frames


def test_lung_box_is_a_margin_or_null(tmp_path):
    assert DataConfig(lung_box=0).lung_box == 0 and DataConfig().lung_box is None
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="lung_box"):
            DataConfig(lung_box=bad)
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  lung_box: null\n")
    assert load_config(path, ["data.lung_box=8"]).data.lung_box == 8
    with pytest.raises(ConfigError, match="lung_box"):
        load_config(path, ["data.lung_box=-3"])
    assert dataclasses.replace(_cfg("baseline"), data=DataConfig(image_size=SIZE)).data.lung_box is None


def test_the_volume_box_holds_every_slices_lung_box_in_multiples_inside_the_frame():
    lung = np.zeros((4, 100, 80), np.uint8)
    lung[0, 30:61, 10:31] = 1
    lung[2, 50:90, 40:70] = 2  # slice 1 and 3 hold no lung
    y0, y1, x0, x1 = volume_box(lung, 64, 4, 16)
    for (r0, r1), (c0, c1) in (((30, 61), (10, 31)), ((50, 90), (40, 70))):  # each slice's lung + 4 model pixels
        assert y0 <= int(r0 * 64 / 100) - 4 and y1 >= int(np.ceil(r1 * 64 / 100)) + 4
        assert x0 <= int(c0 * 64 / 80) - 4 and x1 >= int(np.ceil(c1 * 64 / 80)) + 4
    assert (y1 - y0) % 16 == 0 and (x1 - x0) % 16 == 0 and 0 <= y0 and y1 <= 64 and 0 <= x0 and x1 <= 64
    assert (y1 - y0) * (x1 - x0) < 64 * 64
    assert tuple(volume_box(np.zeros((2, 10, 10), np.uint8), 64, 4, 16)) == (0, 0, 0, 0)


@pytest.mark.slow
def test_a_lung_box_teacher_labels_the_unlabeled_slices_on_their_boxes(boxed_bundle, tmp_path):
    from plsynth.training.self_training import load_teacher, make_offline_set

    path, _ = boxed_bundle
    net, fingerprint, view = load_teacher(path)
    assert view == FieldOfView(MARGIN, 4) and fingerprint["teacher"]["lung_box"] == MARGIN
    teacher = _Shapes(net)
    data = tiny_splits(2, 6, size=SIZE)
    offline = make_offline_set(teacher, data.unlabeled, None, tmp_path, _cfg("st").train, fingerprint=fingerprint,
                               view=view)
    assert teacher.seen and all(s[0] < SIZE or s[1] < SIZE for s in teacher.seen)  # boxes, not frames
    assert len(offline) == 6 and offline[0]["pseudo"].shape[-2:] == (SIZE, SIZE)  # stored in whole frames
