"""The lungmask back-end (JoHof/lungmask R231 / R231CovidWeb), from local weights only.

lungmask's default ``LMInferer()`` downloads its weights through ``torch.hub`` on first use;
plsynth never downloads (hospital machines are offline, and tests must not touch the network).
The weights come from, in order: an explicit local file (``weights``), or the file lungmask
itself would have cached, ``torch.hub.get_dir()/checkpoints/<file name of MODEL_URLS[model]>``
(``$TORCH_HOME/hub/checkpoints/...``). When neither exists, :class:`FileNotFoundError` names the
exact path to put the file in and the URL to fetch it from on a machine with network.

lungmask needs HU volumes ((z, y, x) in LPS, which is what ``CTImage.array`` is) and labels
1 = right, 2 = left; :func:`plsynth.data.semantic.from_lungmask_labels` remaps them to the
project's 1 = left, 2 = right.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from plsynth.data.image import CTImage
from plsynth.data.semantic import from_lungmask_labels

logger = logging.getLogger(__name__)

LUNGMASK_MODELS = ("R231", "R231CovidWeb")


def _model_url(model: str) -> str:
    if model not in LUNGMASK_MODELS:
        raise ValueError(f"lungmask model must be one of {', '.join(LUNGMASK_MODELS)}, got {model!r}")
    from lungmask.mask import MODEL_URLS  # lungmask imports torch and SimpleITK: only when asked

    return MODEL_URLS[model][0]


def hub_weights_path(model: str = "R231") -> Path:
    """Where lungmask/torch.hub caches ``model``'s weights: ``torch.hub.get_dir()/checkpoints/<file>``."""
    import torch

    url = _model_url(model)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_lungmask_weights(model: str = "R231", weights: str | os.PathLike | None = None) -> Path:
    """The local weights file to use; raises FileNotFoundError naming where to put it when missing."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"lungmask weights file {path} does not exist (data.lungmask_weights)")
        return path
    path = hub_weights_path(model)
    if not path.is_file():
        raise FileNotFoundError(
            f"lungmask {model} weights not found at {path}; plsynth never downloads them. On a machine with "
            f"network, fetch {_model_url(model)} and copy it to exactly {path} (or pass its path as "
            f"lungmask_weights / data.lungmask_weights), or use the classical lung back-end."
        )
    return path


def lungmask_weights_present(model: str = "R231", weights: str | os.PathLike | None = None) -> bool:
    """True when :func:`resolve_lungmask_weights` would find a file (no error, no download)."""
    try:
        resolve_lungmask_weights(model, weights)
    except (FileNotFoundError, ValueError, ImportError):
        return False
    return True


def lungmask_lung_mask(image: CTImage, model: str = "R231", weights: str | os.PathLike | None = None,
                       force_cpu: bool = True, batch_size: int = 8) -> np.ndarray:
    """Run lungmask on an HU volume; returns uint8 (z, y, x) with the project's labels (1 left, 2 right).

    Raises InputError for 8-bit slices (lungmask was trained on HU and rescales -1024..600 HU
    internally, so windowed grey values would be meaningless) and FileNotFoundError for missing weights.
    """
    from plsynth.errors import InputError

    if image.kind != "hu":
        raise InputError(image.source, "the lungmask back-end needs a CT volume in HU, not an 8-bit slice; "
                                       "use the classical lung back-end for windowed slices")
    path = resolve_lungmask_weights(model, weights)
    from lungmask import LMInferer

    from plsynth.torch_setup import flush_denormals

    flush_denormals()  # lungmask may be the process's first torch use (plsynth-infer with ORT)

    inferer = LMInferer(modelpath=str(path), force_cpu=force_cpu, batch_size=batch_size, tqdm_disable=True)
    logger.info("lungmask %s from %s on %s", model, path, image.source)
    labels = inferer.apply(np.asarray(image.array, dtype=np.float32))  # (z, y, x) LPS, lungmask: 1 right 2 left
    return from_lungmask_labels(labels)


__all__ = ["LUNGMASK_MODELS", "hub_weights_path", "resolve_lungmask_weights", "lungmask_weights_present",
           "lungmask_lung_mask"]
