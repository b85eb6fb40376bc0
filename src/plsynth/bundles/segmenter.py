"""The segmenter model bundle: the one hand-over from training to inference.

A bundle is a folder::

    model.onnx   network "model" (input "x" (B,1,S,S) in [0,1], output "logits" (B,1,S,S))
    model.pt     its state dict (loaded only with torch.load(weights_only=True))
    peer.onnx    SA-CPS only: the second network, used for the agreement quality flag
    peer.pt
    meta.json    input size, intensity window, lung handling, threshold, classes, resolved config,
                 metrics, versions, export parity, and the sha256 of every file above
    cache/       not hashed: TensorRT engines built on the target machine (tensorrt_engine.py)

`write_bundle` is the code that every training run and `plsynth export` use; `load_bundle`
verifies every sha256 before anything is loaded, so a tampered or truncated bundle is refused
with a BundleError naming the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plsynth.bundles.files import jsonable, versions
from plsynth.hashing import sha256_file
from plsynth.data.lungs import lung_record
from plsynth.data.preprocess import FieldOfView
from plsynth.errors import BundleError

logger = logging.getLogger(__name__)

FORMAT = "plsynth-segmenter-bundle/1"
META = "meta.json"
CACHE_DIR = "cache"
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
NETWORK_NAMES = ("model", "peer")
CLASSES = {"0": "background", "1": "infection"}


def write_bundle(
    out_dir: Path,
    networks: dict[str, Any],
    cfg: Any,
    metrics: dict,
    extra_meta: dict | None = None,
) -> Path:
    """Write a segmenter bundle to ``out_dir`` atomically and return its path.

    networks: {"model": unet} or {"model": unet_a, "peer": unet_b} (SA-CPS), U-Nets built from
    ``cfg.model``. Each is exported to ONNX (dynamic batch; fixed S = cfg.data.image_size, or dynamic
    height and width for networks trained on lung boxes, ``cfg.data.lung_box``),
    checked against PyTorch on phantom slices (mask Dice >= 0.99, else BundleError), and saved
    as a state dict. The bundle is built in a temporary folder beside ``out_dir`` and renamed
    into place (``atomic_folder``); an existing bundle is replaced only once the new one is complete.
    """
    import torch

    from plsynth.atomic import atomic_folder
    from plsynth.bundles.onnx_export import check_parity, export_onnx, parity_slices

    out_dir = Path(out_dir)
    if "model" not in networks or set(networks) - set(NETWORK_NAMES):
        raise ValueError(f"networks must be {{'model'}} or {{'model', 'peer'}}, got {sorted(networks)}")
    size = int(cfg.data.image_size)
    boxed = cfg.data.lung_box is not None  # networks run on lung boxes: ONNX with dynamic height and width
    side: list = ["height", "width"] if boxed else [size, size]
    with atomic_folder(out_dir) as tmp:
        slices = parity_slices(size, cfg.data.window_hu, cfg.data.lung_handling)
        parity: dict[str, dict] = {}
        entries: dict[str, dict] = {}
        for name, net in networks.items():
            net = net.eval()
            onnx_path = export_onnx(
                net, tmp / f"{name}.onnx", {INPUT_NAME: torch.from_numpy(slices[:1])}, [OUTPUT_NAME], spatial=boxed
            )
            parity[name] = check_parity(net, onnx_path, slices, cfg.train.tau, INPUT_NAME)
            state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            torch.save(state, tmp / f"{name}.pt")
            entries[name] = {"onnx": f"{name}.onnx", "weights": f"{name}.pt"}
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {
            "format": FORMAT,
            "kind": "segmenter",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "networks": entries,
            "input": {"name": INPUT_NAME, "shape": ["batch", 1, *side], "dtype": "float32", "range": [0.0, 1.0]},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", 1, *side], "kind": "logits"},
            "image_size": size,
            "lung_box": cfg.data.lung_box,
            "window_hu": list(cfg.data.window_hu),
            "lung_handling": cfg.data.lung_handling,
            "intensity": cfg.data.intensity,
            "lungs": lung_record(cfg.data.lung_backend, cfg.data.lungmask_model),
            "threshold": float(cfg.train.tau),
            "classes": CLASSES,
            "method": cfg.train.method,
            "config": cfg.to_dict(),
            "metrics": jsonable(metrics),
            "versions": versions(),
            "parity": parity,
            "files": files,
        }
        if extra_meta:
            meta.update(jsonable(extra_meta))
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    logger.info("bundle written: %s (%s)", out_dir, ", ".join(files))
    return out_dir


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Re-export a training run's checkpoint (``best.pt``, else ``last.pt``) as a bundle.

    The checkpoint is ``{"networks": {"model": state_dict[, "peer": ...]}, "config": cfg.to_dict(),
    "val": {...}, ...}`` (written by ``plsynth.training.checkpoint``), read with ``weights_only=True``.
    The bundle goes to ``out`` (default ``run_dir/bundle``) through `write_bundle`, the same code
    training ends with.
    """
    import torch

    from plsynth.config import saved_config
    from plsynth.errors import InputError
    from plsynth.models.unet import unets_from_states

    run_dir = Path(run_dir)
    source = next((run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None)
    if source is None:
        raise InputError(run_dir, "no best.pt or last.pt here; is this a training run folder?")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(source, f"cannot read the checkpoint with weights_only=True: {exc}") from exc
    weights = state.get("networks") or state.get("models")
    if not isinstance(weights, dict) or "config" not in state:
        raise InputError(source, "checkpoint lacks 'networks' (or 'models') and 'config'")
    cfg = saved_config(state["config"], where=str(source))
    nets = unets_from_states(cfg.model, weights)
    val = state.get("val") or {}
    metrics = {"val_dice": val.get("dice"), "val_nsd": val.get("nsd"), "step": state.get("step"), "epoch": state.get("epoch")}
    return write_bundle(Path(out) if out else run_dir / "bundle", nets, cfg, metrics, {"exported_from": source.name})


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. Nothing is loaded until asked for."""

    path: Path
    meta: dict

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def window_hu(self) -> tuple[float, float]:
        low, high = self.meta["window_hu"]
        return float(low), float(high)

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def lung_handling(self) -> str:
        return str(self.meta["lung_handling"])

    @property
    def lung_box(self) -> int | None:
        """Margin of the lung box the networks were trained on (None: whole frames; older bundles)."""
        margin = self.meta.get("lung_box")
        return None if margin is None else int(margin)

    @property
    def size_multiple(self) -> int:
        """What the U-Net's input sides must be a multiple of: ``2 ** model.depth``."""
        return 2 ** int(self.meta.get("config", {}).get("model", {}).get("depth", 4))

    @property
    def field_of_view(self) -> FieldOfView:
        """The `FieldOfView` the networks were trained on (whole frames or lung boxes)."""
        return FieldOfView(self.lung_box, self.size_multiple)

    @property
    def intensity(self) -> str:
        return str(self.meta.get("intensity", "window"))  # bundles older than data.intensity: plain window

    @property
    def network_names(self) -> list[str]:
        return list(self.meta["networks"])

    @property
    def input_name(self) -> str:
        return str(self.meta["input"]["name"])

    def onnx_path(self, name: str = "model") -> Path:
        entry = self.meta["networks"].get(name, {})
        if "onnx" not in entry:
            raise BundleError(f"{self.path / META}: network {name!r} has no ONNX file; use --engine torch")
        return self.path / entry["onnx"]

    def onnx_sha256(self, name: str = "model") -> str:
        return self.meta["files"][self.meta["networks"][name]["onnx"]]

    def meta_sha256(self) -> str:
        return sha256_file(self.path / META)

    def config(self) -> Any:
        from plsynth.config import saved_config

        return saved_config(self.meta["config"], where=str(self.path / META))

    def torch_networks(self, device: str = "cpu") -> dict[str, Any]:
        """The U-Nets, rebuilt from the stored config and loaded with weights_only=True, in eval mode."""
        import torch

        from plsynth.models.unet import unets_from_states

        cfg = self.config()
        nets = {}
        for name, entry in self.meta["networks"].items():
            weights = self.path / entry.get("weights", "")
            if not entry.get("weights") or not weights.is_file():
                raise BundleError(f"{self.path}: network {name!r} has no PyTorch weights (model.pt); use --engine ort")
            try:
                state = torch.load(weights, map_location=device, weights_only=True)
                nets.update(unets_from_states(cfg.model, {name: state}, device))
            except Exception as exc:  # noqa: BLE001 - any load failure is a bundle problem
                raise BundleError(f"{weights}: cannot load state dict: {exc}") from exc
        return nets


REQUIRED_META = ("format", "networks", "image_size", "window_hu", "lung_handling", "threshold", "input", "files")


def _check_fields(meta: dict, meta_path: Path) -> None:
    """The fields inference reads, with their types, and the stored config: a BundleError now, not a crash later."""
    from plsynth.config import ConfigError, saved_config

    try:
        size = int(meta["image_size"])
        low, high = (float(v) for v in meta["window_hu"])
        float(meta["threshold"])
        str(meta["input"]["name"])
        if size < 8 or not low < high or not isinstance(meta["lung_handling"], str):
            raise ValueError("image_size, window_hu or lung_handling out of range")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: malformed field ({type(exc).__name__}: {exc})") from None
    if "config" in meta:
        try:
            saved_config(meta["config"], where=str(meta_path))
        except (ConfigError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{meta_path}: the stored config is not usable ({exc})") from None


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle folder, check meta.json and (``verify``) the sha256 of every listed file.

    Raises BundleError naming the folder or file: missing folder, unreadable or incomplete
    meta.json, a listed file missing, or a checksum mismatch (tampered or truncated).
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: model bundle folder not found")
    meta_path = path / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{meta_path}: missing; this folder is not a plsynth bundle") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"{meta_path}: unreadable or not JSON ({exc}); the bundle is damaged") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: not a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise BundleError(f"{meta_path}: missing key(s) {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise BundleError(f"{meta_path}: format {meta['format']!r} is not {FORMAT!r}")
    files, networks = meta["files"], meta["networks"]
    if not isinstance(files, dict) or not isinstance(networks, dict) or not all(isinstance(e, dict) for e in networks.values()):
        raise BundleError(f"{meta_path}: 'files' and 'networks' must be JSON objects")
    if "model" not in networks or set(networks) - set(NETWORK_NAMES):
        raise BundleError(f"{meta_path}: networks must be 'model' (and optionally 'peer'), found {sorted(networks) or 'none'}")
    for name, entry in networks.items():
        if "onnx" not in entry and "weights" not in entry:
            raise BundleError(f"{meta_path}: network {name!r} names neither an ONNX file nor weights")
        for role in ("onnx", "weights"):
            if role in entry and entry[role] not in files:
                raise BundleError(f"{meta_path}: {name}.{role} file {entry[role]!r} has no sha256 listed")
    _check_fields(meta, meta_path)
    if verify:
        for entry in [path, meta_path, *(path / name for name in files)]:
            if entry.is_symlink():
                raise BundleError(f"{entry}: a symbolic link inside the bundle; a bundle holds plain files only")
        for name, expected in files.items():
            file = path / name
            if Path(name).name != name or name in ("", ".", ".."):
                raise BundleError(f"{meta_path}: file name {name!r} points outside the bundle")
            if not file.is_file():
                raise BundleError(f"{file}: listed in meta.json but missing; the bundle is incomplete")
            try:
                actual = sha256_file(file)
            except OSError as exc:
                raise BundleError(f"{file}: unreadable ({exc.strerror or exc})") from None
            if actual != expected:
                raise BundleError(
                    f"{file}: sha256 {actual[:12]}... does not match meta.json ({expected[:12]}...); "
                    "the bundle was modified or truncated; refusing to load it"
                )
    return Bundle(path=path, meta=meta)
