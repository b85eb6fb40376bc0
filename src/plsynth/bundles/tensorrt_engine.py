"""TensorRT: build an engine from a bundle's ONNX, cache it by machine, run it.

Serialized engines are not portable across GPUs or TensorRT versions, so bundles ship ONNX only and engines are built on the target and cached *outside*
the bundle's hashed files: in ``<bundle>/cache/`` when the bundle folder is writable, else in
``$PLSYNTH_CACHE_DIR``, else in ``<tmp>/plsynth-cache``. The cache key is GPU model, compute
capability, TensorRT version, ONNX sha256, precision and the batch profile; an engine whose key
differs is never used (a new one is built beside it and stale ones for the same ONNX removed).

The cache is an on-disk format derived from a bundle, used by both plsynth-infer (deploy) and
the synthesis actor (synth_service), hence its place here.

``tensorrt`` is imported lazily: it cannot be installed on CPU-only machines. NEVER RUN HERE: `build_engine`, `TrtEngine`, `device_info`
and the TensorRT branch of `open_trt_engine` have not run on a real TensorRT; the cache
logic around them is tested with a fake builder and fake device info.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from plsynth.atomic import atomic_write, atomic_write_text
from plsynth.errors import EngineUnavailable
from plsynth.hashing import json_digest

logger = logging.getLogger(__name__)

CACHE_ENV = "PLSYNTH_CACHE_DIR"


@dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str
    compute_capability: str  # e.g. "9.0"
    tensorrt_version: str


@dataclass(frozen=True)
class Profile:
    """One optimization profile over the batch axis; spatial size fixed (one profile suffices)."""

    min_batch: int
    opt_batch: int
    max_batch: int

    @classmethod
    def for_batch_size(cls, batch_size: int) -> Profile:
        return cls(1, max(1, batch_size), max(1, batch_size))


def tensorrt_status() -> tuple[bool, str]:
    """(True, version) when ``import tensorrt`` works, else (False, the reason)."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a missing shared library (OSError)
        return False, f"TensorRT is not installed ({type(exc).__name__}: {exc})"
    return True, str(trt.__version__)


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def device_info() -> DeviceInfo:  # NEVER RUN HERE (needs a GPU and TensorRT)
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return DeviceInfo(torch.cuda.get_device_name(0), f"{major}.{minor}", str(trt.__version__))


def cache_key(info: DeviceInfo, onnx_sha256: str, precision: str, profile: Profile) -> str:
    """A file-name-safe key: readable prefix plus a hash of every field that makes engines differ."""
    fields = {**asdict(info), "onnx_sha256": onnx_sha256, "precision": precision, **asdict(profile)}
    digest = json_digest(fields)
    sm = "sm" + info.compute_capability.replace(".", "")
    return f"{onnx_sha256[:12]}_{sm}_trt{info.tensorrt_version}_{precision}_b{profile.max_batch}_{digest}"


def resolve_cache_dir(bundle_path: Path | None) -> Path:
    """``<bundle>/cache`` when writable, else $PLSYNTH_CACHE_DIR, else <tmp>/plsynth-cache."""
    candidates: list[Path] = []
    if bundle_path is not None:
        candidates.append(Path(bundle_path) / "cache")
    if os.environ.get(CACHE_ENV):
        candidates.append(Path(os.environ[CACHE_ENV]))
    candidates.append(Path(tempfile.gettempdir()) / "plsynth-cache")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-", delete=True)
            probe.close()
            return folder
        except OSError:
            logger.info("engine cache folder %s is not writable; trying the next one", folder)
    raise OSError(f"no writable engine cache folder among {[str(c) for c in candidates]}; set {CACHE_ENV}")


def cached_engine(
    onnx_path: Path,
    onnx_sha256: str,
    cache_dir: Path,
    info: DeviceInfo,
    precision: str,
    profile: Profile,
    builder: Callable[[Path, Path, bool, Profile], None] | None = None,
) -> tuple[Path, bool]:
    """The engine file for this key, building it when absent. Returns (path, built_now).

    The engine is built to a temporary name and renamed, so a crash never leaves a partial
    engine under its final name; a sidecar ``<key>.json`` records the key's fields. Engines
    in the folder for the same ONNX but another key are stale and removed.
    """
    builder = builder or build_engine
    key = cache_key(info, onnx_sha256, precision, profile)
    engine_path = Path(cache_dir) / f"{key}.plan"
    sidecar = engine_path.with_suffix(".json")
    fields = {**asdict(info), "onnx_sha256": onnx_sha256, "precision": precision, "profile": asdict(profile)}
    if engine_path.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) == fields:
                logger.info("TensorRT engine cache hit: %s", engine_path.name)
                return engine_path, False
        except ValueError:
            pass
    logger.info("building TensorRT engine %s (this can take minutes)", engine_path.name)
    with atomic_write(engine_path) as tmp:
        builder(Path(onnx_path), tmp, precision == "fp16", profile)
    atomic_write_text(sidecar, json.dumps(fields, indent=2))
    for stale in Path(cache_dir).glob(f"{onnx_sha256[:12]}_*.plan"):
        if stale != engine_path:
            logger.info("removing stale TensorRT engine %s", stale.name)
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
    return engine_path, True


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool, profile: Profile) -> None:  # NEVER RUN HERE
    """Parse the ONNX, set one batch profile on every input, build and serialize (TensorRT 10 API)."""
    import tensorrt as trt

    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, log)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse the ONNX: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        opt.set_shape(tensor.name, (profile.min_batch, *rest), (profile.opt_batch, *rest), (profile.max_batch, *rest))
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))


class TrtEngine:  # NEVER RUN HERE
    """The TensorRT runtime on one serialized engine; buffers are torch CUDA tensors."""

    name = "trt"

    def __init__(self, engine_path: Path, precision: str, max_batch: int) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialize this engine; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.max_batch = max_batch
        self.provider = f"tensorrt {trt.__version__} {precision}"

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_named({self.input_names[0]: x})[0]

    def run_named(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        batch = next(iter(feeds.values())).shape[0]
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds the engine's profile maximum {self.max_batch}")
        keep: list[Any] = []
        for name, array in feeds.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array, np.float32)).cuda()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=torch.float32, device="cuda")
            outputs.append(tensor)
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [t.cpu().numpy() for t in outputs]


def open_trt_engine(
    onnx_path: Path,
    batch_size: int = 8,
    fp16: bool = False,
    cache_dir: Path | None = None,
    onnx_sha256: str | None = None,
) -> TrtEngine:
    """Build (or reuse from the cache) and open a TensorRT engine for ``onnx_path``.

    Raises `EngineUnavailable` with the reason when TensorRT or a GPU is missing.
    """
    from plsynth.hashing import sha256_file

    ok, reason = tensorrt_status()
    if not ok:
        raise EngineUnavailable(f"{onnx_path}: --engine trt: {reason}")
    if not torch_cuda_available():
        raise EngineUnavailable(f"{onnx_path}: --engine trt: no CUDA device is visible")
    digest = onnx_sha256 or sha256_file(onnx_path)
    folder = cache_dir or resolve_cache_dir(Path(onnx_path).parent)
    precision = "fp16" if fp16 else "fp32"
    profile = Profile.for_batch_size(batch_size)
    engine_path, _ = cached_engine(onnx_path, digest, folder, device_info(), precision, profile)
    return TrtEngine(engine_path, precision, profile.max_batch)


def build_trt_engines(bundle_dir: Path, fp16: bool = False, batch_size: int = 8) -> dict[str, dict]:  # NEVER RUN HERE
    """Build (or reuse) the TensorRT engine of every network of a segmenter bundle and check it
    against ONNX Runtime CPU on phantom slices (mask Dice >= 0.99, else BundleError).

    Returns the parity per network. Raises `EngineUnavailable` without TensorRT or a GPU.
    """
    from plsynth.bundles.onnx_export import compare_masks, ort_session, parity_slices
    from plsynth.bundles.segmenter import load_bundle

    bundle = load_bundle(bundle_dir)
    cache = resolve_cache_dir(bundle.path)
    slices = parity_slices(bundle.image_size, bundle.window_hu, bundle.lung_handling)[:batch_size]
    report = {}
    for name in bundle.network_names:
        onnx_path = bundle.onnx_path(name)
        engine = open_trt_engine(onnx_path, batch_size, fp16, cache, bundle.onnx_sha256(name))
        ref = ort_session(onnx_path).run(None, {bundle.input_name: slices})[0]
        report[name] = {**compare_masks(ref, engine.run(slices), bundle.threshold, "TensorRT/ONNX", onnx_path),
                        "precision": "fp16" if fp16 else "fp32", "provider": engine.provider}
        logger.info("TensorRT parity %s: %s", name, report[name])
    return report
