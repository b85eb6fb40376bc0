"""Doing less work per volume: lung boxes on the model grid, the second network on a slice sample,
and spatially dynamic ONNX. Real phantoms, real lung field, real ONNX Runtime sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from plsynth.data.image import CTImage
from plsynth.data.lungs import lung_field, lung_mask
from plsynth.data.phantom import make_phantom
from plsynth.data.preprocess import lung_boxes
from plsynth.bundles.segmenter import Bundle
from plsynth.deploy.engines import TorchEngine
from plsynth.bundles.onnx_export import export_onnx
from plsynth.deploy.predictor import Predictor, agreement_slices
from plsynth.metrics import dice


def test_lung_boxes_cover_the_mapped_lung_plus_margin_in_multiples_inside_the_frame():
    lung = np.zeros((3, 100, 80), np.uint8)
    lung[0, 30:61, 10:31] = 1  # rows 30..60 of 100, columns 10..30 of 80
    lung[2, 0:100, 70:80] = 2  # touches three frame edges
    boxes = lung_boxes(lung, 64, margin=4, multiple=16)
    y0, y1, x0, x1 = boxes[0]
    assert y0 <= int(30 * 64 / 100) - 4 and y1 >= int(np.ceil(61 * 64 / 100)) + 4
    assert x0 <= int(10 * 64 / 80) - 4 and x1 >= int(np.ceil(31 * 64 / 80)) + 4
    assert (y1 - y0) % 16 == 0 and (x1 - x0) % 16 == 0 and (y1 - y0) < 64 and (x1 - x0) < 64
    assert tuple(boxes[1]) == (0, 0, 0, 0)  # no lung: empty box
    y0, y1, x0, x1 = boxes[2]
    assert (y0, y1) == (0, 64) and x1 == 64 and (x1 - x0) % 16 == 0 and x0 >= 0


def _bundle(size: int, depth: int = 2) -> Bundle:
    meta = {"image_size": size, "window_hu": [-1250.0, 250.0], "threshold": 0.5, "lung_handling": "none",
            "networks": {"model": {}, "peer": {}}, "config": {"model": {"depth": depth}}}
    return Bundle(Path("in-memory"), meta)


def _smoothing_net(cut: float) -> torch.nn.Module:
    """A 'network' with a 5x5 receptive field: logit > 0 where the local mean exceeds ``cut``."""
    net = torch.nn.Conv2d(1, 1, 5, padding=2)
    with torch.no_grad():
        net.weight.fill_(40.0 / 25)
        net.bias.fill_(-40.0 * cut)
    return net.eval()


@pytest.fixture(scope="module")
def phantom():
    p = make_phantom(3, (24, 128, 128), lesions=True)
    image = CTImage(array=p.hu, kind="hu", spacing=p.spacing, source=Path("phantom-3"))
    return p, image, lung_field(image, lung_mask(image, backend="classical"))


def test_lung_box_masks_equal_full_frame_masks_and_keep_lesions_at_the_lung_edge(phantom):
    """A network whose receptive field fits in the margin gives the same mask on the box as on the
    frame: nothing at the box border is lost, lesions touching the pleura included."""
    p, image, region = phantom
    engines = {"model": TorchEngine(_smoothing_net(0.4))}  # GGO (~0.5) and denser marked, aerated lung (~0.27) not
    full = Predictor(_bundle(64), engines, batch_size=4, lung_fn=lambda i: region).predict(image, region)
    boxed = Predictor(_bundle(64), engines, batch_size=4, lung_fn=lambda i: region, lung_box=3).predict(image, region)
    boxes = lung_boxes(region, 64, 3, 4)
    assert (boxes[:, 1] - boxes[:, 0]).max() < 64  # the boxes really cut the frame
    assert full.infection.sum() > 1000
    np.testing.assert_array_equal(boxed.infection, full.infection)
    edge = region > 0
    edge &= ~np.pad(edge, ((0, 0), (1, 1), (1, 1)))[:, 2:, 1:-1]  # field pixels whose lower neighbour is outside
    at_edge = edge & (p.infection > 0)
    assert at_edge.sum() > 20  # the phantom has subpleural lesions at the field's edge
    assert (boxed.infection[at_edge] > 0).mean() > 0.9


class _Counting:
    name, provider = "torch", "torch:cpu"

    def __init__(self, net) -> None:
        self.inner, self.slices = TorchEngine(net), 0

    def run(self, x):
        self.slices += len(x)
        return self.inner.run(x)


def test_agreement_on_every_fourth_lung_slice_estimates_the_full_agreement():
    p = make_phantom(4, (96, 96, 96), lesions=True)
    image = CTImage(array=p.hu, kind="hu", spacing=p.spacing, source=Path("phantom-4"))
    region = lung_field(image, lung_mask(image, backend="classical"))
    with_lung = int(region.reshape(len(region), -1).any(1).sum())
    estimates = {}
    for peer_cut in (0.4, 0.41, 0.55):  # the same network, a close one, a very different one
        full = Predictor(_bundle(64), {"model": TorchEngine(_smoothing_net(0.4)), "peer": TorchEngine(_smoothing_net(peer_cut))},
                         lung_fn=lambda i: region, agreement_every=1).predict(image, region)
        peer = _Counting(_smoothing_net(peer_cut))
        sampled = Predictor(_bundle(64), {"model": TorchEngine(_smoothing_net(0.4)), "peer": peer},
                            lung_fn=lambda i: region, agreement_every=4).predict(image, region)
        assert peer.slices == len(agreement_slices(region, 4)) == -(-with_lung // 4)
        assert abs(sampled.agreement - full.agreement) < 0.05
        estimates[peer_cut] = sampled.agreement
    assert estimates[0.4] == 1.0 and 0.8 < estimates[0.41] < 1.0 and estimates[0.55] < 0.8  # the flag keeps its meaning


def test_agreement_slices_spread_over_the_lung_and_take_every_slice_at_k1():
    lung = np.zeros((20, 4, 4), np.uint8)
    lung[3:17, 1, 1] = 1
    assert list(agreement_slices(lung, 1)) == list(range(3, 17))
    picked = agreement_slices(lung, 4)
    assert len(picked) == 4 and np.all(np.diff(picked) == 4) and picked[0] >= 3 and picked[-1] <= 16


def test_spatially_dynamic_onnx_runs_any_multiple_of_the_depth_and_matches_torch(tmp_path):
    from plsynth.config import UNetConfig
    from plsynth.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(UNetConfig(width=4, depth=2)).eval()
    path = export_onnx(net, tmp_path / "m.onnx", {"x": torch.zeros(1, 1, 32, 32)}, ["logits"], spatial=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 1, 32, 32), (3, 1, 48, 20)):
        x = np.random.default_rng(1).random(shape, dtype=np.float32)
        with torch.inference_mode():
            ref = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x})[0], ref, atol=1e-4)


def test_small_components_removed_in_the_bounding_box_as_in_the_whole_volume():
    from scipy import ndimage

    from plsynth.deploy.postprocess import remove_small_components

    rng = np.random.default_rng(0)
    mask = np.zeros((40, 64, 64), bool)
    mask[5:30, 10:50, 20:60] = rng.random((25, 40, 40)) > 0.93  # components of every size, many tiny
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    expected = (sizes >= 6)[labels] & mask
    got = remove_small_components(mask, 6)
    assert got.dtype == np.uint8 and 0 < got.sum() < mask.sum()
    np.testing.assert_array_equal(got.astype(bool), expected)


def test_predict_keeps_no_volume_of_probabilities_nor_a_windowed_copy():
    """The fresh memory a volume needs costs as much time as the arithmetic on 2 cores
    (BENCHMARKS.md): predict windows, thresholds and clips a batch at a time, so its numpy peak
    stays near the two uint8 masks it returns, not the float32 volumes (4 bytes a voxel each) it
    used to hold. tracemalloc sees numpy's arrays (torch's own buffers are not counted)."""
    import tracemalloc

    from plsynth.deploy.predictor import give_back_freed_memory, keep_freed_memory

    assert keep_freed_memory() and give_back_freed_memory()  # glibc here: kept within a case, given back after it
    p = make_phantom(5, (48, 128, 128), lesions=True)
    image = CTImage(array=p.hu, kind="hu", spacing=p.spacing, source=Path("phantom-5"))
    region = lung_field(image, lung_mask(image, backend="classical"))
    engines = {"model": TorchEngine(_smoothing_net(0.4)), "peer": TorchEngine(_smoothing_net(0.41))}
    for box in (None, 3):
        predictor = Predictor(_bundle(128), engines, batch_size=4, lung_fn=lambda i: region, lung_box=box)
        tracemalloc.start()
        result = predictor.predict(image, region)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.infection.sum() > 1000 and 0.8 < result.agreement <= 1.0
        assert peak / region.size < 6.0, f"lung_box={box}: {peak / region.size:.1f} bytes per voxel"


def test_lungs_and_field_are_the_same_on_one_thread_and_on_several(monkeypatch):
    from plsynth.data import lungs

    p = make_phantom(6, (20, 400, 400), lesions=True)  # >= 384 px: the half-resolution paths
    image = CTImage(array=p.hu, kind="hu", spacing=p.spacing, source=Path("phantom-6"))
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(lungs, "SLICE_THREADS", threads)
        labels = lung_mask(image, backend="classical")
        results.append((labels, lung_field(image, labels)))
    assert results[0][0].any() and (results[0][1] > 0).sum() > (results[0][0] > 0).sum()
    for one, several in zip(*results):
        np.testing.assert_array_equal(one, several)
