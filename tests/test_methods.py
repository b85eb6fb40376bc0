"""The segmentation methods: who supervises whom, what the synthesizer is handed, and that every
method overfits a few phantom slices (Dice >= 0.8 on them).

Data are tiny ellipse phantoms made in `_training_data`; the synthesizer is a fake painter of
the semantic map (a trained SEAN bundle cannot be made inside a unit test), standing in for
`SynthesisClient` only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _training_data import FakeSynthesizer, tiny_splits
from plsynth.config import Config, DataConfig, OptimConfig, TrainConfig, UNetConfig
from plsynth.data.semantic import INFECTION, semantic_map
from plsynth.models.unet import UNet
from plsynth.training.losses import seg_loss
from plsynth.training.loop import BatchMaker, train
from plsynth.training.methods import cps_step, cross_pseudo_terms, method_switches, pseudo_label
from plsynth.training.schedule import BatchPlan

torch.set_num_threads(1)


def _cfg(method: str, **train) -> Config:
    base = dict(method=method, epochs=24, batch_labeled=4, batch_unlabeled=4, rotate_degrees=0.0, val_every_iters=10**6)
    base.update(train)
    return Config(
        data=DataConfig(image_size=32),
        model=UNetConfig(width=8, depth=2),
        optim=OptimConfig(lr=0.1),
        train=TrainConfig(**base),
    )


def _batch(cfg: Config, data, step: int = 0) -> dict:
    plan = BatchPlan(len(data.labeled), len(data.unlabeled), 4, 4, 0)
    return BatchMaker(cfg, data.labeled, data.unlabeled, plan, "cpu")(step)


def _nets(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    a = UNet(UNetConfig(width=4, depth=2))
    torch.manual_seed(seed + 1)
    b = UNet(UNetConfig(width=4, depth=2))
    return {"model": a, "peer": b}


def test_switches_follow_the_paper_tables():
    assert method_switches(TrainConfig(method="baseline")) == (False, False)
    assert method_switches(TrainConfig(method="cps", use_synthetic=True)) == (True, False)
    assert method_switches(TrainConfig(method="st", use_synthetic=True)) == (True, False)
    assert method_switches(TrainConfig(method="sa-cps", use_pseudo=False)) == (False, True)
    assert method_switches(TrainConfig(method="sa-st", use_synthetic=False)) == (True, False)


def test_pseudo_label_thresholds_at_tau_inside_the_lung_without_gradient():
    logits = torch.tensor([[[[2.0, -2.0], [0.0, 3.0]]]], requires_grad=True)  # p: .88 .12 / .5 .95
    lung = torch.tensor([[[1, 1], [2, 0]]])
    label = pseudo_label(logits, 0.5, lung)
    assert label.tolist() == [[[[1.0, 0.0], [1.0, 0.0]]]]  # p = tau counts (eq. 9 uses >=); outside lung dropped
    assert not label.requires_grad


def test_cps_supervises_each_network_with_the_others_detached_prediction():
    cfg = _cfg("cps")
    data = tiny_splits(4, 4, size=32)
    batch = _batch(cfg, data)
    nets = _nets()
    x = torch.cat([batch["image"], batch["u_image"]])
    with torch.no_grad():
        o1, o2 = nets["model"](x), nets["peer"](x)
    lung_in = (batch["u_lung"][:, None] > 0).float()
    y1 = (torch.sigmoid(o1[4:]) >= 0.5).float() * lung_in
    y2 = (torch.sigmoid(o2[4:]) >= 0.5).float() * lung_in
    assert not torch.equal(y1, y2)  # different initialisations disagree: the test can tell them apart

    out = cps_step(nets, batch, cfg.train)
    assert torch.equal(out.extras["pseudo_model"], y1) and torch.equal(out.extras["pseudo_peer"], y2)
    expected = (
        seg_loss(o1[:4], batch["label"]) + seg_loss(o2[:4], batch["label"])
        + 0.5 * (seg_loss(o1[4:], y2) + seg_loss(o2[4:], y1))
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # Gradient of the cross term w.r.t. network 1's logits is that of L_seg against the peer's
    # label taken as a constant: no path into network 2 through its pseudo-label.
    l1 = o1[4:].clone().requires_grad_(True)
    l2 = o2[4:].clone().requires_grad_(True)
    term, _, _ = cross_pseudo_terms(l1, l2, 0.5, batch["u_lung"])
    g1, g2 = torch.autograd.grad(term, [l1, l2])
    ref1 = l1.detach().clone().requires_grad_(True)
    (expected_g1,) = torch.autograd.grad(seg_loss(ref1, y2), [ref1])
    ref2 = l2.detach().clone().requires_grad_(True)
    (expected_g2,) = torch.autograd.grad(seg_loss(ref2, y1), [ref2])
    assert torch.allclose(g1, expected_g1, atol=1e-7) and torch.allclose(g2, expected_g2, atol=1e-7)


def test_sa_cps_hands_the_synthesizer_each_pseudo_label_with_the_lung_and_trains_the_other_network():
    cfg = _cfg("sa-cps", flip=False)
    data = tiny_splits(4, 4, size=32)
    batch = _batch(cfg, data)
    nets = _nets(3)
    synth = FakeSynthesizer()
    out = cps_step(nets, batch, cfg.train, synth, seed=11, use_pseudo=True, use_synthetic=True)
    (call,) = synth.calls
    y1, y2 = out.extras["pseudo_model"], out.extras["pseudo_peer"]
    # eq. 10: x1_hat = Dec(y2) for s1 first, then x2_hat = Dec(y1) for s2, each with the slice's lung.
    assert torch.equal(call["infection"], torch.cat([y2, y1]))
    assert torch.equal(call["lung"], torch.cat([batch["u_lung"], batch["u_lung"]]))
    assert call["seed"] == 11
    merged = semantic_map(call["lung"], call["infection"][:, 0].long())
    assert torch.equal(merged == INFECTION, call["infection"][:, 0] > 0)
    outside = call["infection"][:, 0] == 0
    assert torch.equal(merged[outside], call["lung"][outside])
    x1_hat, x2_hat = out.extras["synthetic_model"], out.extras["synthetic_peer"]
    assert "loss_synthetic" in out.terms and out.terms["loss_synthetic"] > 0
    # The synthetic term is L_seg(s1(x1_hat), y2) + L_seg(s2(x2_hat), y1) (eq. 12): recompute it.
    with torch.no_grad():
        expected = seg_loss(nets["model"](x1_hat), y2) + seg_loss(nets["peer"](x2_hat), y1)
    assert out.terms["loss_synthetic"] == pytest.approx(expected.item(), rel=1e-4)
    assert "loss_pseudo" in out.terms
    # Table II's row (use_pseudo off): the same pseudo-labels feed the synthesizer, but the pseudo
    # term trains nothing, so the log does not report it as a loss term.
    synth_only = cps_step(nets, batch, cfg.train, FakeSynthesizer(), seed=11, use_pseudo=False, use_synthetic=True)
    assert set(synth_only.terms) == {"loss_s", "loss_synthetic"}
    assert synth_only.loss.item() == pytest.approx(synth_only.terms["loss_s"] + cfg.train.lam * synth_only.terms["loss_synthetic"], rel=1e-5)


def test_sa_cps_synthesizes_from_the_unaugmented_map_then_moves_image_and_label_together():
    cfg = _cfg("sa-cps", flip=True)
    data = tiny_splits(4, 4, size=32)
    raw = _batch(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, flip=False)), data, step=1)
    batch = _batch(cfg, data, step=1)
    hflip = batch["u_hflip"]
    assert hflip.any(), "this step's draw must flip some slice for the test to mean anything"
    synth = FakeSynthesizer()
    out = cps_step(_nets(3), batch, cfg.train, synth, seed=5, use_pseudo=True, use_synthetic=True)
    (call,) = synth.calls
    # the synthesizer sees each slice's own (un-augmented) lung, left lung still class 1 ...
    assert torch.equal(call["lung"], torch.cat([raw["u_lung"], raw["u_lung"]]))
    # ... and the pseudo-labels taken back to that frame (the augmented ones flipped back)
    y1, y2 = out.extras["pseudo_model"], out.extras["pseudo_peer"]
    theta = torch.cat([batch["u_theta"], batch["u_theta"]])
    expected = torch.cat([y2, y1]).clone()
    for i, t in enumerate(theta):
        dims = [d for d, sign in ((-1, t[0, 0]), (-2, t[1, 1])) if sign < 0]
        expected[i] = expected[i].flip(dims) if dims else expected[i]
    assert torch.equal(call["infection"], expected)
    # the synthetic image comes back in the augmented frame: its painted infection is the label
    x1_hat, x2_hat = out.extras["synthetic_model"], out.extras["synthetic_peer"]
    # (the fake paints lung 0.12 and infection 0.45, so inside the lung a grey above 0.3 is infection)
    lung = torch.cat([batch["u_lung"], batch["u_lung"]])[:, None] > 0
    painted = torch.cat([x1_hat, x2_hat]) > 0.3
    labels = torch.cat([y2, y1]) > 0.5
    assert labels.any() and torch.equal(painted & lung, labels & lung)


def test_sa_cps_draws_with_a_real_vessel_synthesizer_from_the_slices_it_hands_over(tmp_path):
    """A synth.vessels bundle needs the slices (it reads their vessels): SA-CPS hands them over."""
    from _fixtures import TINY_SYNTH, write_synth_bundle
    from plsynth.data.semantic import VESSEL
    from plsynth.synth_service.local import LocalSynthesizer

    path, _ = write_synth_bundle(tmp_path / "synth", Config(synth=dataclasses.replace(TINY_SYNTH, vessels=True)))

    class Recording(LocalSynthesizer):
        calls: list = []

        def synthesize(self, infection, lung, images=None, seed=None):
            self.calls.append({"images": images, "map": self.semantic(infection, lung, images)})
            return super().synthesize(infection, lung, images=images, seed=seed)

    cfg = _cfg("sa-cps", flip=False)
    data = tiny_splits(4, 4, size=32)
    batch = _batch(cfg, data)
    for it in range(len(batch["u_image"])):  # a bright 1-px line through each lung: a vessel to find
        batch["u_image"][it, 0, 8:24, 24] = 0.9
    synth = Recording(path)
    out = cps_step(_nets(3), batch, cfg.train, synth, seed=2, use_pseudo=True, use_synthetic=True)
    (call,) = synth.calls
    assert torch.equal(call["images"], torch.cat([batch["u_image"], batch["u_image"]]))
    assert (call["map"] == VESSEL).any()
    assert out.extras["synthetic_model"].shape == batch["u_image"].shape and out.terms["loss_synthetic"] > 0


def test_sa_cps_without_a_synthesizer_is_a_clear_error():
    cfg = _cfg("sa-cps")
    batch = _batch(cfg, tiny_splits(4, 4))
    with pytest.raises(ValueError, match="synthesis client"):
        cps_step(_nets(), batch, cfg.train, None, use_synthetic=True)


def _overfit_dice(result) -> float:
    return result.last_val["dice"]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    result = train(_cfg("baseline"), out, data=tiny_splits(), write_bundle=False)
    return out, result


@pytest.mark.slow
def test_baseline_overfits_a_few_phantom_slices(baseline_run):
    out, result = baseline_run
    assert _overfit_dice(result) >= 0.8
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + 24 * 3  # header + epochs * ceil(12 unlabeled / 4): the same budget as CPS
    assert (out / "curves.png").stat().st_size > 1000 and (out / "best.pt").is_file()


@pytest.mark.slow
def test_cps_overfits_a_few_phantom_slices(tmp_path):
    result = train(_cfg("cps"), tmp_path, data=tiny_splits(), write_bundle=False)
    assert _overfit_dice(result) >= 0.8


@pytest.mark.slow
def test_sa_cps_overfits_and_its_bundle_records_the_synthesizer(tmp_path):
    synth = FakeSynthesizer()
    result = train(_cfg("sa-cps"), tmp_path, data=tiny_splits(), synth=synth)
    assert _overfit_dice(result) >= 0.8
    assert len(synth.calls) == 24 * 3
    meta = json.loads((tmp_path / "bundle" / "meta.json").read_text())
    assert meta["method"] == "sa-cps"
    assert meta["synthesizer"] == {"bundle": "", "sha256": FakeSynthesizer.bundle_sha256, "backend": "fake:test"}
    assert set(meta["networks"]) == {"model", "peer"}
    assert meta["metrics"]["val_dice"] == pytest.approx(result.best["dice"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["st", "sa-st"])
def test_self_training_overfits_from_an_offline_set_made_once(method, baseline_run, tmp_path):
    teacher_out, _ = baseline_run
    cfg = _cfg(method, teacher=str(teacher_out / "best.pt"))
    synth = FakeSynthesizer()
    data = tiny_splits()
    result = train(cfg, tmp_path, data=data, synth=synth, write_bundle=(method == "sa-st"))
    assert _overfit_dice(result) >= 0.8
    offline = tmp_path / "offline"
    if method == "sa-st":
        meta = json.loads((tmp_path / "bundle" / "meta.json").read_text())
        assert meta["synthesizer"]["sha256"] == FakeSynthesizer.bundle_sha256
        assert meta["synthesizer"]["backend"] == "fake:test"
        assert meta["teacher"]["checkpoint"].endswith("best.pt")
    manifest = json.loads((offline / "manifest.json").read_text())
    pseudo = np.load(offline / "pseudo-00000.npy")
    assert pseudo.shape == (12, 32, 32) and pseudo.dtype == np.uint8
    lungs = np.stack([it["lung"] for it in data.unlabeled])
    assert not pseudo[lungs == 0].any()  # kept inside the lung
    truth = np.stack([it["truth"][0] for it in data.unlabeled])
    assert 2 * (pseudo * truth).sum() / (pseudo.sum() + truth.sum()) > 0.5  # the teacher's labels are informative
    if method == "sa-st":
        assert len(synth.calls) == 1  # 12 slices, offline_batch 16: synthesized once, offline
        assert np.load(offline / "synthetic-00000.npy").shape == (12, 32, 32)
        assert manifest["key"]["synthesizer"]["backend"] == "fake:test"
    else:
        assert not synth.calls and not (offline / "synthetic-00000.npy").exists()
    # A second run in a new folder would rebuild; the same folder reuses the stored set.
    again = train(dataclasses.replace(cfg), tmp_path, data=data, synth=synth, write_bundle=False)
    assert again.steps == result.steps and len(synth.calls) == (1 if method == "sa-st" else 0)


@pytest.mark.parametrize("name", ["covid19-20-10", "covid19-20-20", "covid19-20-30", "mosmed-40"])
def test_paper_presets_use_the_papers_numbers_and_existing_split_files(name):
    from plsynth.config import load_config
    from plsynth.data.splits import splits_folder

    cfg = load_config(name)  # the preset shipped in the package
    assert cfg.data.image_size == 512 and cfg.train.epochs == (10 if name.startswith("mosmed") else 20)
    assert (cfg.train.batch_labeled, cfg.train.batch_unlabeled, cfg.optim.lr, cfg.train.tau) == (8, 8, 0.01, 0.5)
    for split in (cfg.data.labeled_split, cfg.data.unlabeled_split, cfg.data.val_split):
        assert (splits_folder(cfg.data.splits_dir) / split).is_file()


def test_semiseg_cpu_preset_is_small_and_capped():
    from plsynth.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "semiseg-cpu.yaml")
    assert cfg.data.layout == "semiseg" and cfg.data.image_size <= 192 and cfg.model.width <= 16
    assert cfg.train.max_iters > 0


@pytest.mark.slow
def test_train_entry_point_on_phantoms_leaves_a_bundle_that_plsynth_eval_scores(tmp_path):
    """The real path: build_splits on generated phantoms -> train -> DIR/bundle -> evaluate_bundle."""
    from plsynth.training.evaluate import evaluate_bundle

    cfg = Config(
        data=DataConfig(layout="phantom", phantom_n=3, phantom_shape=(8, 48, 48), image_size=32,
                        val_fraction=0.34, labeled_fraction=0.5),
        model=UNetConfig(width=4, depth=2),
        train=TrainConfig(method="baseline", epochs=2, batch_labeled=4, batch_unlabeled=4, threads=1),
    )
    bundle = train(cfg, tmp_path / "run").bundle
    assert bundle == tmp_path / "run" / "bundle" and (bundle / "model.onnx").is_file()
    meta = json.loads((bundle / "meta.json").read_text())
    assert meta["method"] == "baseline" and meta["metrics"]["selected"] == "best"
    result = evaluate_bundle(bundle, cfg, out=tmp_path / "eval")
    assert result["cases"] >= 1 and 0.0 <= result["dice"] <= 1.0
    lines = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "case,unit,dice,nsd" and lines[-1].startswith("mean,")
    assert len(lines) == 2 + result["cases"]
    stored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert stored["dice"] == pytest.approx(result["dice"])
    # The validation the run logged for its best checkpoint is what eval measures again.
    assert result["dice"] == pytest.approx(meta["metrics"]["val_dice"], abs=1e-6)


def test_validation_every_n_iterations_makes_a_curve_in_val_csv_and_curves_png(tmp_path):
    # 12 unlabeled slices at batch 4: 3 iterations per epoch, 9 in all; every 4 -> after 4, 8 and the last
    train(_cfg("baseline", epochs=3, val_every_iters=4), tmp_path, data=tiny_splits(), write_bundle=False)
    rows = (tmp_path / "val.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "4", "8", "9"]
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_compiled_steps_follow_the_eager_losses_and_checkpoints_hold_the_plain_networks(tmp_path):
    def losses(out):
        return [float(r.split(",")[3]) for r in (out / "log.csv").read_text().splitlines()[1:]]

    eager = train(_cfg("cps", epochs=1), tmp_path / "eager", data=tiny_splits(), write_bundle=False)
    compiled = train(_cfg("cps", epochs=1, compile=True), tmp_path / "compiled", data=tiny_splits(), write_bundle=False)
    assert len(losses(tmp_path / "compiled")) == 3
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    assert compiled.last_val["dice"] == pytest.approx(eager.last_val["dice"], abs=1e-3)
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert not any("_orig_mod" in k for net in state["networks"].values() for k in net)


@pytest.mark.slow
def test_with_no_working_cxx_compiler_a_compiled_run_warns_and_trains_on_uncompiled(tmp_path):
    """``train.compile: true`` (the CPU preset's) where torch.compile cannot build its kernels, as
    in a container without a C++ compiler: a real inductor failure (CXX names a missing compiler,
    in a fresh process with its own empty kernel cache), then a warning and the eager step, whose
    losses are the uncompiled run's; not a traceback."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from pathlib import Path\n"
        "from _training_data import tiny_splits\n"
        "from test_methods import _cfg\n"
        "from plsynth.training.loop import train\n"
        f"train(_cfg('cps', epochs=1, compile=True), Path({str(tmp_path / 'compiled')!r}), data=tiny_splits(), write_bundle=False)\n"
    )
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "kernels"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.compile failed" in done.stderr and "Traceback" not in done.stderr

    def losses(out):
        return [float(r.split(",")[3]) for r in (out / "log.csv").read_text().splitlines()[1:]]

    train(_cfg("cps", epochs=1), tmp_path / "eager", data=tiny_splits(), write_bundle=False)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
