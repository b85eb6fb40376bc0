"""The predictor: load a bundle and its engine(s) once, then segment case after case.

One volume's path from disk to mask (each forward step has its inverse beside it)::

    read_image (io)            -> CTImage, (z, y, x) LPS   | write_mask puts the mask back in the input's geometry
    lung labels (data.lungs)   -> (z, y, x) 0/1/2, grown to the lung field (lungs.lung_field)
    per batch of slices:
      to_unit (window)           -> [0, 1]
      to_model_input (preprocess)-> (b, 1, S, S)           | to_input_grid: (b, S, S) -> (b, y, x)
      engine.run                 -> logits -> sigmoid
      threshold (bundle tau) -> keep inside lungs (postprocess)
    remove small components (postprocess)

Work goes a batch at a time and no volume of probabilities is kept: on 2 cores the fresh memory
a volume needs costs as much time as the arithmetic (BENCHMARKS.md, `keep_freed_memory`).

Slices without any lung are not sent through the network: their mask is empty anyway, since
infection is kept inside the lung field only. With a second network in the bundle (SA-CPS), the
Dice between the two networks' masks is reported as a quality flag, estimated on every
``settings.AGREEMENT_EVERY``-th lung slice: the second network costs a quarter of the first (on 160-slice
phantoms the estimate was within 0.013 of the all-slice Dice on average, 0.08 at worst, and
changed no review decision; BENCHMARKS.md). Both networks run at one precision (`reduced_precision`).

A bundle trained on lung boxes (``data.lung_box``, its margin) is run on the volume's lung box
(`volume_box`) cut from each resized frame instead of the whole frame: a fraction of the pixels.
A bundle trained on whole frames is run on whole frames: its instance-norm U-Net normalises by the
whole frame's statistics and answers otherwise on a box (BENCHMARKS.md). ``lung_box=`` overrides
the bundle for the benchmark (it needs the torch engine or an ONNX with dynamic height and width).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np

from plsynth.data.lungs import lung_field
from plsynth.bundles.files import versions
from plsynth.bundles.segmenter import Bundle, load_bundle
from plsynth.deploy import settings
from plsynth.deploy.engines import Engine, available_ort_providers, open_engine, resolve_engine, wants_gpu
from plsynth.errors import EngineUnavailable, InputError

logger = logging.getLogger(__name__)

LUNGS_DIR = "lungs"
OVERLAYS_DIR = "overlays"


@dataclass
class Prediction:
    """Masks on the input's grid (z, y, x): ``infection`` uint8 0/1 after post-processing."""

    infection: np.ndarray
    peer_infection: np.ndarray | None = None
    agreement: float | None = None
    seconds_network: float = 0.0
    seconds_agreement: float = 0.0


@dataclass
class CaseResult:
    case: str
    path: Path
    status: str  # "ok", "failed" or "skipped" (already finished, --continue)
    error: str | None = None
    row: dict = field(default_factory=dict)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))).astype(np.float32)


def resolve_lung_backend(backend: str, recorded: dict | None = None) -> tuple[str, Callable[[Any], np.ndarray]]:
    """(name, function CTImage -> (z, y, x) labels 0/1/2).

    ``bundle``: the back-end the bundle was trained with (``recorded``, meta.json's ``lungs``), so
    the lungs that clip at inference are those that clipped the pseudo-labels and the validation
    scores; bundles older than that record fall back to ``auto``. ``auto``: lungmask when its
    weights are present on this machine, else the classical back-end.
    """
    from plsynth.data import lungs

    lungmask_model = "R231"
    if backend == "bundle":
        if recorded:
            backend, lungmask_model = recorded["backend"], recorded.get("lungmask_model", "R231")
            if recorded.get("field") != lungs.FIELD_ALGORITHM:
                logger.warning("the bundle was trained with lung field %r; this version computes %r",
                               recorded.get("field"), lungs.FIELD_ALGORITHM)
        else:
            backend = "auto"
    chosen_automatically = backend == "auto"
    if backend == "auto":
        try:
            lungmask_model = lungs.default_lungmask_model()
            backend = lungs.default_lung_backend(lungmask_model)
        except ImportError as exc:  # the lungmask adapter is optional
            logger.info("lungmask back-end unavailable (%s); using the classical back-end", exc)
            backend = "classical"
    if backend not in ("lungmask", "classical"):
        raise ValueError(f"lung backend must be auto, lungmask or classical, got {backend!r}")

    def segment(image: Any) -> np.ndarray:
        # lungmask needs HU: 8-bit slices go to the classical back-end unless lungmask was asked for
        if chosen_automatically and image.is_slice:
            return lungs.lung_mask(image, backend="classical")
        return lungs.lung_mask(image, backend=backend, lungmask_model=lungmask_model)

    return backend, segment


class Predictor:
    """A bundle with its engines open. Build it with `Predictor.from_bundle`."""

    def __init__(
        self,
        bundle: Bundle,
        engines: dict[str, Engine],
        batch_size: int = settings.BATCH_SIZE,
        lung_backend: str = settings.LUNG_BACKEND,
        lung_fn: Callable[[Any], np.ndarray] | None = None,
        min_size_mm3: float = settings.MIN_SIZE_MM3,
        min_size_px: int = settings.MIN_SIZE_PX,
        review_below: float = settings.REVIEW_BELOW,
        lung_box: int | None | str = "bundle",
        agreement_every: int = settings.AGREEMENT_EVERY,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.engines = engines
        self.batch_size = int(batch_size)
        if lung_fn is None:
            lung_backend, lung_fn = resolve_lung_backend(lung_backend, bundle.meta.get("lungs"))
        self.lung_backend = lung_backend
        self.lung_fn = lung_fn
        self.min_size_mm3 = float(min_size_mm3)
        self.min_size_px = int(min_size_px)
        self.review_below = float(review_below)
        if lung_box == "bundle":
            lung_box = bundle.lung_box
        self.lung_box = None if lung_box is None else int(lung_box)  # margin (model pixels), None: whole frame
        if agreement_every < 1:
            raise ValueError(f"agreement_every must be >= 1, got {agreement_every}")
        self.agreement_every = int(agreement_every)
        self.size_multiple = bundle.size_multiple
        self.versions = versions()
        keep_freed_memory()

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        engine: str = "auto",
        device: str = "auto",
        batch_size: int = settings.BATCH_SIZE,
        allow_fallback: bool = False,
        lung_backend: str = settings.LUNG_BACKEND,
        agreement: bool = True,
        threads: int | None = None,
        fp16: bool | None = None,
        available_providers: list[str] | None = None,
        **options: Any,
    ) -> Predictor:
        """Verify the bundle, open one engine per network (the peer only with ``agreement``).

        Raises BundleError (bad bundle) or EngineUnavailable (GPU engine asked for, not obtained).
        """
        bundle = load_bundle(path)
        resolved = resolve_engine(engine, device, allow_fallback, available_providers)
        if resolved == "trt" and bundle.lung_box is not None:  # its engines are built for one fixed frame size
            raise EngineUnavailable(f"{path}: --engine trt: this bundle runs on lung boxes of varying size, which the "
                                    "TensorRT engine (one fixed input size) does not take; use --engine ort")
        names = bundle.network_names if agreement else ["model"]
        gpu_required = wants_gpu(engine, device)
        sources: dict[str, Any] = bundle.torch_networks() if resolved == "torch" else {}
        cache_dir = None
        ort_trt = resolved == "ort" and device != "cpu" and "TensorrtExecutionProvider" in (
            available_providers if available_providers is not None else available_ort_providers()
        )
        if resolved == "trt" or ort_trt:
            from plsynth.bundles.tensorrt_engine import resolve_cache_dir

            cache_dir = resolve_cache_dir(bundle.path)
        engines = {}
        for name in names:
            source = sources[name] if resolved == "torch" else bundle.onnx_path(name)
            engines[name] = open_engine(
                source,
                resolved,
                device,
                allow_fallback,
                threads=threads,
                batch_size=batch_size,
                fp16=reduced_precision(resolved, fp16),
                cache_dir=cache_dir,
                onnx_sha256=None if resolved == "torch" else bundle.onnx_sha256(name),
                available_providers=available_providers,
                gpu_required=gpu_required,
                arena=False,  # the process keeps freed memory (keep_freed_memory): one pool for all
            )
        first = engines["model"]
        logger.info("engine %s (%s), networks %s", first.name, first.provider, ", ".join(engines))
        return cls(bundle, engines, batch_size=batch_size, lung_backend=lung_backend, **options)

    @property
    def engine_name(self) -> str:
        return self.engines["model"].name

    @property
    def provider(self) -> str:
        return self.engines["model"].provider

    # ------------------------------------------------------------------ core

    def probabilities(self, image: Any, lung: np.ndarray, network: str = "model") -> np.ndarray:
        """Infection probability (z, y, x) float32 on the input grid; 0 on slices without lung and
        outside the lung box (`_batches`). ``predict`` does not keep this volume; tests and benchmarks do."""
        prob = np.zeros(np.shape(lung), np.float32)
        for idx, (ys, xs), batch in self._batches(image, np.asarray(lung), network):
            prob[idx, ys, xs] = batch
        return prob

    def _batches(self, image: Any, lung: np.ndarray, network: str,
                 slices: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, tuple[slice, slice], np.ndarray]]:
        """(slice indices, in-plane window, probabilities there) batch by batch, on the input grid.

        Only slices holding lung (of ``slices``, default all) go through the network, windowed a
        batch at a time (no windowed copy of the volume). With ``lung_box`` set, every slice goes
        as the volume's lung box (`volume_box`) cut from the resized frame, and the window is that
        box when the model's grid is the input's (probability 0 outside it); else the whole frame.
        """
        from plsynth.data.preprocess import paste_at, to_input_grid, to_model_input, volume_box
        from plsynth.data.window import to_unit

        size = self.bundle.image_size
        engine = self.engines[network]
        z, y, x = lung.shape
        has_lung = lung.reshape(z, -1).any(axis=1)
        todo = np.flatnonzero(has_lung) if slices is None else np.asarray(slices)[has_lung[slices]]
        box = None
        if self.lung_box is not None and has_lung.any():
            box = volume_box(lung[has_lung], size, self.lung_box, self.size_multiple)
        whole = (slice(None), slice(None))
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            unit = to_unit(replace(image, array=image.array[idx]), self.bundle.window_hu,
                           self.bundle.intensity, lung[idx])
            batch = to_model_input(unit, lung[idx], size, self.bundle.lung_handling)
            if box is None:
                yield idx, whole, to_input_grid(sigmoid(self._run(engine, batch)[:, 0]), (y, x))
                continue
            y0, y1, x0, x1 = box
            out = sigmoid(self._run(engine, np.ascontiguousarray(batch[..., y0:y1, x0:x1])))
            if (y, x) == (size, size):
                yield idx, (slice(y0, y1), slice(x0, x1)), out[:, 0]
            else:
                yield idx, whole, to_input_grid(paste_at(out, np.tile([[y0, x0]], (len(idx), 1)), size)[:, 0], (y, x))

    @staticmethod
    def _run(engine: Engine, batch: np.ndarray) -> np.ndarray:
        logits = engine.run(batch)
        if logits.shape != batch.shape:
            raise RuntimeError(f"engine {engine.name} returned shape {logits.shape} for input {batch.shape}")
        return logits

    def _infection(self, image: Any, lung: np.ndarray, network: str, slices: np.ndarray | None = None,
                   clean: bool = True) -> np.ndarray:
        """One network's uint8 mask (z, y, x): thresholded and clipped to the lung field batch by batch
        (no volume of probabilities is kept), then (with ``clean``) components below the size floor dropped."""
        from plsynth.deploy import postprocess as post

        mask = np.zeros(lung.shape, np.uint8)
        for idx, (ys, xs), prob in self._batches(image, lung, network, slices):
            mask[idx, ys, xs] = post.keep_inside_lungs(post.threshold(prob, self.bundle.threshold), lung[idx, ys, xs])
        if clean and (box := post.bounding_box(mask)) is not None:
            mask[box] = post.remove_small_components(mask[box], post.min_voxels(self.min_size_mm3, image.spacing,
                                                                                  self.min_size_px))
        return mask

    def predict(self, image: Any, lung: np.ndarray) -> Prediction:
        """Infection mask for one CTImage given its lung labels (z, y, x), on the input's grid.

        With a peer network: ``peer_infection`` holds its mask on the sampled slices (`agreement_slices`),
        thresholded and clipped, empty elsewhere, and ``agreement`` the Dice of the two masks there.
        """
        lung = np.asarray(lung)
        if lung.shape != image.array.shape:
            raise ValueError(f"{image.source}: lung labels {lung.shape} differ from image {image.array.shape}")
        started = time.perf_counter()
        infection = self._infection(image, lung, "model")
        result = Prediction(infection=infection, seconds_network=time.perf_counter() - started)
        if "peer" in self.engines:
            from plsynth.metrics import dice

            started = time.perf_counter()
            sampled = agreement_slices(lung, self.agreement_every)
            # not cleaned of small components: on isolated slices that would judge 3D lesions by their 2D sections
            result.peer_infection = self._infection(image, lung, "peer", sampled, clean=False)
            result.agreement = round(float(dice(infection[sampled], result.peer_infection[sampled])), 4)
            result.seconds_agreement = time.perf_counter() - started
        return result

    # ------------------------------------------------------------------ batch

    def output_path(self, out_dir: Path, case: Any, is_slice: bool) -> Path:
        return Path(out_dir) / f"{case.name}{'.png' if is_slice else '.nii.gz'}"

    def is_finished(self, out_dir: Path, case: Any, input_sha256: str | None,
                    formats: tuple[str, ...] = ("nifti",)) -> dict | None:
        """The case's record when a previous run finished this very input with this very bundle.

        The record must be ok, name the same input content (sha256 of the file, or of a DICOM
        folder's files), the same bundle (sha256 of its meta.json, which lists every file's
        sha256) and the same engine and precision (``provider``: a bfloat16 mask is not an fp32
        one), and its outputs must still be there; otherwise the case is done again.
        """
        from plsynth.deploy.report import read_case_record

        record = read_case_record(out_dir, case.name)
        if not record or record.get("status") != "ok" or input_sha256 is None:
            return None
        if record.get("input_sha256") != input_sha256 or record.get("bundle_sha256") != self.bundle_sha256:
            return None
        if record.get("provider") != self.provider:
            return None
        wanted = ["mask"]  # the outputs this run asks for must all be there
        if record.get("series_uid"):  # a DICOM series: its outputs follow --format
            wanted = [key for key, fmt in (("mask", "nifti"), ("dicom_seg", "dicom-seg")) if fmt in formats]
        if not all(record.get(key) and (Path(out_dir) / record[key]).is_file() for key in wanted):
            return None
        return record

    @cached_property
    def bundle_sha256(self) -> str:
        return self.bundle.meta_sha256()

    def run(
        self,
        cases: Iterable[Any],
        out_dir: Path,
        overlays: bool = False,
        resume: bool = False,
        series_uid: str | None = None,
        formats: tuple[str, ...] = ("nifti",),
        max_voxels: int | None = None,
    ) -> Iterator[CaseResult]:
        """Segment ``cases`` (``plsynth.data.io.Case``) one by one, writing outputs under ``out_dir``.

        Per case, in this order, each written atomically: ``lungs/<name>.*`` (lung labels),
        ``overlays/<name>.png`` (with ``overlays``), ``<name>.nii.gz``/``<name>.png`` (infection),
        ``<name>.seg.dcm`` (DICOM inputs, with "dicom-seg" in ``formats``), ``cases/<name>.json``
        (its report row). A failing case (bad input, or an output that cannot be written) yields
        status "failed" with its error, the files this attempt wrote for it are removed, and the
        batch goes on. With ``resume``, cases finished from the same input, bundle and engine are
        yielded as "skipped".
        """
        from plsynth.data.io import DEFAULT_MAX_VOXELS, content_sha256
        from plsynth.deploy.report import write_case_record

        max_voxels = DEFAULT_MAX_VOXELS if max_voxels is None else max_voxels

        out_dir = Path(out_dir)
        for case in cases:
            try:
                digest = content_sha256(Path(case.path))
            except OSError:
                digest = None  # reading the case reports the problem
            if resume and (record := self.is_finished(out_dir, case, digest, formats)) is not None:
                yield CaseResult(case.name, Path(case.path), "skipped", None, record)
                continue
            started = time.perf_counter()
            row: dict[str, Any] = {"case": case.name, "input": Path(case.path).name, "input_sha256": digest,
                                   "bundle_sha256": self.bundle_sha256, "lung_backend": self.lung_backend,
                                   "engine": self.engine_name, "provider": self.provider, "versions": self.versions}
            written: list[Path] = []
            try:
                row.update(self._run_case(case, out_dir, overlays, series_uid, formats, written, max_voxels))
                row.update(status="ok", error=None)
            except InputError as exc:
                row.update(status="failed", error=_message(exc))
            except OSError as exc:  # an output that cannot be written (full disk, permissions, a folder in the way)
                target = exc.filename2 or exc.filename or out_dir  # os.replace: (temporary, final)
                row.update(status="failed", error=f"cannot write output {target}: {exc.strerror or exc}")
            except Exception as exc:  # noqa: BLE001 - one case never stops the batch; traceback with --verbose
                logger.info("case %s failed unexpectedly", case.name, exc_info=True)
                row.update(status="failed", error=_message(exc))
            row["seconds"] = round(time.perf_counter() - started, 3)
            if row["status"] == "ok":
                try:
                    write_case_record(out_dir, row)
                except OSError as exc:
                    row.update(status="failed", error=f"cannot write the case record: {exc.strerror or exc}")
            if row["status"] != "ok":
                for path in written:  # no output of a failed case stays behind under a final name
                    path.unlink(missing_ok=True)
                try:
                    write_case_record(out_dir, row)
                except OSError:
                    pass  # the report (or stderr) still carries the failure
            give_back_freed_memory()  # the next case starts from this case's pages, not on top of them
            yield CaseResult(case.name, Path(case.path), row["status"], row.get("error"), row)

    def _run_case(self, case: Any, out_dir: Path, overlays: bool, series_uid: str | None,
                  formats: tuple[str, ...] = ("nifti",), written: list[Path] | None = None,
                  max_voxels: int | None = None) -> dict:
        from plsynth.data.dicom import DicomGeometry
        from plsynth.data.io import read_image, write_mask
        from plsynth.deploy import postprocess as post

        written = [] if written is None else written
        image = read_image(Path(case.path), series_uid, **({} if max_voxels is None else {"max_voxels": max_voxels}))
        is_dicom = isinstance(image.geometry, DicomGeometry)
        info: dict[str, Any] = {
            "kind": "slice" if image.is_slice else "volume",
            "series_uid": image.geometry.series_uid if is_dicom else None,
            "shape": list(image.array.shape),
            "spacing_mm": None if image.spacing is None else [round(float(s), 4) for s in image.spacing],
        }
        started = time.perf_counter()
        lungs = np.asarray(self.lung_fn(image)).astype(np.uint8)
        if not lungs.any():
            raise InputError(case.path, f"no lung found by the {self.lung_backend} lung back-end; no mask written")
        region = lung_field(image, lungs)
        info["seconds_lungs"] = round(time.perf_counter() - started, 3)
        prediction = self.predict(image, region)
        # the reported lung: the lungs and the disease found in their field (consolidation holds no air)
        lung = np.where((lungs > 0) | (prediction.infection > 0), region, 0).astype(np.uint8)
        info["seconds_network"] = round(prediction.seconds_network, 3)
        info.update(post.measure(prediction.infection, lung, image.spacing))
        reasons = post.lung_review_reasons(lung, image.spacing)
        if prediction.agreement is not None:
            info["agreement_dice"] = prediction.agreement
            info["seconds_agreement"] = round(prediction.seconds_agreement, 3)
            if prediction.agreement < self.review_below:
                reasons.append(f"the two networks agree at Dice {prediction.agreement:.3f} < {self.review_below}")
        info["review"] = bool(reasons)
        if reasons:
            info["review_reason"] = "; ".join(reasons)
        nifti = "nifti" in formats or not is_dicom
        final = self.output_path(out_dir, case, image.is_slice)
        if nifti:
            lung_path = out_dir / LUNGS_DIR / final.name
            written.append(write_mask(lung, image, lung_path, scale_binary_png=False))  # labels 0/1/2
        if overlays:
            from plsynth.data.window import to_unit
            from plsynth.deploy.overlays import draw_overlay

            written.append(out_dir / OVERLAYS_DIR / f"{case.name}.png")
            draw_overlay(written[-1], to_unit(image, self.bundle.window_hu, self.bundle.intensity, region),
                         lung, prediction.infection, f"{case.name}: {info.get('percent_involved')} % of lung")
        if is_dicom and "dicom-seg" in formats:
            from plsynth.deploy.dicom_seg import write_dicom_seg

            seg_path = out_dir / f"{case.name}.seg.dcm"
            written.append(write_dicom_seg(prediction.infection, lung, image, seg_path,
                                           algorithm_version=self.versions.get("plsynth", "unknown")))
            info["dicom_seg"] = seg_path.name
        if nifti:
            written.append(write_mask(prediction.infection, image, final))
            info["mask"] = final.name
        return info


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory in the process for the next array (True when it could).

    Why: a 512x512x300 volume allocates and frees several GB of arrays, each a fresh ``mmap`` that
    the kernel must fault in and zero again. On virtual machines whose host takes freed guest pages
    back, that first touch is a host fault: measured on the benchmark machine, 0.1 GB/s on fresh
    pages against 13 GB/s on reused ones, several seconds per volume (BENCHMARKS.md). With large
    blocks served from the heap and the heap never trimmed on free, a volume's temporaries reuse
    pages the process already has (ONNX Runtime's included: `Predictor.from_bundle` turns its arena
    off); `give_back_freed_memory` returns them between cases. Process-wide, so called when a
    `Predictor` is built; a no-op where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def give_back_freed_memory() -> bool:
    """Return the heap's free pages to the system (glibc ``malloc_trim``); True when glibc did it.

    Called after each case: a folder of volumes of different sizes otherwise leaves a fragmented
    heap that grows case after case (measured: 4 volumes of 120-300 slices, peak RSS 3.6 GB kept
    against 2.2 GB for the largest alone; BENCHMARKS.md).
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@cache
def _glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None; looked up once."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def reduced_precision(engine: str, fp16: bool | None) -> bool:
    """Whether the networks run in reduced precision: as ``--fp16`` / ``--fp32`` say; by default on
    OpenVINO (bfloat16 where the CPU grants it, OpenVINO's own choice on such CPUs: masks at Dice
    0.997-0.999 on average against fp32 on every trained bundle measured, BENCHMARKS.md, issue 16),
    fp32 elsewhere."""
    return engine == "openvino" if fp16 is None else fp16


def agreement_slices(lung: np.ndarray, every: int) -> np.ndarray:
    """Every ``every``-th slice holding lung (a systematic sample over the lung's extent)."""
    with_lung = np.flatnonzero(np.asarray(lung).reshape(len(lung), -1).any(axis=1))
    return with_lung[(len(with_lung) % every) // 2 :: every] if every > 1 else with_lung


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"
