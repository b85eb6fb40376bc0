"""ST / SA-ST, Algorithm 1 steps 1-3: a teacher labels the unlabeled slices once, offline, and
(SA-ST) the synthesizer draws one image per pseudo-label; both are stored under ``out/offline``.

Layout of the offline folder (each file written atomically, the manifest last)::

    pseudo-00000.npy     (n, S, S) uint8 {0, 1}: teacher's 1(p >= tau), kept inside the lung
    synthetic-00000.npy  (n, S, S) float16 in [0, 1]: Dec(semantic(lung, pseudo), SC_ref) (SA-ST only)
    manifest.json        count, shard size, tau, teacher and synthesizer fingerprints

Shards follow the unlabeled dataset's order. A run killed while labeling resumes at the first
missing shard; a manifest whose fingerprint differs (other teacher, tau, synthesizer) is rebuilt.
`make_offline_set` is the one function that does the work; under Ray its client is the pool of
synthesis actors (``synth_service.actor.ActorPool``), which draws a shard's batches in parallel.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plsynth.config import TrainConfig
from plsynth.data.preprocess import FieldOfView, run_on_lung_boxes
from plsynth.training.methods import pseudo_label
from plsynth.training.schedule import Stream, step_seed

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_SIZE = 256


def _stack(items: list[dict], key: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([torch.as_tensor(np.asarray(it[key])) for it in items]).to(dtype)


def _draw(synth_client: Any, requests: list[dict]) -> list[torch.Tensor]:
    """Synthesize every request of a shard: at once when the client serves several in parallel
    (``synthesize_many``: the Ray actor pool), else one after the other."""
    many = getattr(synth_client, "synthesize_many", None)
    if many is not None:
        return many(requests)
    return [synth_client.synthesize(**request) for request in requests]


def make_offline_set(
    teacher: torch.nn.Module,
    unlabeled: Any,
    synth_client: Any,
    out_dir: Path,
    train: TrainConfig,
    *,
    fingerprint: dict | None = None,
    shard_size: int = SHARD_SIZE,
    view: FieldOfView = FieldOfView(),
) -> "OfflineSet":
    """Label every unlabeled slice with ``teacher`` and, when ``synth_client``, synthesize its twin.

    teacher: a U-Net (logits); put in eval mode here. unlabeled: a dataset of slice items
    ("image" (1,S,S), "lung" (S,S)). synth_client: a `SynthesisClient` or None (plain ST); one
    with ``synthesize_many`` (``synth_service.actor.ActorPool``) draws a shard's batches in parallel.
    train: the run's ``train`` section (``tau``, ``pseudo_in_lung``, ``offline_batch``, ``seed``).
    Synthesis of batch b uses seed ``step_seed(seed, b, Stream.OFFLINE_SYNTHESIS)``, so the set is
    reproducible and a resumed build gives the same files. Returns the `OfflineSet` reading the
    stored shards.
    """
    from plsynth.atomic import atomic_write_npy, atomic_write_text

    tau, pseudo_in_lung, batch_size, seed = train.tau, train.pseudo_in_lung, train.offline_batch, train.seed
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(unlabeled)
    if n == 0:
        raise ValueError("make_offline_set: the unlabeled set is empty; st / sa-st need unlabeled slices")
    key = {
        "count": n,
        "shard_size": shard_size,
        "tau": tau,
        "pseudo_in_lung": pseudo_in_lung,
        "seed": seed,
        "synthetic": synth_client is not None,
        "synthesizer": None
        if synth_client is None
        else {"sha256": synth_client.bundle_sha256, "backend": synth_client.backend},
        **(fingerprint or {}),
    }
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == json.loads(json.dumps(key)):
            logger.info("offline set: reusing %s (%d slices)", out_dir, n)
            return OfflineSet(unlabeled, out_dir)
        logger.info("offline set: %s was made with other settings; rebuilding", out_dir)
        manifest_path.unlink()
        for old in list(out_dir.glob("pseudo-*.npy")) + list(out_dir.glob("synthetic-*.npy")):
            old.unlink()
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    shards = []
    positive = 0
    for shard, start in enumerate(range(0, n, shard_size)):
        stop = min(n, start + shard_size)
        names = {"pseudo": f"pseudo-{shard:05d}.npy"}
        if synth_client is not None:
            names["synthetic"] = f"synthetic-{shard:05d}.npy"
        shards.append({"start": start, "stop": stop, **names})
        if all((out_dir / f).is_file() for f in names.values()):
            positive += int(np.load(out_dir / names["pseudo"], mmap_mode="r").sum())
            continue
        pseudo_parts, requests = [], []
        for b0 in range(start, stop, batch_size):
            items = [unlabeled[i] for i in range(b0, min(stop, b0 + batch_size))]
            image = _stack(items, "image", torch.float32).to(device)
            lung = _stack(items, "lung", torch.long).to(device)
            with torch.no_grad():
                pseudo = pseudo_label(run_on_lung_boxes(teacher, image, lung, view), tau, lung if pseudo_in_lung else None)
            pseudo_parts.append(pseudo[:, 0].cpu().numpy().astype(np.uint8))
            requests.append({"infection": pseudo, "lung": lung, "images": image,
                             "seed": step_seed(seed, b0 // batch_size, Stream.OFFLINE_SYNTHESIS)})
        pseudo_array = np.concatenate(pseudo_parts)
        positive += int(pseudo_array.sum())
        if synth_client is not None:
            with torch.no_grad():
                drawn = _draw(synth_client, requests)
            synthetic = [d[:, 0].float().clamp(0, 1).cpu().numpy().astype(np.float16) for d in drawn]
            atomic_write_npy(out_dir / names["synthetic"], np.concatenate(synthetic))
        atomic_write_npy(out_dir / names["pseudo"], pseudo_array)
        logger.info("offline set: %d / %d slices labeled%s", stop, n, " and drawn" if synth_client is not None else "")
    teacher.train(was_training)
    size = int(np.asarray(unlabeled[0]["image"]).shape[-1])
    manifest = {"key": key, "shards": shards, "image_size": size, "pseudo_positive_fraction": positive / (n * size * size)}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    logger.info("offline set: %s, %.1f %% of pixels pseudo-infection", out_dir, 100 * manifest["pseudo_positive_fraction"])
    return OfflineSet(unlabeled, out_dir)


class OfflineSet(torch.utils.data.Dataset):
    """The unlabeled slices with their stored pseudo-label (and synthetic image).

    Items: the unlabeled item's "image", "lung", "case", "index", plus "pseudo" (1, S, S) float32
    {0, 1} and, for SA-ST, "synthetic" (1, S, S) float32 in [0, 1].
    """

    def __init__(self, unlabeled: Any, out_dir: Path) -> None:
        self.unlabeled = unlabeled
        self.out_dir = Path(out_dir)
        manifest = json.loads((self.out_dir / MANIFEST).read_text())
        self.manifest = manifest
        self.has_synthetic = bool(manifest["key"]["synthetic"])
        self._starts = [s["start"] for s in manifest["shards"]]
        self._pseudo = [np.load(self.out_dir / s["pseudo"], mmap_mode="r") for s in manifest["shards"]]
        self._synthetic = (
            [np.load(self.out_dir / s["synthetic"], mmap_mode="r") for s in manifest["shards"]] if self.has_synthetic else None
        )
        if len(unlabeled) != manifest["key"]["count"]:
            raise ValueError(f"{self.out_dir}: offline set holds {manifest['key']['count']} slices, dataset has {len(unlabeled)}")

    def __len__(self) -> int:
        return len(self.unlabeled)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.unlabeled[index])
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        offset = index - self._starts[shard]
        item["pseudo"] = np.asarray(self._pseudo[shard][offset], dtype=np.float32)[None]
        if self._synthetic is not None:
            item["synthetic"] = np.asarray(self._synthetic[shard][offset], dtype=np.float32)[None]
        return item


def load_teacher(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict, FieldOfView]:
    """The teacher U-Net from a segmenter bundle folder or a run checkpoint (``best.pt``/``last.pt``).

    Returns (network in eval mode, fingerprint, the field of view it was trained on) where the
    fingerprint names the teacher's exact weights (bundle meta sha256 or checkpoint step), so a
    changed teacher rebuilds the offline set.
    """
    path = Path(path)
    if path.is_dir():
        from plsynth.bundles.segmenter import load_bundle

        bundle = load_bundle(path)
        net = bundle.torch_networks(device)["model"]
        view = bundle.field_of_view
        info = {"bundle": str(path), "sha256": bundle.meta_sha256(), "method": bundle.meta.get("method")}
    elif path.is_file():
        from plsynth.config import saved_config
        from plsynth.models.unet import unets_from_states
        from plsynth.training.checkpoint import load_checkpoint

        state = load_checkpoint(path)
        cfg = saved_config(state["config"], where=str(path))
        net = unets_from_states(cfg.model, {"model": state["networks"]["model"]}, device)["model"]
        view = FieldOfView.of(cfg)
        info = {"checkpoint": str(path), "step": state["step"], "method": state["method"]}
    else:
        raise ValueError(f"{path}: train.teacher must be a segmenter bundle folder or a run checkpoint (.pt); not found")
    if view.lung_box is not None:  # its pseudo-labels depend on it
        info["lung_box"] = view.lung_box
    return net, {"teacher": info}, view
