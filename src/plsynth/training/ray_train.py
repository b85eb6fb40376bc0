"""Run the one training loop under Ray Train (TorchTrainer, DDP across workers).

The loop (`plsynth.training.loop.train`) is the same as in a local run; only its hooks
differ (:class:`RayTrainHooks`): networks go through ``ray.train.torch.prepare_model`` (DDP,
gloo on CPU, NCCL on GPU), every validation's metrics and the ``last.pt`` just written are
reported with ``ray.train.report`` (rank 0 attaches the checkpoint, every rank calls it the
same number of times, as Ray requires), only rank 0 writes files, and ``broadcast`` hands rank
0's objects (the resume state) to every rank. Each worker trains on its 1/N share of every
global batch (see the loop); what each one did is appended to ``<out>/ray_work.jsonl``
(rank, step it started at, slices seen, seconds in optimizer steps), which is how tests and benchmarks see the split.

Checkpoints are persisted by Ray Train under ``ray.storage_path`` (default ``<out>/ray``; use
shared storage on a multi-node cluster). ``FailureConfig(max_failures=ray.max_failures)``
restarts a failed worker group; rank 0 then copies ``last.pt`` out of
``ray.train.get_checkpoint()`` into the run folder before calling the loop, which reads it and
broadcasts it, so every rank resumes at the checkpoint's step (the step counter continues, it
does not restart at 0), with as many workers as this run has (not necessarily the first run's).
Each worker start is logged to ``<out>/ray_attempts.jsonl`` (rank, resume step), which is
how the tests see a resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from plsynth.config import Config, config_from_dict

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"


class RayTrainHooks:
    """`plsynth.training.loop.TrainHooks` for a Ray Train worker (same attributes and methods)."""

    def __init__(self, fail_after_reports: int = 0, fail_marker: str = "") -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.is_main = self.rank == 0
        self.device = str(ray.train.torch.get_device())
        self.reports = 0
        # Test-only fault injection: after this many reports, the rank-0 process exits hard
        # once (marker file), as a crashed worker would.
        self._fail_after, self._fail_marker = fail_after_reports, fail_marker

    def prepare_model(self, net):
        import ray.train.torch

        if self.world_size == 1:
            return net.to(self.device)
        return ray.train.torch.prepare_model(net)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        if self.is_main and checkpoint is not None and Path(checkpoint).is_file():
            with tempfile.TemporaryDirectory(prefix="plsynth-ckpt-") as tmp:
                shutil.copy2(checkpoint, Path(tmp) / CHECKPOINT_FILE)
                (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, default=str))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        self.reports += 1
        if self._fail_after and self.reports >= self._fail_after and self.is_main and self._fail_marker \
                and not Path(self._fail_marker).exists():
            Path(self._fail_marker).write_text(str(os.getpid()))
            time.sleep(3.0)  # let the controller register the reported checkpoint first
            log.warning("fault injection: worker rank %d exits after report %d", self.rank, self.reports)
            os._exit(17)

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def after_step(self, step: int, terms: dict[str, float]) -> None:
        pass


def restore_from_ray_checkpoint(out: Path) -> int:
    """Copy ``last.pt`` from Ray Train's latest checkpoint into ``out`` when it is newer; return its step (0: none)."""
    import ray.train

    from plsynth.atomic import atomic_write
    from plsynth.training.checkpoint import load_checkpoint

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        source = Path(folder) / CHECKPOINT_FILE
        if not source.is_file():
            return 0
        step = int(load_checkpoint(source).get("step", 0))  # weights_only=True: no code runs from a file
        target = Path(out) / CHECKPOINT_FILE
        current = int(load_checkpoint(target).get("step", -1)) if target.is_file() else -1
        if step > current:
            with atomic_write(target) as tmp:
                shutil.copy2(source, tmp)
    return step


def _worker_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: rebuild the config, restore, call the training loop."""
    import ray.train
    import torch

    from plsynth.torch_setup import flush_denormals

    flush_denormals()  # before this worker's first parallel op creates its thread pool
    cfg = config_from_dict(config["cfg"], where=config["cfg"].get("source") or "<ray>")
    out = Path(config["out"])
    hooks = RayTrainHooks(config.get("fail_after_reports", 0), config.get("fail_marker", ""))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resume_step = restore_from_ray_checkpoint(out) if hooks.is_main else 0
    with open(out / "ray_attempts.jsonl", "a") as fh:
        fh.write(json.dumps({"rank": hooks.rank, "world_size": hooks.world_size, "resume_step": resume_step,
                             "pid": os.getpid(), "time": time.time()}) + "\n")
    loop_fn = config.get("loop_fn")
    if loop_fn is None:
        from plsynth.training.loop import train

        loop_fn = train
    synth = config.get("synth")
    kwargs = {"synth": synth} if synth is not None else {}
    result = loop_fn(cfg, out, hooks, **kwargs)
    if getattr(result, "samples", None) is not None:
        with open(out / "ray_work.jsonl", "a") as fh:
            fh.write(json.dumps({"rank": hooks.rank, "world_size": hooks.world_size, "start_step": result.start,
                                 "samples": result.samples, "train_s": result.train_s, "train_cpu_s": result.train_cpu_s,
                                 "steps": result.steps,
                                 "time": time.time()}) + "\n")
    if hooks.is_main and getattr(result, "bundle", None) is not None:
        log.info("rank 0 wrote %s", result.bundle)
    del ray  # (imported for its side effect: the worker's train context)


def synthesizer_worker(cfg: Config, out: Path, hooks: RayTrainHooks) -> None:
    """``loop_fn`` that trains the synthesizer (one worker, on the device Ray gave it) into ``out``."""
    from plsynth.training.synthesizer import train_synthesizer

    if hooks.world_size != 1:
        raise ValueError("the synthesizer trains on one Ray Train worker (ray.num_workers=1)")
    train_synthesizer(cfg, out, device=hooks.device)


def use_gpus(cfg: Config) -> bool:
    """Whether Ray Train workers get a GPU each: ``train.device`` cuda, or auto with ``ray.use_gpu``
    or a cluster that has GPUs; never for ``train.device: cpu``."""
    device = cfg.train.device
    if device != "auto":
        return device == "cuda"
    if cfg.ray.use_gpu:
        return True
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1


def make_trainer(cfg: Config, out: Path, *, synth: Any = None, loop_fn: Callable | None = None,
                 fail_after_reports: int = 0, fail_marker: str = "", name: str | None = None):
    """Build the TorchTrainer for ``cfg`` writing into ``out`` (not started).

    synth: a picklable SynthesisClient (the actor client) handed to every worker.
    loop_fn: ``(cfg, out, hooks, **kw) -> result`` (default ``train``; the synthesizer passes its own).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    r = cfg.ray
    storage = Path(r.storage_path).resolve() if r.storage_path else out / "ray"
    use_gpu = use_gpus(cfg)
    resources = {"CPU": r.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1.0
    scaling = ScalingConfig(num_workers=max(1, r.num_workers), use_gpu=use_gpu, resources_per_worker=resources,
                            placement_strategy="PACK")
    run_config = RunConfig(
        name=name or f"{cfg.name}-{cfg.train.method}",
        storage_path=str(storage),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=r.max_failures),
    )
    loop_config = {"cfg": cfg.to_dict(), "out": str(out), "synth": synth, "loop_fn": loop_fn,
                   "fail_after_reports": fail_after_reports, "fail_marker": fail_marker}
    return TorchTrainer(_worker_loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)


def train_on_ray(cfg: Config, out: Path, **kwargs: Any):
    """Run :func:`make_trainer`'s trainer to the end and return Ray's Result.

    Raises RuntimeError naming the run when training failed after ``ray.max_failures`` restarts.
    """
    trainer = make_trainer(cfg, out, **kwargs)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:
        raise RuntimeError(f"Ray Train run {cfg.name}/{cfg.train.method} in {out} failed: {exc}") from exc
    if getattr(result, "error", None):
        raise RuntimeError(f"Ray Train run {cfg.name}/{cfg.train.method} in {out} failed: {result.error}")
    log.info("Ray Train finished in %.1f s; checkpoint %s", time.perf_counter() - t0, result.checkpoint)
    return result
