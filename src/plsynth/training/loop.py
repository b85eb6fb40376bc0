"""The one training loop of every segmentation method (nanoGPT order, style-examples 6.7).

    _setup: seed, data splits, networks (+ peer), optimizers, synthesizer or offline set;
            _resume from out/last.pt when it exists (and the config matches)
    for step in range(start, total):
        _step:       lr = poly_lr(step, total)            # pure function, per iteration
                     batch = make_batch(step)             # data order + augmentation: pure functions of (seed, step)
                     loss = step_fn(nets, batch, ...)     # methods.py: the method's loss
                     backward, SGD step on every network, log.csv row
        _after_step: every train.val_every_iters validate (DSC, NSD; val.csv, curves.png), best.pt;
                     last.pt every train.checkpoint_every and at each epoch's end (then report)
    then (train): write DIR/bundle from best.pt (or last.pt) with bundles.segmenter.write_bundle

Under Ray Train only the hooks differ (`TrainHooks`: device, prepare_model, report, is_main,
broadcast). Data parallel: each of N workers takes its 1/N share of every global batch
(`BatchMaker`), the loss is that of the global batch (`losses.global_batch`) and DDP averages
the gradients, so N workers run the single-process optimisation (same batch, same LR schedule,
same parameters within float tolerance) doing 1/N of the work each. Rank 0 reads the checkpoint
and broadcasts it, so a run started with N workers resumes with any M.

Every random choice of a step (batch order, flips, angles, the synthesizer's pool draw and
noise) is derived from (seed, step) through the named streams of `schedule.Stream`, and the
global RNG states are checkpointed too, so a run killed after step t and resumed from its last
checkpoint reproduces the losses of a run that was never interrupted (same machine, same thread
count).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plsynth.config import Config, ConfigError
from plsynth.data.preprocess import FieldOfView, crop_at
from plsynth.torch_setup import flush_denormals
from plsynth.training import checkpoint as ckpt
from plsynth.training.augment import apply_transforms, random_transforms
from plsynth.training.losses import global_batch
from plsynth.training.methods import method_switches, network_names, step_function
from plsynth.training.run_log import RunLog, plot_curves
from plsynth.training.schedule import BatchPlan, Stream, poly_lr, step_seed, total_iterations, validates_after

logger = logging.getLogger(__name__)


class TrainHooks:
    """What differs between a local run and a Ray Train worker. The default is a plain local run.

    ``device``: None follows ``train.device`` (`select_device`); Ray sets the worker's device.
    ``prepare_model`` wraps a network for the worker (Ray: ``ray.train.torch.prepare_model``);
    ``report`` receives each validation's metrics and the checkpoint just written
    (Ray: ``ray.train.report``); only the main worker (``is_main``) writes files.
    ``broadcast`` hands rank 0's object to every worker (resume state, barriers).
    ``after_step`` is called after every optimizer step (progress bars, tests).
    """

    is_main: bool = True
    rank: int = 0
    world_size: int = 1

    def __init__(self, device: str | None = None) -> None:
        self.device = device

    def prepare_model(self, net: torch.nn.Module) -> torch.nn.Module:
        return net

    def broadcast(self, obj: Any) -> Any:
        return obj

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        pass

    def after_step(self, step: int, terms: dict[str, float]) -> None:
        pass


@dataclass
class TrainResult:
    bundle: Path | None
    steps: int
    best: dict[str, Any]
    last_val: dict[str, Any] = field(default_factory=dict)
    start: int = 0  # the step this call resumed at (0: from scratch)
    samples: dict[str, int] = field(default_factory=dict)  # slices this worker trained on in this call
    train_s: float = 0.0  # seconds this worker spent in optimizer steps (without validation)
    train_cpu_s: float = 0.0  # CPU seconds of this process in those steps (the work it did, whatever the contention)


def select_device(requested: str = "auto") -> str:
    """``train.device``: ``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` without one is a usage error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    return requested


def amp_dtype(amp: str, device: str) -> torch.dtype | None:
    """``train.amp`` on ``device``: the autocast dtype, or None for full float32.

    AMP runs on CUDA only: ``auto`` is bfloat16 where the GPU supports it (Ampere and later),
    else float16 (with a gradient scaler); on the CPU every setting means float32.
    """
    if amp == "off" or not str(device).startswith("cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _stack(items: list[dict], key: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([torch.as_tensor(np.asarray(it[key])) for it in items]).to(dtype)


def build_networks(cfg: Config) -> dict[str, torch.nn.Module]:
    """The method's U-Nets, each initialised from its own seed (CPS: different initialisations)."""
    from plsynth.models.unet import UNet

    nets = {}
    for k, name in enumerate(network_names(cfg.train.method)):
        torch.manual_seed(step_seed(cfg.train.seed, k, Stream.NETWORK_INIT))
        nets[name] = UNet(cfg.model)
    return nets


def make_optimizer(net: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


class BatchMaker:
    """Collates and augments this worker's share of the batch of one step (no DataLoader: order is ours).

    Data parallel: worker ``rank`` of ``world_size`` takes its contiguous 1/N share of the plan's
    labeled and unlabeled batch (`np.array_split`), and the flips and angles are drawn for the
    whole global batch first, so the workers together build exactly the single-process batch.
    ``seen`` counts the slices this worker loaded.
    """

    def __init__(self, cfg: Config, labeled: Any, unlabeled: Any | None, plan: BatchPlan, device: str,
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.labeled, self.unlabeled, self.plan, self.device = cfg, labeled, unlabeled, plan, device
        self.rank, self.world_size = rank, world_size
        self.seen = {"labeled": 0, "unlabeled": 0}
        smallest = min(plan.batch_labeled, plan.smallest_unlabeled_batch if unlabeled is not None else plan.batch_labeled)
        if smallest < world_size:
            raise ConfigError(
                f"{world_size} data-parallel workers need at least {world_size} slices in every batch, but a batch "
                f"of this run holds {smallest} (train.batch_labeled {plan.batch_labeled}, train.batch_unlabeled "
                f"{plan.batch_unlabeled}, {plan.n_unlabeled} unlabeled slices); use fewer ray.num_workers or "
                "larger batches")

    def _share(self, n: int) -> np.ndarray:
        return np.array_split(np.arange(n), self.world_size)[self.rank]

    def _augment(self, image, lung, label, rows: np.ndarray, n: int, g: torch.Generator, transforms: list | None = None):
        """This worker's rows of the global batch's transforms (``transforms`` receives them)."""
        t = self.cfg.train
        if not t.flip and t.rotate_degrees == 0.0:
            return image, lung, label
        theta, hflip = random_transforms(n, g, t.flip, t.rotate_degrees)
        if transforms is not None:
            transforms.append((theta[rows], hflip[rows]))
        return apply_transforms(theta[rows], hflip[rows], image, lung, label)

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        t = self.cfg.train
        g = torch.Generator().manual_seed(step_seed(t.seed, step, Stream.AUGMENT))
        indices = self.plan.labeled(step)
        rows = self._share(len(indices))
        items = [self.labeled[int(i)] for i in indices[rows]]
        self.seen["labeled"] += len(items)
        image, lung, label = self._augment(
            _stack(items, "image", torch.float32),
            _stack(items, "lung", torch.long),
            _stack(items, "label", torch.float32),
            rows, len(indices), g,
        )
        batch = {"image": image, "lung": lung, "label": label}
        if self.unlabeled is not None:
            indices = self.plan.unlabeled(step)
            rows = self._share(len(indices))
            items = [self.unlabeled[int(i)] for i in indices[rows]]
            self.seen["unlabeled"] += len(items)
            images = [_stack(items, "image", torch.float32)]
            has_synthetic = "synthetic" in items[0]
            if has_synthetic:
                images.append(_stack(items, "synthetic", torch.float32))
            pseudo = _stack(items, "pseudo", torch.float32) if "pseudo" in items[0] else None
            transforms: list = []
            # A real slice and its synthetic twin share their pseudo-label, lung and transform.
            moved, u_lung, u_pseudo = self._augment(
                torch.cat(images, dim=1),
                _stack(items, "lung", torch.long),
                pseudo,
                rows, len(indices), g, transforms,
            )
            batch.update(u_image=moved[:, :1], u_lung=u_lung)
            if transforms:  # SA-CPS synthesizes in the slice's own frame, then applies this transform
                batch.update(u_theta=transforms[0][0], u_hflip=transforms[0][1])
            if has_synthetic:
                batch["u_synthetic"] = moved[:, 1:2]
            if u_pseudo is not None:
                batch["u_pseudo"] = u_pseudo
        if self.cfg.data.lung_box is not None:
            batch = cut_to_lung_boxes(batch, FieldOfView.of(self.cfg))
        return {k: v.to(self.device) for k, v in batch.items()}


LABELED_KEYS, UNLABELED_KEYS = ("image", "lung", "label"), ("u_image", "u_lung", "u_pseudo", "u_synthetic")


def cut_to_lung_boxes(batch: dict[str, torch.Tensor], view: FieldOfView) -> dict[str, torch.Tensor]:
    """``data.lung_box``: a step's slices cut to their (augmented) lung boxes, one size for the step.

    Labeled and unlabeled slices share one forward pass, so they share one crop size
    (`box_corners`). SA-CPS draws its synthetic images in whole
    frames (the synthesizer's), so the unlabeled frames stay in the batch (``u_frame``,
    ``u_frame_lung``) with their boxes' corners (``u_corners``).
    """
    lungs = torch.cat([batch["lung"], batch["u_lung"]]) if "u_lung" in batch else batch["lung"]
    corners, h, w = view.batch_corners(lungs.numpy())
    n = batch["lung"].shape[0]
    out = dict(batch)
    out.update({k: crop_at(batch[k], corners[:n], h, w) for k in LABELED_KEYS})
    out.update({k: crop_at(batch[k], corners[n:], h, w) for k in UNLABELED_KEYS if k in batch})
    if "u_image" in batch:
        out.update(u_frame=batch["u_image"], u_frame_lung=batch["u_lung"], u_corners=torch.from_numpy(corners[n:]))
    return out


class _Progress:
    """rich progress bar on a terminal; a log line every ~5 % of the run otherwise."""

    def __init__(self, total: int, start: int, description: str) -> None:
        self.total, self.every = total, max(1, total // 20)
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=start, info="")

    def update(self, done: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
        elif done % self.every == 0 or done == self.total:
            logger.info("step %d/%d %s", done, self.total, info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _state(nets, optimizers, step, epoch, best, plan, cfg, val, scaler=None) -> dict[str, Any]:
    return {
        "networks": {k: {n: t.detach().cpu().clone() for n, t in ckpt.unwrap(v).state_dict().items()} for k, v in nets.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "step": step,
        "epoch": epoch,
        "best": dict(best),
        "val": {k: v for k, v in val.items() if k != "per_case"} if val else {},
        "rng": ckpt.rng_state(),
        "plan": plan.__dict__.copy(),
        "config": cfg.to_dict(),
        "method": cfg.train.method,
        "scaler": scaler.state_dict() if scaler is not None else {},
    }


def _unlabeled_source(cfg: Config, data: Any, out: Path, synth: Any, teacher: Any, device: str,
                      hooks: TrainHooks) -> tuple[Any, dict]:
    """What the unlabeled half of each batch reads: raw slices, or (ST / SA-ST) the offline set.

    Rank 0 makes the offline set first; the other workers wait for it, then reuse its shards.
    """
    method = cfg.train.method
    if method == "baseline":
        return None, {}
    if method in ("cps", "sa-cps"):
        return data.unlabeled, {}
    from plsynth.training.self_training import load_teacher, make_offline_set

    if teacher is None:
        if not cfg.train.teacher:
            raise ValueError(f"{cfg.source or 'config'}: train.teacher is empty; {method} needs a teacher bundle or checkpoint")
        teacher, fingerprint, view = load_teacher(cfg.train.teacher, device)
    else:  # a network handed in (tests): it runs as this run's own networks do
        fingerprint, view = {"teacher": {"module": type(teacher).__name__}}, FieldOfView.of(cfg)
    def offline_set():
        return make_offline_set(teacher, data.unlabeled, synth, out / "offline", cfg.train, fingerprint=fingerprint,
                                view=view)

    offline = offline_set() if hooks.is_main else None
    hooks.broadcast(None)  # a barrier: rank 0 has written the set
    if offline is None:
        offline = offline_set()  # the other workers reuse its shards
    info = dict(fingerprint)
    info["offline"] = {"folder": str(out / "offline"),
                       "pseudo_positive_fraction": offline.manifest.get("pseudo_positive_fraction")}
    if offline.has_synthetic:
        # What actually drew the stored images (a local decoder or the Ray actors).
        info["offline"]["synthesizer"] = offline.manifest["key"]["synthesizer"]
    return offline, info


@dataclass
class _Run:
    """One run's state between steps: what `_setup` builds, `_step` and `_after_step` advance."""

    cfg: Config
    out: Path
    hooks: TrainHooks
    data: Any
    synth: Any
    teacher_info: dict
    device: str
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    nets: dict[str, torch.nn.Module]  # unwrapped: what checkpoints hold
    prepared: dict[str, torch.nn.Module]  # what the step runs (DDP-wrapped under Ray; compiled with train.compile)
    optimizers: dict[str, torch.optim.Optimizer]
    plan: BatchPlan
    total: int
    start: int
    best: dict[str, Any]
    last_val: dict[str, Any]
    step_fn: Any = None  # methods.step_function: the method's loss
    make_batch: BatchMaker | None = None
    log: RunLog | None = None
    progress: _Progress | None = None
    train_s: float = 0.0
    train_cpu_s: float = 0.0
    eager: dict[str, torch.nn.Module] = field(default_factory=dict)  # prepared, never compiled: the fallback

    def state(self, step: int, epoch: int) -> dict[str, Any]:
        return _state(self.nets, self.optimizers, step, epoch, self.best, self.plan, self.cfg, self.last_val,
                      self.scaler)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.progress is not None:
            self.progress.close()


def train(
    cfg: Config,
    out: Path,
    hooks: TrainHooks | None = None,
    *,
    data: Any = None,
    synth: Any = None,
    teacher: torch.nn.Module | None = None,
    write_bundle: bool = True,
) -> TrainResult:
    """Train ``cfg.train.method`` in ``out`` (resuming from ``out/last.pt``) and write ``out/bundle``.

    data: a `DataSplits` (labeled, unlabeled, val); default ``build_splits(cfg, out)``.
    synth: a `SynthesisClient` for sa-cps / sa-st; default `make_synthesis_client(cfg)`.
    teacher: the ST / SA-ST teacher network; default loaded from ``cfg.train.teacher``.
    """
    run = _setup(cfg, Path(out), hooks or TrainHooks(), data, synth, teacher)
    try:
        for step in range(run.start, run.total):
            loss, terms = _step(run, step)
            _after_step(run, step, loss, terms)
    finally:
        run.close()
    bundle = None
    if write_bundle and run.hooks.is_main:
        bundle = _write_run_bundle(cfg, run.out, run.synth, run.teacher_info, run.total)
    return TrainResult(bundle=bundle, steps=run.total, best=run.best, last_val=run.last_val, start=run.start,
                       samples=dict(run.make_batch.seen), train_s=run.train_s, train_cpu_s=run.train_cpu_s)


def _setup(cfg: Config, out: Path, hooks: TrainHooks, data: Any, synth: Any, teacher: Any) -> _Run:
    """Seeds, data, synthesizer, networks and optimizers, resumed from ``out/last.pt`` when it exists."""
    flush_denormals()
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if torch.cuda.is_available():
        # Reproducible resumes need deterministic kernels (the official code sets the same flags).
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    torch.manual_seed(t.seed)
    if data is None:
        from plsynth.data.datasets import build_splits

        data = build_splits(cfg, out)
    if len(data.labeled) == 0:
        raise ValueError(f"{cfg.source or 'config'}: no labeled training slices; every method needs some")
    use_pseudo, use_synthetic = method_switches(t)
    if t.method in ("sa-cps", "sa-st") and not (use_pseudo or use_synthetic):
        logger.warning("%s with use_pseudo and use_synthetic both off trains on labeled slices only", t.method)
    if use_synthetic and synth is None:
        from plsynth.training.methods import make_synthesis_client

        synth = make_synthesis_client(cfg)
    if t.method != "baseline" and len(data.unlabeled) == 0:
        raise ValueError(f"{cfg.source or 'config'}: {t.method} needs unlabeled slices; the unlabeled set is empty")
    device = hooks.device or select_device(t.device)
    amp = amp_dtype(t.amp, device)
    unlabeled, teacher_info = _unlabeled_source(cfg, data, out, synth if t.method == "sa-st" else None, teacher,
                                                device, hooks)
    nets = {k: v.to(device) for k, v in build_networks(cfg).items()}
    plan = BatchPlan(len(data.labeled), len(data.unlabeled), t.batch_labeled, t.batch_unlabeled, t.seed)
    run = _Run(cfg=cfg, out=out, hooks=hooks, data=data, synth=synth, teacher_info=teacher_info, device=device,
               amp=amp, scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None, nets=nets,
               prepared={}, optimizers={k: make_optimizer(v, cfg) for k, v in nets.items()}, plan=plan,
               total=total_iterations(t.epochs, plan.iters_per_epoch, t.max_iters), start=0,
               best={"dice": -1.0, "step": -1}, last_val={})
    _resume(run)
    run.prepared = run.eager = {k: hooks.prepare_model(v) for k, v in nets.items()}
    if t.compile:  # only what the step runs; validation and checkpoints use the plain networks
        run.prepared = {k: torch.compile(v) for k, v in run.eager.items()}
    run.step_fn = step_function(t)
    run.make_batch = BatchMaker(cfg, data.labeled, unlabeled, plan, device, rank=hooks.rank,
                                world_size=hooks.world_size)
    if hooks.is_main:
        run.log, run.progress = RunLog(out, run.start), _Progress(run.total, run.start, t.method)
    logger.info(
        "%s: %d labeled, %d unlabeled slices, %d val cases; %d iterations (%d per epoch), batch %d+%d on %s%s%s",
        t.method, len(data.labeled), len(data.unlabeled), len(data.val), run.total, plan.iters_per_epoch,
        t.batch_labeled, t.batch_unlabeled, device, f", AMP {amp}" if amp else "",
        f", worker {hooks.rank} of {hooks.world_size} (1/{hooks.world_size} of each batch)" if hooks.world_size > 1 else "",
    )
    return run


def _resume(run: _Run) -> None:
    """Load ``out/last.pt`` into the run. Rank 0 reads it and hands it to every worker, so all
    resume at one step whatever the number of workers was."""
    path = run.out / "last.pt"
    state = run.hooks.broadcast(ckpt.load_checkpoint(path) if run.hooks.is_main and path.is_file() else None)
    if state is None:
        return
    diffs = ckpt.config_differences(state["config"], run.cfg.to_dict())
    if diffs:
        raise ValueError(f"{path}: this run folder was started with another config ({'; '.join(diffs[:5])}); "
                         "use a new --out folder or the original config")
    for k, net in run.nets.items():
        net.load_state_dict(state["networks"][k])
    for k, opt in run.optimizers.items():
        opt.load_state_dict(state["optimizers"][k])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.start, run.best, run.last_val = state["step"], state["best"], state.get("val", {})
    ckpt.set_rng_state(state["rng"])
    logger.info("resuming %s from %s at step %d/%d", run.cfg.train.method, path, run.start, run.total)


def _step(run: _Run, step: int) -> tuple[float, dict[str, float]]:
    """One optimizer step of every network on the batch of ``step``; returns its loss and terms."""
    t, optimizers = run.cfg.train, run.optimizers.values()
    tic, cpu_tic = time.perf_counter(), time.process_time()
    lr = poly_lr(step, run.total, run.cfg.optim.lr, run.cfg.optim.poly_power)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    for net in run.prepared.values():
        net.train()
    batch = run.make_batch(step)
    with torch.autocast(device_type=torch.device(run.device).type, dtype=run.amp, enabled=run.amp is not None), \
            global_batch(run.hooks.world_size > 1):
        seed = step_seed(t.seed, step, Stream.SYNTHESIS)
        try:
            result = run.step_fn(run.prepared, batch, t, run.synth, seed)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. a container without a C++ compiler
            if run.prepared is run.eager:
                raise
            reason = str(exc).strip().splitlines()[0]
            logger.warning("train.compile: torch.compile failed (%s); training on with the uncompiled networks", reason)
            run.prepared = run.eager  # the failed call compiled nothing and stepped nothing: redo it eagerly
            result = run.step_fn(run.prepared, batch, t, run.synth, seed)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if run.scaler is None:
        result.loss.backward()
        for opt in optimizers:
            opt.step()
    else:  # float16 AMP: scaled gradients, steps skipped on overflow
        run.scaler.scale(result.loss).backward()
        for opt in optimizers:
            run.scaler.step(opt)
        run.scaler.update()
    seconds = time.perf_counter() - tic
    run.train_s += seconds
    run.train_cpu_s += time.process_time() - cpu_tic
    loss = float(result.loss.detach())
    if not math.isfinite(loss):
        raise FloatingPointError(f"{t.method}: loss is {loss} at step {step}; lower optim.lr or check the data")
    if run.log is not None:
        run.log.train({"step": step, "epoch": run.plan.epoch_of(step), "lr": lr, "loss": loss, **result.terms,
                       "seconds": round(seconds, 4)})
        run.progress.update(step + 1, f"loss {loss:.4f}")
    return loss, result.terms


def _after_step(run: _Run, step: int, loss: float, terms: dict[str, float]) -> None:
    """Validate every ``train.val_every_iters``; save last.pt every ``train.checkpoint_every`` and at
    each epoch's end, when the hooks also report; best.pt when validation Dice improves."""
    t, hooks = run.cfg.train, run.hooks
    hooks.after_step(step, {"loss": loss, **terms})
    done, epoch = step + 1, run.plan.epoch_of(step)
    end_of_epoch = done % run.plan.iters_per_epoch == 0 or done == run.total
    validating = validates_after(done, run.total, run.plan.iters_per_epoch, t.val_every_iters)
    if validating and len(run.data.val) and hooks.is_main:
        from plsynth.training.evaluate import validate

        run.last_val = validate(ckpt.unwrap(run.nets["model"]), run.data.val, t.tolerance_mm, t.tau,
                                view=FieldOfView.of(run.cfg))
        run.last_val.update(step=done, epoch=epoch + 1)
        logger.info("%s epoch %d (step %d): val dice %.4f nsd %.4f over %d cases", t.method, epoch + 1, done,
                    run.last_val["dice"], run.last_val["nsd"], run.last_val["cases"])
        if run.log is not None:
            run.log.val({"step": done, "epoch": epoch + 1, **run.last_val})
        if run.last_val["dice"] > run.best["dice"]:
            run.best = {"dice": run.last_val["dice"], "nsd": run.last_val["nsd"], "step": done}
            ckpt.save_checkpoint(run.out / "best.pt", run.state(done, epoch + 1))
    if end_of_epoch or (t.checkpoint_every and done % t.checkpoint_every == 0):
        if hooks.is_main:
            ckpt.save_checkpoint(run.out / "last.pt", run.state(done, epoch + (1 if end_of_epoch else 0)))
        if end_of_epoch:
            hooks.report({"step": done, "epoch": epoch + 1, "loss": loss,
                          **{k: v for k, v in run.last_val.items() if k != "per_case"}}, run.out / "last.pt")
            if run.log is not None:
                run.log.flush()
    if validating and run.log is not None:
        plot_curves(run.out, f"{run.cfg.name}: {t.method}")


def _write_run_bundle(cfg: Config, out: Path, synth: Any, teacher_info: dict, total: int) -> Path:
    """Write ``out/bundle`` from best.pt (``train.bundle_from: best``, when validation ran) or last.pt."""
    from plsynth.bundles.segmenter import write_bundle
    from plsynth.models.unet import unets_from_states

    source = out / "best.pt" if cfg.train.bundle_from == "best" and (out / "best.pt").is_file() else out / "last.pt"
    state = ckpt.load_checkpoint(source)
    nets = unets_from_states(cfg.model, state["networks"])
    metrics = {
        "val_dice": state["val"].get("dice"),
        "val_nsd": state["val"].get("nsd"),
        "val_cases": state["val"].get("cases"),
        "step": state["step"],
        "epoch": state["epoch"],
        "total_steps": total,
        "selected": source.stem,
        "best": state["best"],
        "nsd_tolerance": cfg.train.tolerance_mm,
    }
    use_pseudo, use_synthetic = method_switches(cfg.train)
    extra: dict[str, Any] = {
        "training": {"seed": cfg.train.seed, "use_pseudo": use_pseudo, "use_synthetic": use_synthetic,
                     "checkpoint": source.name},
        **teacher_info,
    }
    used = teacher_info.get("offline", {}).get("synthesizer")
    if use_synthetic and used is not None:  # sa-st: the decoder that drew the offline set
        extra["synthesizer"] = {"bundle": cfg.synth.bundle, **used}
    elif use_synthetic and synth is not None:  # sa-cps: the client used at every step
        extra["synthesizer"] = {"bundle": cfg.synth.bundle, "sha256": synth.bundle_sha256, "backend": synth.backend}
    return write_bundle(out / "bundle", nets, cfg, metrics, extra)
