"""SA-ST offline synthesis with several synthesis actors, into atomically written shards.

Produces exactly the offline folder of `plsynth.training.self_training.make_offline_set`
(``pseudo-NNNNN.npy``, ``synthetic-NNNNN.npy``, ``manifest.json`` with the same key), so the
training loop that later calls ``make_offline_set`` with the same teacher, tau, seed and
synthesizer finds the manifest and reuses the shards instead of redoing them.

The teacher labels each shard in this process; the shard's batches are sent to the actors
round-robin, all in flight at once, so N actors decode N batches in parallel (and each actor
batches what it receives). Every shard file is written to a temporary name and renamed, the
manifest last: an interrupted run never leaves a half-written shard, and a rerun resumes at
the first missing shard.

Slices are labeled and drawn un-augmented, in the frame the synthesizer learned; the training
loop later moves each synthetic image with its real twin and pseudo-label by one transform
(SA-CPS does the same per step: ``training.methods.synthesize_pairs``).

Reproducibility: pseudo-labels and each batch's pool draw are fixed by (seed, batch index),
as in ``make_offline_set``; decoder noise is fixed per batch only when an actor decodes that
batch alone (actors merge concurrent requests into one decoder call seeded by the first).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


def _save_npy(path: Path, array: np.ndarray) -> None:
    from plsynth.atomic import atomic_write

    with atomic_write(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def synthesize_offline_set(
    teacher: Any,
    unlabeled: Any,
    actors: Sequence[Any],
    out_dir: Path,
    *,
    synthesizer: dict[str, str],
    tau: float = 0.5,
    pseudo_in_lung: bool = True,
    batch_size: int = 16,
    seed: int = 0,
    fingerprint: dict | None = None,
    shard_size: int | None = None,
) -> dict[str, Any]:
    """Label ``unlabeled`` with ``teacher`` and draw a synthetic twin of every slice with ``actors``.

    actors: handles of synthesis actors (``get_or_create_actor`` / ``start_synthesis_actors``).
    synthesizer: {"sha256", "backend"} of the actors' decoder (``ActorSynthesisClient`` has both),
    stored in the manifest key exactly as ``make_offline_set`` stores its client's.
    Returns the manifest, with ``timing`` (seconds labeling, synthesizing, writing).
    """
    import ray
    import torch

    from plsynth.atomic import atomic_write_text
    from plsynth.training.methods import pseudo_label
    from plsynth.training.schedule import step_seed
    from plsynth.training.self_training import MANIFEST, SHARD_SIZE

    if not actors:
        raise ValueError("synthesize_offline_set: no synthesis actors given")
    shard_size = shard_size or SHARD_SIZE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(unlabeled)
    if n == 0:
        raise ValueError("synthesize_offline_set: the unlabeled set is empty; sa-st needs unlabeled slices")
    key = {"count": n, "shard_size": shard_size, "tau": tau, "pseudo_in_lung": pseudo_in_lung, "seed": seed,
           "synthetic": True, "synthesizer": {"sha256": synthesizer["sha256"], "backend": synthesizer["backend"]},
           **(fingerprint or {})}
    key = json.loads(json.dumps(key))
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            log.info("offline set %s is complete (%d slices); nothing to do", out_dir, n)
            return manifest
        log.info("offline set %s was made with other settings; rebuilding", out_dir)
        manifest_path.unlink()
        for old in list(out_dir.glob("pseudo-*.npy")) + list(out_dir.glob("synthetic-*.npy")):
            old.unlink()
    teacher.eval()
    device = next(teacher.parameters()).device
    timing = {"label_s": 0.0, "synth_s": 0.0, "write_s": 0.0}
    shards, positive, turn = [], 0, 0
    for shard, start in enumerate(range(0, n, shard_size)):
        stop = min(n, start + shard_size)
        names = {"pseudo": f"pseudo-{shard:05d}.npy", "synthetic": f"synthetic-{shard:05d}.npy"}
        shards.append({"start": start, "stop": stop, **names})
        if all((out_dir / f).is_file() for f in names.values()):
            positive += int(np.load(out_dir / names["pseudo"], mmap_mode="r").sum())
            continue
        t0 = time.perf_counter()
        pseudo_parts, refs = [], []
        for b0 in range(start, stop, batch_size):
            items = [unlabeled[i] for i in range(b0, min(stop, b0 + batch_size))]
            image = torch.stack([torch.as_tensor(np.asarray(it["image"])) for it in items]).float().to(device)
            lung = torch.stack([torch.as_tensor(np.asarray(it["lung"])) for it in items]).long().to(device)
            with torch.no_grad():
                pseudo = pseudo_label(teacher(image), tau, lung if pseudo_in_lung else None)
            pseudo_np = pseudo.cpu().numpy().astype(np.float32)
            pseudo_parts.append(pseudo_np[:, 0].astype(np.uint8))
            actor = actors[turn % len(actors)]
            turn += 1
            refs.append(actor.synthesize.remote(pseudo_np, lung.cpu().numpy(), image.cpu().numpy(),
                                                step_seed(seed, b0 // batch_size, 5)))
        t1 = time.perf_counter()
        drawn = ray.get(refs)
        t2 = time.perf_counter()
        synthetic = np.concatenate([d[:, 0] for d in drawn]).clip(0, 1).astype(np.float16)
        pseudo_array = np.concatenate(pseudo_parts)
        positive += int(pseudo_array.sum())
        _save_npy(out_dir / names["synthetic"], synthetic)
        _save_npy(out_dir / names["pseudo"], pseudo_array)
        t3 = time.perf_counter()
        timing["label_s"] += t1 - t0
        timing["synth_s"] += t2 - t1
        timing["write_s"] += t3 - t2
        log.info("offline set: %d / %d slices (shard %d, %d batches over %d actors)", stop, n, shard,
                 len(refs), len(actors))
    size = int(np.asarray(unlabeled[0]["image"]).shape[-1])
    manifest = {"key": key, "shards": shards, "image_size": size,
                "pseudo_positive_fraction": positive / (n * size * size)}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    manifest["timing"] = timing
    return manifest
