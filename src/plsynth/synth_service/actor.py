"""The named Ray synthesis actor and the client that trainers use to call it.

One actor holds the decoder (TensorRT engine, ONNX Runtime session or the PyTorch reference)
and the style pool, and serves every trainer worker of a run. Concurrent requests are
gathered for a few milliseconds (``gather_ms``) or until ``max_batch`` slices are waiting,
then served by ONE decoder call whose batch is the concatenation of theirs; the result is
split back per caller. While a decode runs, new requests queue up and form the next batch,
so under load the batches grow by themselves.

Per request the actor draws the reference style from the pool with the request's seed (one
averaged style per request, as the paper draws one per mini-batch) and builds the one-hot
semantic map; only the decoder call is shared. The decoder noise of a shared batch is seeded
by the first request's seed, so a request is reproducible only when it is served alone.

Fault handling: the actor is created with ``max_restarts`` (Ray restarts it, reloading the
decoder), and :class:`ActorSynthesisClient` retries a failed call a bounded number of times
with exponential backoff, looking the actor up again by name, then raises.

The decoder is whatever ``factory()`` returns (see :class:`BatchDecoder`); the default
factory, :class:`BundleDecoderFactory`, loads a synthesizer bundle with the back-end chosen
by :func:`choose_backend`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from plsynth.config import RayConfig

log = logging.getLogger(__name__)

ACTOR_NAME = "plsynth-synth"
NAMESPACE = "plsynth"


class BatchDecoder(Protocol):
    """What the actor needs from a decoder back-end.

    ``condition`` is cheap and per request; ``decode`` is the expensive call the actor batches.
    """

    backend: str  # what actually runs, e.g. "torch:cpu", "ort:CPUExecutionProvider", "trt:fp16"
    bundle_sha256: str

    def condition(self, infection: Any, lung: Any, images: Any | None, seed: int | None) -> tuple[Any, Any]:
        """(infection (B,1,H,W), lung (B,H,W), images, seed) -> (onehot (B,C,S,S), style (B,C,D)) torch tensors."""
        ...

    def decode(self, onehot: Any, style: Any, noise_seed: int | None) -> Any:
        """(B,C,S,S), (B,C,D) -> (B,1,S,S) float32 images in [0, 1]."""
        ...


# ---------------------------------------------------------------------------------------------
# back-end choice and the default factory


def choose_backend(requested: str = "auto") -> str:
    """Pick the decoder back-end: ``trt`` when a GPU and TensorRT are present, else ``ort``
    when onnxruntime imports, else ``torch``. An explicit request (``trt``/``ort``/``torch``)
    is honoured or refused with a ValueError naming what is missing (no silent downgrade).
    """
    import importlib.util

    import torch

    has_gpu = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    if requested == "auto":
        if has_gpu and has_trt:
            return "trt"
        return "ort" if has_ort else "torch"
    if requested == "trt" and not (has_gpu and has_trt):
        raise ValueError(f"synth backend 'trt' needs a CUDA GPU and tensorrt (gpu={has_gpu}, tensorrt={has_trt})")
    if requested == "ort" and not has_ort:
        raise ValueError("synth backend 'ort' needs onnxruntime; install plsynth[cpu] or plsynth[gpu]")
    if requested not in ("trt", "ort", "torch"):
        raise ValueError(f"synth backend must be auto, trt, ort or torch, got {requested!r}")
    return requested


@dataclass(frozen=True)
class BundleDecoderFactory:
    """Picklable recipe that loads a synthesizer bundle inside the actor process.

    ``trt``: the decoder ONNX is built into a TensorRT engine by the engine cache
    (``plsynth.bundles.tensorrt_engine.open_trt_engine``, cached by GPU, TensorRT version, ONNX
    hash and precision); ``ort``: ONNX Runtime with CUDA when available, else CPU; ``torch``:
    the reference, on CUDA when available.
    """

    bundle: str
    backend: str = RayConfig.synth_backend  # auto | trt | ort | torch
    seed: int = 0
    max_batch: int = RayConfig.synth_max_batch  # TensorRT profile maximum
    fp16: bool = False
    k: int | None = None  # style codes averaged per draw (None: the bundle's synth.pool_k)
    pool_mode: str | None = None  # N+, N or self (None: the bundle's synth.pool_mode)

    def __call__(self) -> BatchDecoder:
        import torch

        from plsynth.synth_service.local import LocalSynthesizer

        backend = choose_backend(self.backend)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if backend == "ort":
            import onnxruntime

            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in onnxruntime.get_available_providers()]
            local = LocalSynthesizer(self.bundle, backend="ort", seed=self.seed, providers=providers, k=self.k,
                                     pool_mode=self.pool_mode)
            return LocalDecoderAdapter(local)
        local = LocalSynthesizer(self.bundle, backend="torch", seed=self.seed, k=self.k, pool_mode=self.pool_mode,
                                 device=device if backend == "torch" else "cpu")
        if backend == "trt":  # NEVER RUN HERE (no TensorRT on the CPU machines)
            from plsynth.bundles.tensorrt_engine import open_trt_engine

            engine = open_trt_engine(local.bundle.onnx_path, batch_size=self.max_batch, fp16=self.fp16)
            return LocalDecoderAdapter(local, trt_engine=engine, backend=f"trt:{'fp16' if self.fp16 else 'fp32'}")
        return LocalDecoderAdapter(local)


class LocalDecoderAdapter:
    """Splits a :class:`plsynth.synth_service.local.LocalSynthesizer` into condition + decode.

    ``condition`` is ``LocalSynthesizer.condition`` (the request's map at the decoder size, one
    pool draw per request with the request's seed, or the images' own styles in ``self`` mode). ``decode``
    is the synthesizer's (torch / ORT) or a TensorRT engine run on the same inputs.
    """

    def __init__(self, local: Any, trt_engine: Any = None, backend: str | None = None) -> None:
        self.local = local
        self.trt_engine = trt_engine
        self.backend = backend or str(local.backend)
        self.bundle_sha256 = str(local.bundle_sha256)

    def condition(self, infection, lung, images, seed):
        import torch

        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else self.local.generator
        return self.local.condition(infection, lung, images, generator)

    def decode(self, onehot, style, noise_seed):
        if self.trt_engine is None:
            return self.local.decode(onehot, style, noise_seed)
        import torch

        generator = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else self.local.generator
        feeds = {"onehot": onehot.float().numpy(), "style": style.float().numpy()}
        noise = self.local.bundle.decoder.make_noise(len(onehot), generator)
        if noise is not None:
            feeds["noise"] = noise.numpy()
        (image,) = self.trt_engine.run_named(feeds)
        return self.local.to_unit(torch.from_numpy(image), onehot, generator)


# ---------------------------------------------------------------------------------------------
# the actor


@dataclass
class _Request:
    infection: Any
    lung: Any
    images: Any
    seed: int | None
    future: asyncio.Future
    arrived: float


class SynthesisActor:
    """Async actor; wrapped with ``ray.remote`` by :func:`get_or_create_actor`.

    Public methods (all ``.remote()``): ``synthesize``, ``info``, ``stats``, ``reset_stats``, ``ping``.
    """

    def __init__(self, factory: Callable[[], BatchDecoder], max_batch: int = RayConfig.synth_max_batch,
                 gather_ms: float = RayConfig.synth_gather_ms) -> None:
        import torch

        torch.set_num_threads(max(1, int(torch.get_num_threads())))
        t0 = time.perf_counter()
        self._decoder = factory()
        self.load_s = time.perf_counter() - t0
        self.max_batch = int(max_batch)
        self.gather_s = float(gather_ms) / 1000.0
        self._pending: deque[_Request] = deque()
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._started = time.time()
        self.reset_stats()
        log.info("synthesis actor ready: backend %s, loaded in %.2f s", self._decoder.backend, self.load_s)

    # -- calls -----------------------------------------------------------------------------
    async def synthesize(self, infection: np.ndarray, lung: np.ndarray, images: np.ndarray | None = None,
                         seed: int | None = None) -> np.ndarray:
        """infection (B,1,H,W) float {0,1}, lung (B,H,W) int -> (B,1,H,W) float32 in [0,1]."""
        infection = np.asarray(infection, dtype=np.float32)
        lung = np.asarray(lung)
        if infection.ndim != 4 or infection.shape[1] != 1 or lung.shape != (infection.shape[0],) + infection.shape[2:]:
            raise ValueError(f"synthesize: expected infection (B,1,H,W) and lung (B,H,W), got "
                             f"{infection.shape} and {lung.shape}")
        loop = asyncio.get_running_loop()
        request = _Request(infection, lung, images, seed, loop.create_future(), time.perf_counter())
        self._pending.append(request)
        self.counters["requests"] += 1
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._serve())
        return await request.future

    def info(self) -> dict[str, Any]:
        import os

        return {"backend": self._decoder.backend, "bundle_sha256": self._decoder.bundle_sha256,
                "pid": os.getpid(), "load_s": self.load_s, "max_batch": self.max_batch,
                "gather_ms": self.gather_s * 1000.0, "started": self._started}

    def stats(self) -> dict[str, Any]:
        out = dict(self.counters)
        out["batch_sizes"] = list(self._batch_sizes)
        busy = out["decode_s"]
        out["slices_per_s"] = out["slices"] / busy if busy > 0 else 0.0
        out["mean_batch"] = out["slices"] / out["decode_calls"] if out["decode_calls"] else 0.0
        return out

    def reset_stats(self) -> None:
        self.counters = {"requests": 0, "slices": 0, "decode_calls": 0, "decode_s": 0.0,
                         "condition_s": 0.0, "queue_wait_s": 0.0, "errors": 0}
        self._batch_sizes: deque[int] = deque(maxlen=256)

    def ping(self) -> str:
        return "ok"

    # -- batching --------------------------------------------------------------------------
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            waiting = sum(r.infection.shape[0] for r in self._pending)
            if waiting < self.max_batch and self.gather_s > 0:
                await asyncio.sleep(self.gather_s)
            batch, size = [], 0
            while self._pending and (not batch or size + self._pending[0].infection.shape[0] <= self.max_batch):
                request = self._pending.popleft()
                batch.append(request)
                size += request.infection.shape[0]
            now = time.perf_counter()
            self.counters["queue_wait_s"] += sum(now - r.arrived for r in batch)
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # every caller of this batch gets the error
                self.counters["errors"] += 1
                log.exception("decode of a batch of %d slices failed", size)
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            for r, out in zip(batch, results):
                if not r.future.done():
                    r.future.set_result(out)

    def _run_batch(self, batch: list[_Request]) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        t0 = time.perf_counter()
        onehots, styles = [], []
        with torch.inference_mode():
            for r in batch:
                images = None if r.images is None else torch.from_numpy(np.array(r.images, dtype=np.float32))
                onehot, style = self._decoder.condition(torch.as_tensor(r.infection), torch.as_tensor(r.lung),
                                                        images, r.seed)
                onehots.append(onehot)
                styles.append(style)
            t1 = time.perf_counter()
            decoded = self._decoder.decode(torch.cat(onehots), torch.cat(styles), batch[0].seed)
            t2 = time.perf_counter()
            outs, start = [], 0
            for r in batch:
                n = r.infection.shape[0]
                part = decoded[start:start + n].float()
                start += n
                if tuple(part.shape[-2:]) != tuple(r.infection.shape[-2:]):
                    part = F.interpolate(part, size=r.infection.shape[-2:], mode="bilinear", align_corners=False)
                outs.append(part.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False))
        size = sum(r.infection.shape[0] for r in batch)
        self.counters["slices"] += size
        self.counters["decode_calls"] += 1
        self.counters["decode_s"] += t2 - t1
        self.counters["condition_s"] += t1 - t0
        self._batch_sizes.append(size)
        return outs


def get_or_create_actor(factory: Callable[[], BatchDecoder], *, name: str = ACTOR_NAME, namespace: str = NAMESPACE,
                        num_cpus: float = RayConfig.synth_actor_cpus, num_gpus: float = 0.0,
                        max_batch: int = RayConfig.synth_max_batch, gather_ms: float = RayConfig.synth_gather_ms,
                        max_restarts: int = RayConfig.synth_max_restarts, detached: bool = False):
    """Return the handle of the named synthesis actor, creating it if no live one has that name.

    Not detached by default, so it ends with the driver that made it (no leftovers after a
    failed job); ``detached=True`` keeps it for later jobs and then needs :func:`kill_actor`.
    """
    import ray

    remote_cls = ray.remote(SynthesisActor)
    options: dict[str, Any] = dict(name=name, namespace=namespace, get_if_exists=True, num_cpus=num_cpus,
                                   num_gpus=num_gpus, max_restarts=max_restarts, max_concurrency=256)
    if detached:
        options["lifetime"] = "detached"
    handle = remote_cls.options(**options).remote(factory, max_batch=max_batch, gather_ms=gather_ms)
    info = ray.get(handle.info.remote())
    log.info("synthesis actor %s/%s: backend %s, pid %s", namespace, name, info["backend"], info["pid"])
    return handle


def kill_actor(name: str = ACTOR_NAME, namespace: str = NAMESPACE) -> bool:
    """Kill the named actor for good (no restart); False when there is none."""
    import ray

    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


def start_synthesis_actors(cfg: Any, bundle: str, count: int | None = None, *, backend: str | None = None,
                           name: str = ACTOR_NAME) -> list:
    """Start (or join) ``count`` actors named ``name``, ``name-1``, ... from a Config's ``ray`` section."""
    count = cfg.ray.synth_actors if count is None else count
    factory = BundleDecoderFactory(str(bundle), backend=backend or cfg.ray.synth_backend, seed=cfg.synth.seed,
                                   max_batch=cfg.ray.synth_max_batch, k=cfg.synth.pool_k, pool_mode=cfg.synth.pool_mode)
    num_gpus = cfg.ray.synth_actor_gpus if cfg.ray.use_gpu else 0.0
    return [get_or_create_actor(factory, name=name if i == 0 else f"{name}-{i}", num_cpus=cfg.ray.synth_actor_cpus,
                                num_gpus=num_gpus, max_batch=cfg.ray.synth_max_batch,
                                gather_ms=cfg.ray.synth_gather_ms, max_restarts=cfg.ray.synth_max_restarts)
            for i in range(count)]


# ---------------------------------------------------------------------------------------------
# the client


def _request_arrays(infection: Any, lung: Any, images: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A request's tensors as the numpy arrays the actor receives."""
    image_array = None if images is None else images.detach().cpu().numpy().astype(np.float32, copy=False)
    return infection.detach().cpu().numpy().astype(np.float32, copy=False), lung.detach().cpu().numpy(), image_array


class ActorSynthesisClient:
    """:class:`plsynth.synth_service.protocol.SynthesisClient` backed by the named actor.

    Picklable (it keeps only the name), so a trainer sends it to its Ray Train workers; each
    process looks the actor up on first use. A call that fails because the actor died or is
    restarting is retried ``retries`` times with exponential backoff from ``backoff_s``; after
    that the last error is raised as RuntimeError naming the actor.
    """

    def __init__(self, name: str = ACTOR_NAME, namespace: str = NAMESPACE, retries: int = RayConfig.synth_retries,
                 backoff_s: float = 0.5, timeout_s: float = 600.0) -> None:
        self.name, self.namespace = name, namespace
        self.retries, self.backoff_s, self.timeout_s = int(retries), float(backoff_s), float(timeout_s)
        self._handle = None
        self.retried = 0  # calls retried in this process (for tests and logs)
        info = self._call(lambda h: h.info.remote())
        self.backend: str = info["backend"]
        self.bundle_sha256: str = info["bundle_sha256"]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def _lookup(self):
        import ray

        if self._handle is None:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return self._handle

    def _call(self, submit: Callable[[Any], Any]) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return ray.get(submit(self._lookup()), timeout=self.timeout_s)
            except (RayActorError, GetTimeoutError, ValueError) as exc:
                # ValueError: get_actor found no actor of that name (yet, or any more)
                if isinstance(exc, ValueError) and self._handle is not None:
                    raise
                if attempt == self.retries:
                    raise RuntimeError(f"synthesis actor {self.namespace}/{self.name} failed "
                                       f"{attempt + 1} times; last error: {exc}") from exc
                log.warning("synthesis actor %s call failed (%s); retry %d/%d in %.1f s", self.name,
                            type(exc).__name__, attempt + 1, self.retries, delay)
                self.retried += 1
                self._handle = None
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def synthesize(self, infection, lung, images=None, seed=None):
        import torch

        arrays = _request_arrays(infection, lung, images)
        out = self._call(lambda h: h.synthesize.remote(*arrays, seed))
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True)).to(infection.device)

    def stats(self) -> dict[str, Any]:
        return self._call(lambda h: h.stats.remote())

    def reset_stats(self) -> None:
        self._call(lambda h: h.reset_stats.remote())


class ActorPool:
    """Several synthesis actors behind one `SynthesisClient`, for drawing many batches at once.

    ``synthesize_many`` sends every request to the actors round-robin, all in flight together, so
    N actors decode N batches in parallel (and each actor batches what it receives); SA-ST's
    offline set (``training.self_training.make_offline_set``) uses it. ``backend`` and
    ``bundle_sha256`` are those of the first actor (all serve one bundle).
    """

    def __init__(self, actors: list, name: str = ACTOR_NAME, namespace: str = NAMESPACE,
                 retries: int = RayConfig.synth_retries) -> None:
        if not actors:
            raise ValueError("ActorPool: no synthesis actors given")
        self.actors = list(actors)
        self.client = ActorSynthesisClient(name, namespace, retries=retries)
        self.backend, self.bundle_sha256 = self.client.backend, self.client.bundle_sha256

    def synthesize(self, infection, lung, images=None, seed=None):
        return self.client.synthesize(infection, lung, images, seed)

    def synthesize_many(self, requests: list[dict[str, Any]]) -> list[Any]:
        """``synthesize(**request)`` for every request, spread over the actors; results in order."""
        import ray
        import torch

        refs = [self.actors[turn % len(self.actors)].synthesize.remote(
                    *_request_arrays(r["infection"], r["lung"], r.get("images")), r.get("seed"))
                for turn, r in enumerate(requests)]
        return [torch.from_numpy(np.asarray(out, dtype=np.float32)).to(r["infection"].device)
                for out, r in zip(ray.get(refs), requests)]

    def stats(self) -> dict[str, Any]:
        return self.client.stats()


def connect_service(cfg: Any, seed: int | None = None, name: str = ACTOR_NAME) -> ActorSynthesisClient:
    """The client of the running synthesis actor for ``cfg`` (``synth.backend: service``).

    The actor must have been started by the driver (``start_synthesis_actors``; the
    ``train_sa_cps`` / ``train_sa_st`` entry points do it); ``seed`` is unused here because
    every request carries its own seed.
    """
    del seed
    return ActorSynthesisClient(name, retries=cfg.ray.synth_retries)
