"""Inference engines behind one interface: ``torch``, ``ort`` (ONNX Runtime), ``openvino`` and ``trt`` (TensorRT).

Every engine has ``name`` (torch / ort / openvino / trt), ``provider`` (what actually runs it, e.g.
``CPUExecutionProvider``, ``CUDAExecutionProvider``, ``torch:cpu``, ``tensorrt 10.x fp16``) and
``run(x)``: ``(B, 1, S, S)`` float32 in [0, 1] -> ``(B, 1, S, S)`` float32 logits. ONNX-based
engines also have ``run_named(feeds) -> list[np.ndarray]`` for models with several inputs (the
SEAN decoder service uses the same classes).

ONNX Runtime falls back from GPU to CPU silently (ORT issues #23372, #17801, #17394): after the
session is created we read ``session.get_providers()``, and when a GPU engine was asked for and
not obtained we raise `EngineUnavailable` (the CLI's exit code 5) unless ``allow_fallback``.
The provider logic takes the list of available providers as a parameter so tests can fake a GPU
machine.

On the CPU ``auto`` takes OpenVINO where it is installed: on the same ONNX file, in fp32, it ran the
512 px U-Net 1.3-1.4x faster than ONNX Runtime on 2 Intel Xeon cores, with masks equal to ONNX
Runtime's, and in bfloat16 (plsynth-infer's default where the CPU has it) about 3x faster again,
with masks near fp32's (BENCHMARKS.md, issue 16; ONNX Runtime spends 18 % there reordering its
blocked layout around each instance norm, OpenVINO was not profiled).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from plsynth.bundles.tensorrt_engine import tensorrt_status, torch_cuda_available
from plsynth.errors import BundleError, EngineUnavailable  # EngineUnavailable: re-exported (exit code 5)

logger = logging.getLogger(__name__)

ENGINES = ("auto", "trt", "ort", "openvino", "torch")
DEVICES = ("auto", "cuda", "cpu")
ORT_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ORT_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@runtime_checkable
class Engine(Protocol):
    name: str
    provider: str

    def run(self, x: np.ndarray) -> np.ndarray: ...


# ----------------------------------------------------------------------------- choice


def wants_gpu(engine: str, device: str) -> bool:
    """True when the user explicitly asked for a GPU (``--engine trt`` or ``--device cuda``)."""
    return engine == "trt" or device == "cuda"


def ort_providers(device: str, available: Sequence[str]) -> list[str]:
    """ONNX Runtime providers to ask for, best first: TensorRT, CUDA, CPU (those available).

    device "cpu" asks for the CPU only; "cuda" and "auto" ask for every available GPU provider.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return [p for p in ORT_ORDER if p in available or p == "CPUExecutionProvider"]


def check_providers(obtained: Sequence[str], gpu_required: bool, allow_fallback: bool, source: str = "") -> str:
    """The provider that actually runs the session (the first one in ``session.get_providers()``).

    Raises EngineUnavailable when a GPU was required and only the CPU was obtained, unless
    ``allow_fallback``, in which case the fallback is logged as a warning.
    """
    used = obtained[0] if obtained else "none"
    if gpu_required and used not in ORT_GPU_PROVIDERS:
        message = (
            f"{source}: a GPU engine was requested but ONNX Runtime loaded {list(obtained)} "
            "(onnxruntime-gpu, CUDA/cuDNN or TensorRT libraries missing, or no GPU visible); "
            "pass --allow-fallback to run on the CPU anyway"
        )
        if not allow_fallback:
            raise EngineUnavailable(message)
        logger.warning("%s; continuing on %s because --allow-fallback was given", message, used)
    return used


def available_ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def import_openvino() -> Any:
    """``import openvino`` without its usage telemetry.

    Importing openvino imports its converter, which starts Google Analytics telemetry (opt-out:
    it writes a client id under ``$HOME/intel`` and may send events). Without the
    ``openvino_telemetry`` package openvino uses its own no-op stub, so the package is blocked
    from import for this process (only openvino's tools use it; inference does not).
    """
    import sys

    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: ImportError on import
    import openvino

    return openvino


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def resolve_engine(
    engine: str,
    device: str,
    allow_fallback: bool,
    ort_available: Sequence[str] | None = None,
    trt_status: tuple[bool, str] | None = None,
    cuda_available: bool | None = None,
    openvino: bool | None = None,
) -> str:
    """Which engine to open: ``torch``, ``ort``, ``openvino`` or ``trt``.

    auto: TensorRT when it is installed and a GPU is visible (and device is not cpu), else ONNX
    Runtime on a GPU provider, else OpenVINO on the CPU when installed, else ONNX Runtime when
    installed, else torch. An explicit ``trt`` or ``openvino`` that cannot be had raises
    EngineUnavailable, or falls back to ``ort`` with ``allow_fallback``. The environment probes
    are parameters so tests can fake machines.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    ort_available = available_ort_providers() if ort_available is None else list(ort_available)
    if engine in ("trt", "auto") and device != "cpu":
        ok, reason = tensorrt_status() if trt_status is None else trt_status
        # the CUDA probe imports torch (1.2 s): only asked where TensorRT could run
        cuda = ok and (torch_cuda_available() if cuda_available is None else cuda_available)
        if cuda:
            return "trt"
        if engine == "trt":
            why = reason if not ok else "no CUDA device visible to torch"
            message = f"--engine trt: TensorRT cannot run here ({why}); pass --allow-fallback to use ONNX Runtime"
            if not allow_fallback:
                raise EngineUnavailable(message)
            logger.warning("%s; falling back to ONNX Runtime", message)
    gpu_ort = device != "cpu" and any(p in ORT_GPU_PROVIDERS for p in ort_available)
    if engine == "openvino" and device == "cuda" and not allow_fallback:
        raise EngineUnavailable("--engine openvino runs on the CPU, --device cuda asks for a GPU; "
                                "pass --allow-fallback to run on the CPU anyway")
    if engine == "openvino" or (engine == "auto" and device != "cuda" and not gpu_ort):
        if openvino_available() if openvino is None else openvino:
            return "openvino"
        if engine == "openvino":
            message = "--engine openvino: OpenVINO is not installed (pip install 'plsynth[cpu]')"
            if not allow_fallback:
                raise EngineUnavailable(message + "; pass --allow-fallback to use ONNX Runtime")
            logger.warning("%s; falling back to ONNX Runtime", message)
    if engine in ("ort", "trt", "openvino", "auto"):
        if ort_available:
            return "ort"
        if engine != "auto" and not allow_fallback:
            raise EngineUnavailable("--engine ort: onnxruntime is not installed; pip install 'plsynth[cpu]' or '[gpu]'")
    return "torch"


# ----------------------------------------------------------------------------- engines


class TorchEngine:
    """PyTorch eager in eval() and inference mode: the reference engine."""

    name = "torch"

    def __init__(self, network: Any, device: str = "cpu") -> None:
        import torch

        self._torch = torch
        from plsynth.torch_setup import flush_denormals

        flush_denormals()
        self.device = device
        self.network = network.to(device).eval()
        self.provider = f"torch:{device}"

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.network(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device))
        return out.float().cpu().numpy()


class OrtEngine:
    """An ONNX Runtime session over one ONNX file; generic over input and output names."""

    name = "ort"

    def __init__(
        self,
        onnx_path: Path,
        providers: Sequence[str],
        gpu_required: bool = False,
        allow_fallback: bool = False,
        threads: int | None = None,
        provider_options: dict[str, dict] | None = None,
        arena: bool = True,
    ) -> None:
        """``arena``: ONNX Runtime's own CPU memory arena; off where the process keeps freed memory
        anyway (`plsynth.deploy.predictor.keep_freed_memory`), so that the networks and numpy share
        one pool instead of each holding its peak."""
        import onnxruntime as ort

        from plsynth.bundles.onnx_export import ort_options

        ort.disable_telemetry_events()  # a no-op off Windows; the guide promises no telemetry
        options = ort_options(threads or 0)
        options.enable_cpu_mem_arena = bool(arena)
        if threads:
            options.inter_op_num_threads = 1
        provider_list = [(p, (provider_options or {}).get(p, {})) for p in providers]
        self.onnx_path = Path(onnx_path)
        self.requested = list(providers)
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=provider_list)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{onnx_path}: ONNX Runtime cannot load this model ({reason})") from None
        self.providers = list(self.session.get_providers())
        self.provider = check_providers(self.providers, gpu_required, allow_fallback, str(onnx_path))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        logger.info("onnxruntime %s: asked for %s, loaded %s", self.onnx_path.name, self.requested, self.providers)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_named({self.input_names[0]: np.ascontiguousarray(x, np.float32)})[0]

    def run_named(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class OpenVinoEngine:
    """OpenVINO on the CPU over one ONNX file (height and width may vary from call to call).

    ``precision`` "bf16" (plsynth-infer's default) is granted on CPUs with AMX / AVX-512 BF16 and is
    about 3x faster there, with masks at Dice 0.997-0.999 on average against fp32 on the trained bundles
    measured, not equal to them (BENCHMARKS.md, issue 16); "f32" (``--fp32``) keeps fp32 arithmetic, ONNX Runtime's
    masks. ``provider`` names the precision granted.
    """

    name = "openvino"

    def __init__(self, onnx_path: Path, threads: int | None = None, precision: str = "f32") -> None:
        ov = import_openvino()
        from openvino.frontend import FrontEndManager

        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.onnx_path, self.precision = Path(onnx_path), precision  # asked for; ``provider`` says what was granted
        try:  # the ONNX frontend only: guessing the format would try every frontend and log their failures
            onnx = FrontEndManager().load_by_framework("onnx")
            self.model = ov.Core().compile_model(onnx.convert(onnx.load(str(onnx_path))), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own GeneralFailure/RuntimeError types
            lines = [line for line in str(exc).strip().splitlines() if line and not line.startswith(("Check ", "Exception from"))]
            reason = lines[-1] if lines else type(exc).__name__
            raise BundleError(f"{onnx_path}: OpenVINO cannot load this model ({reason})") from None
        self.request = self.model.create_infer_request()
        self.input_names = [port.any_name for port in self.model.inputs]
        used = self.model.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # granted: bf16 needs AMX / AVX-512 BF16
        self.provider = f"openvino {ov.__version__.split('-')[0]} CPU {used}"
        logger.info("openvino %s: %s, %s threads", self.onnx_path.name, self.provider, threads or "all")

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_named({self.input_names[0]: np.ascontiguousarray(x, np.float32)})[0]

    def run_named(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)  # outputs copied out of the request (share_outputs=False)
        return [result[port] for port in self.model.outputs]


def open_engine(
    source: Path | Any,
    engine: str = "auto",
    device: str = "auto",
    allow_fallback: bool = False,
    threads: int | None = None,
    batch_size: int = 8,
    fp16: bool = False,
    cache_dir: Path | None = None,
    onnx_sha256: str | None = None,
    available_providers: Sequence[str] | None = None,
    gpu_required: bool | None = None,
    arena: bool = True,
) -> Engine:
    """Open one engine over an ONNX file (``ort``/``openvino``/``trt``) or a torch module (``torch``).

    ``engine`` must already be resolved or "auto" (see `resolve_engine`). ``available_providers``
    fakes ONNX Runtime's provider list in tests. ``gpu_required`` defaults to what ``engine`` and
    ``device`` say (`wants_gpu`); pass the user's original request when ``engine`` was resolved.
    """
    if gpu_required is None:
        gpu_required = wants_gpu(engine, device)
    if engine == "auto":
        engine = resolve_engine(engine, device, allow_fallback, available_providers)
    if engine == "torch":
        if isinstance(source, (str, Path)):
            raise ValueError(f"{source}: the torch engine needs a torch module, not an ONNX file")
        torch_device = device
        if device in ("auto", "cuda"):
            cuda = torch_cuda_available()
            if gpu_required and not cuda:
                message = "--device cuda: torch sees no CUDA device; pass --allow-fallback to run on the CPU"
                if not allow_fallback:
                    raise EngineUnavailable(message)
                logger.warning("%s; using the CPU", message)
            torch_device = "cuda" if cuda else "cpu"
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        return TorchEngine(source, torch_device)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"engine {engine!r} needs an ONNX file, got {type(source).__name__}")
    if engine == "openvino":
        return OpenVinoEngine(Path(source), threads=threads, precision="bf16" if fp16 else "f32")
    if engine == "trt":
        from plsynth.bundles.tensorrt_engine import open_trt_engine

        return open_trt_engine(Path(source), batch_size=batch_size, fp16=fp16, cache_dir=cache_dir, onnx_sha256=onnx_sha256)
    available = available_ort_providers() if available_providers is None else list(available_providers)
    providers = ort_providers(device, available)
    return OrtEngine(
        Path(source),
        providers,
        gpu_required=gpu_required,
        allow_fallback=allow_fallback,
        threads=threads,
        arena=arena,
        provider_options=_ort_trt_options(cache_dir, fp16, batch_size) if "TensorrtExecutionProvider" in providers else None,
    )


def _ort_trt_options(cache_dir: Path | None, fp16: bool, batch_size: int) -> dict[str, dict]:
    """ORT's TensorRT EP options: its own engine cache (never run here: no TensorRT on CPU machines)."""
    options: dict[str, Any] = {"trt_fp16_enable": bool(fp16)}
    if cache_dir is not None:
        options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": True})
    return {"TensorrtExecutionProvider": options}
