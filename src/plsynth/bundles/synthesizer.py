"""The synthesizer (decoder) bundle: what SA-CPS / SA-ST and the synthesis actor load.

A folder with
- ``decoder.pt``, ``encoder.pt``: state dicts (loaded with ``torch.load(weights_only=True)``);
  the encoder is there for the ``self`` pool mode and for rebuilding the pool;
- ``decoder.onnx``: the decoder with spectral norm folded, inputs ``onehot`` (B, C, S, S),
  ``style`` (B, C, D) (C = 4 map classes, 5 with ``synth.vessels``: meta's ``classes``) and,
  when the config has noise, ``noise`` (B, 1, S, S); output ``image`` (B, 1, S, S) in [-1, 1];
  the batch axis is dynamic;
- ``pool.npz``: the style code pool (``StylePool``);
- ``texture.npz`` (only with ``synth.texture`` > 0): ``patches`` (M, P, P) float32, residuals of
  the labeled slices' infection that ``plsynth.models.texture`` lays over drawn infection;
- ``meta.json``: sizes, classes, window, style_dim, widths, pool summary, export parity (max
  abs difference torch vs ONNX Runtime CPU with fixed noise, gated at 1e-4), versions, the
  resolved synth/data config and the sha256 of every other file.

Loading needs only this package and the networks in ``plsynth.models.sean``, never the
training code. ``bundle_sha256`` (the sha256 of meta.json, which lists every
file's hash) identifies a bundle in trainer bundles and logs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plsynth.atomic import atomic_folder
from plsynth.bundles.files import versions
from plsynth.hashing import sha256_file
from plsynth.bundles.onnx_export import OPSET, export_onnx, ort_session
from plsynth.bundles.style_pool import StylePool
from plsynth.config import Config, SynthConfig, drop_removed
from plsynth.errors import BundleError
from plsynth.data.semantic import CLASS_NAMES
from plsynth.models.sean import (
    SEANDecoder,
    StyleEncoder,
    build_synthesizer,
    decoder_channels,
    fold_spectral_norm,
    hidden_width,
)

log = logging.getLogger(__name__)

FORMAT = "plsynth-synthesizer"
FORMAT_VERSION = 1
PARITY_TOLERANCE = 1e-4
FILES = ("decoder.pt", "encoder.pt", "decoder.onnx", "pool.npz")
TEXTURE = "texture.npz"  # optional: listed in meta.json's files when written


def bundle_sha256(path: str | Path) -> str:
    """Identity of a synthesizer bundle: the sha256 of its meta.json (which hashes every file)."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        raise BundleError(f"{path}: not a synthesizer bundle (no meta.json)")
    return sha256_file(meta)


def export_decoder_onnx(decoder: SEANDecoder, path: Path) -> list[str]:
    """Export a copy of ``decoder`` (spectral norm folded, eval) to ONNX; returns the input names."""
    model = fold_spectral_norm(copy.deepcopy(decoder).cpu().eval())
    s, d = decoder.image_size, decoder.config.style_dim
    c = decoder.num_classes
    inputs = {"onehot": torch.zeros(2, c, s, s), "style": torch.zeros(2, c, d)}
    if decoder.uses_noise:
        inputs["noise"] = torch.zeros(2, 1, s, s)
    export_onnx(model, path, inputs, ["image"])
    return list(inputs)


def parity_inputs(config: SynthConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed test input: the map of a phantom chest slice (two lungs, lesions, and with
    ``vessels`` a disk of vessel class), random styles, fixed noise."""
    from plsynth.data.phantom import make_phantom
    from plsynth.data.semantic import map_classes, one_hot, semantic_map

    g = torch.Generator().manual_seed(seed)
    s = config.image_size
    phantom = make_phantom(1234, (12, s, s), lesions=True, name="parity")
    middle = phantom.lung.shape[0] // 2  # the lowest slices show only the costophrenic rim
    lung = torch.from_numpy(phantom.lung[middle]).long()
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    vessel = (yy - s // 2) ** 2 + (xx - s // 4) ** 2 < (s // 8) ** 2 if config.vessels else None
    classes = map_classes(config.vessels)
    onehot = one_hot(semantic_map(lung, torch.from_numpy(phantom.infection[middle]).long(), vessel), classes)
    inputs = {
        "onehot": onehot.expand(batch, -1, -1, -1).contiguous(),
        "style": torch.rand(batch, classes, config.style_dim, generator=g) * 2 - 1,
    }
    if config.noise:
        inputs["noise"] = torch.randn(batch, 1, s, s, generator=g)
    return inputs


def measure_parity(decoder: SEANDecoder, onnx_path: Path) -> float:
    """Max abs difference of the decoder (torch, eval) and its ONNX file (ORT CPU), fixed noise."""
    inputs = parity_inputs(decoder.config)
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            expected = decoder(inputs["onehot"], inputs["style"], inputs.get("noise")).cpu().numpy()
    finally:
        decoder.train(was_training)
    session = ort_session(onnx_path)
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    (got,) = session.run(["image"], feed)
    return float(np.abs(got - expected).max())


def write_decoder_bundle(
    out: str | Path,
    decoder: SEANDecoder,
    encoder: StyleEncoder,
    pool: StylePool,
    cfg: Config,
    extra: dict[str, Any] | None = None,
    texture: torch.Tensor | None = None,
) -> Path:
    """Write the bundle folder ``out`` (replaced if it exists) and return its path.

    Everything is written into a temporary sibling folder and renamed at the end, so a failed
    export never leaves a half bundle. Raises BundleError when the ONNX decoder differs from
    torch by more than 1e-4. ``extra`` (e.g. training figures) is stored under meta["training"].
    ``texture``: residual patches (M, P, P) (``plsynth.models.texture.residual_patches``), written
    when ``synth.texture`` > 0.
    """
    out = Path(out)
    if pool.style_dim != cfg.synth.style_dim:
        raise ValueError(f"pool style_dim {pool.style_dim} != synth.style_dim {cfg.synth.style_dim}")
    with atomic_folder(out) as tmp:
        torch.save({k: v.detach().cpu() for k, v in decoder.state_dict().items()}, tmp / "decoder.pt")
        torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, tmp / "encoder.pt")
        inputs = export_decoder_onnx(decoder, tmp / "decoder.onnx")
        parity = measure_parity(decoder, tmp / "decoder.onnx")
        if not parity <= PARITY_TOLERANCE:
            raise BundleError(f"{out}: ONNX decoder differs from torch by {parity:.3g} > {PARITY_TOLERANCE}")
        pool.save(tmp / "pool.npz")
        synth = cfg.synth
        files = list(FILES)
        if synth.texture > 0:
            patches = np.zeros((0, 1, 1), np.float32) if texture is None else texture.detach().cpu().float().numpy()
            np.savez(tmp / TEXTURE, patches=patches)
            files.append(TEXTURE)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "image_size": synth.image_size,
            "channels": 1,
            "classes": list(CLASS_NAMES[: decoder.num_classes]),
            "window_hu": list(cfg.data.window_hu),
            "intensity": "decoder output tanh in [-1, 1]; images in [0, 1] = (x + 1) / 2 (HU window or 8-bit / 255)",
            "style_dim": synth.style_dim,
            "decoder_widths": decoder_channels(synth),
            "norm_hidden": hidden_width(synth),
            "encoder_width": encoder.features[1].out_channels,
            "noise": synth.noise,
            "onnx": {"inputs": inputs, "outputs": ["image"], "opset": OPSET, "dynamic_axes": "batch"},
            "export_parity_max_abs": parity,
            "export_parity_tolerance": PARITY_TOLERANCE,
            "pool": {
                "n": len(pool),
                "n_positive": pool.n_positive,
                "default_mode": synth.pool_mode,
                "k": synth.pool_k,
                "self_mode": "needs encoder.pt (included): the request's images encoded under their maps",
            },
            "texture": {"patches": int(patches.shape[0]), "size": int(patches.shape[-1]),
                        "from": "interior of the labeled slices' infection"} if synth.texture > 0 else None,
            "synth": dataclasses.asdict(synth),
            "data": dataclasses.asdict(cfg.data),
            "config_name": cfg.name,
            "config_source": cfg.source,
            "training": extra or {},
            "versions": versions(),
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    log.info("synthesizer bundle %s (parity %.2e, pool %d / N+ %d)", out, parity, len(pool), pool.n_positive)
    return out


@dataclass
class DecoderBundle:
    path: Path
    meta: dict[str, Any]
    config: SynthConfig
    decoder: SEANDecoder  # eval mode, spectral norm as trained
    encoder: StyleEncoder  # eval mode
    pool: StylePool
    sha256: str
    texture: torch.Tensor  # (M, P, P) residual patches; M = 0 without synth.texture

    @property
    def onnx_path(self) -> Path:
        return self.path / "decoder.onnx"


def synth_config_from_meta(meta: dict[str, Any], where: Path) -> SynthConfig:
    known = {f.name for f in dataclasses.fields(SynthConfig)}
    raw = meta.get("synth")
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: meta.json has no synth config")
    try:
        raw = drop_removed({"synth": raw}, str(where), stored=True)["synth"]
        return SynthConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: meta.json synth config is invalid: {exc}") from exc


def load_decoder_bundle(path: str | Path, device: str | torch.device = "cpu") -> DecoderBundle:
    """Load and verify a synthesizer bundle; BundleError on a missing file or a sha256 mismatch."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise BundleError(f"{path}: not a synthesizer bundle (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: unreadable: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path}: meta.json format is {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {meta['format_version']} is newer than this plsynth reads")
    hashes = meta.get("files", {})
    config = synth_config_from_meta(meta, path)
    for name in FILES + ((TEXTURE,) if config.texture > 0 else ()):
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from the synthesizer bundle")
        if hashes.get(name) != sha256_file(file):
            raise BundleError(f"{file}: sha256 does not match meta.json (modified or corrupt)")
    decoder, encoder = build_synthesizer(config)
    if encoder.features[1].out_channels != meta.get("encoder_width", encoder.features[1].out_channels):
        encoder = StyleEncoder(config.style_dim, int(meta["encoder_width"]))
    try:
        decoder.load_state_dict(torch.load(path / "decoder.pt", map_location="cpu", weights_only=True))
        encoder.load_state_dict(torch.load(path / "encoder.pt", map_location="cpu", weights_only=True))
        pool = StylePool.load(path / "pool.npz")
        texture = torch.zeros(0, 1, 1)
        if config.texture > 0:
            with np.load(path / TEXTURE, allow_pickle=False) as npz:
                texture = torch.from_numpy(np.asarray(npz["patches"], np.float32))
            if texture.ndim != 3 or texture.shape[1] != texture.shape[2]:
                raise ValueError(f"{TEXTURE} patches must be (M, P, P), got {tuple(texture.shape)}")
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise BundleError(f"{path}: cannot load weights, pool or texture: {exc}") from exc
    return DecoderBundle(
        path=path,
        meta=meta,
        config=config,
        decoder=decoder.to(device).eval(),
        encoder=encoder.to(device).eval(),
        pool=pool,
        sha256=sha256_file(meta_path),
        texture=texture,
    )
