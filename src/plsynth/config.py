"""The one configuration schema of plsynth, loaded from a preset (``plsynth/configs/*.yaml``) or any YAML file.

Every experiment is one YAML file whose top-level sections mirror the dataclasses below.
Unknown keys and bad values are errors that name the file and the dotted key; overrides
are dotted (``--set optim.lr=0.005``). The resolved config is stored in every checkpoint
and bundle, so a run can always be traced back to the numbers it used.

Paper defaults (Lyu et al., section IV-A.4) are the dataclass defaults unless a comment
says otherwise; CPU presets override sizes and budgets in their YAML files.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


PAPER_WINDOW_HU: tuple[float, float] = (-1250.0, 250.0)  # Lyu et al., section IV-A: HU clipped and mapped to [0, 1]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file and key."""


PHANTOM_MIN_SIDE = 8  # a phantom needs this many voxels per axis to hold two lungs and a lesion


@dataclass(frozen=True)
class DataConfig:
    """Where slices come from and how they are prepared.

    layout: ``phantom`` (generated into ``<out>/data`` with ``phantom_n``/``phantom_seed``),
    ``covid19-20`` (``*_ct.nii.gz`` + ``*_seg.nii.gz``), ``mosmed`` (studies + masks),
    ``semiseg`` (COVID-SemiSeg 8-bit slices) or ``folder`` (plain folder of volumes, unlabeled).
    """

    layout: Literal["phantom", "covid19-20", "mosmed", "semiseg", "folder"] = "phantom"
    root: str = ""  # dataset root; "": $PLSYNTH_DATA/<dataset> (data/layouts.py), phantoms: under the run folder
    unlabeled_root: str = ""  # optional separate root of unlabeled volumes/slices
    splits_dir: str = ""  # split files: a set shipped with plsynth (covid19-20, mosmeddata) or a folder path
    labeled_split: str = ""  # file in splits_dir with rows `volume,slice` (labeled training slices)
    unlabeled_split: str = ""  # same, unlabeled training slices
    val_split: str = ""  # file in splits_dir with rows `volume` (validation volumes)
    val_fraction: float = 0.2  # share of labeled volumes (or slices, for semiseg) held out when no val_split
    labeled_fraction: float = 0.3  # share of training volumes kept labeled when the layout has no split files
    split_seed: int = 0  # seeded splits use this, not train.seed, so runs with several seeds share one split
    test_split: str = ""  # file in splits_dir with rows `volume` (test volumes, scored by `plsynth eval --split test`)
    image_size: int = 512  # slices are resized to image_size x image_size (paper: 512)
    window_hu: tuple[float, float] = PAPER_WINDOW_HU
    lung_backend: Literal["classical", "lungmask"] = "classical"
    lungmask_model: Literal["R231", "R231CovidWeb"] = "R231"
    lungmask_weights: str = ""  # local .pth; "" looks in the torch hub cache
    lung_handling: Literal["none", "mask"] = "none"  # "mask": zero the input outside the lung
    # margin (model pixels) of each slice's lung-field box: training, validation and plsynth-infer run the
    # network on that box instead of the whole frame (fewer pixels; data/preprocess.lung_boxes); None: whole frame
    lung_box: int | None = None
    # 8-bit slices: "window" divides by 255; "calibrate" re-windows each slice from its aerated lung and
    # soft tissue (data/window.calibrate_slices), for slices exported with different windows. HU: no effect.
    intensity: Literal["window", "calibrate"] = "window"
    skip_slices_without_lung: bool = True  # as the paper's split files do
    cache_dir: str = ""  # preprocessed slice cache; "" means <out>/cache
    phantom_n: int = 8  # phantom layout: number of volumes
    phantom_seed: int = 0
    phantom_shape: tuple[int, int, int] = (24, 128, 128)  # (slices, rows, columns) per phantom volume

    def __post_init__(self) -> None:
        if len(self.phantom_shape) != 3 or min(self.phantom_shape) < PHANTOM_MIN_SIDE:
            raise ValueError(f"phantom_shape must be 3 sides of at least {PHANTOM_MIN_SIDE}, got {self.phantom_shape}")
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 and >= 16, got {self.image_size}")
        if not self.window_hu[0] < self.window_hu[1]:
            raise ValueError(f"window_hu must be (low, high) with low < high, got {self.window_hu}")
        if self.lung_box is not None and (isinstance(self.lung_box, bool) or not isinstance(self.lung_box, int)
                                          or self.lung_box < 0):
            raise ValueError(f"lung_box must be a margin in pixels >= 0, or null for the whole frame, got {self.lung_box!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.labeled_fraction <= 1.0:
            raise ValueError(f"labeled_fraction must be in (0, 1], got {self.labeled_fraction}")


@dataclass(frozen=True)
class UNetConfig:
    """The 2D U-Net segmenter (paper: a plain 2D U-Net)."""

    width: int = 32  # channels of the first level; doubled at each of `depth` levels
    depth: int = 4  # number of down-sampling steps; input size must be a multiple of 2**depth
    dropout: float = 0.0
    # "instance" (the authors' code and nnU-Net) normalises each slice alone, so labeled and
    # unlabeled slices in one forward pass do not share statistics and eval equals train;
    # "batch" is the original U-Net's BatchNorm.
    norm: Literal["instance", "batch"] = "instance"

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"model.width and model.depth must be >= 1, got {self.width}, {self.depth}")


@dataclass(frozen=True)
class SynthConfig:
    """SEAN synthesizer: networks, GAN training, style pool and how trainers reach it."""

    image_size: int = 512  # output size; the decoder starts at image_size / 2**num_up (SEAN: 512 / 2**5 = 16)
    width: int = 64  # ngf: channels of the last decoder block (SEAN: 64)
    style_dim: int = 512  # rows of the style matrix are this wide (paper: 512)
    num_up: int = 5  # x2 up-samplings in the decoder
    noise: bool = True  # learned per-channel noise injection
    # the noise weights' starting value (SEAN, StyleGAN: 0); a short schedule barely moves them,
    # so at the CPU preset this is the drawn texture's level (BENCHMARKS.md)
    noise_init: float = 0.0
    # the decoder's x2 up-sampling (SEAN: nearest); at the CPU preset "bilinear" takes the grid lines
    # out of the lung (BENCHMARKS.md)
    upsample: Literal["nearest", "bilinear"] = "nearest"
    epochs: int = 50
    batch_size: int = 4
    lr: float = 2e-4  # SEAN two time-scale: generator lr/2, discriminator lr*2 (TTUR)
    beta1: float = 0.0
    beta2: float = 0.9
    lambda_feat: float = 10.0  # discriminator feature matching
    lambda_vgg: float = 10.0  # only when vgg_weights points at a local file
    vgg_weights: str = ""
    num_d: int = 2  # scales of the multi-scale PatchGAN
    pool_k: int = 10  # style codes averaged per request (paper: K = 10)
    pool_mode: Literal["positive", "all", "self"] = "positive"  # N+, N, or the image's own style
    bundle: str = ""  # trained synthesizer bundle used by sa-cps / sa-st
    backend: Literal["torch", "ort", "service"] = "torch"  # how trainers call the decoder (TensorRT: ray.synth_backend)
    seed: int = 0
    norm_hidden: int = 0  # hidden width of SPADE/style branches in each ACE; 0 = min(128, 2 * width) (SEAN: 128)
    lambda_l1: float = 1.0  # pixel L1 of the reconstruction; not in SEAN, stands in for VGG on CPU presets (0 = off)
    grid_samples: int = 4  # rows of the per-epoch image grid
    # training augmentation, joint on image and map (BENCHMARKS.md, "Synthesizer on maps it never saw")
    flip: bool = True  # horizontal flips with the left/right lung labels swapped (never vertical)
    rotate_degrees: float = 10.0
    scale: float = 0.1  # zoom uniform in [1 - scale, 1 + scale]
    intensity: float = 0.1  # contrast and brightness jitter, each uniform in +-intensity
    # "patch": SEAN's multi-scale PatchGAN on (map, image) with feature matching; "oasis": a per-pixel
    # (4 + 1)-class segmentation discriminator with LabelMix (OASIS), label-aware where VGG is missing
    discriminator: Literal["patch", "oasis"] = "oasis"
    d_width: int = 0  # discriminator width; 0 = width
    lambda_labelmix: float = 10.0  # OASIS LabelMix consistency weight (oasis only)
    # a frozen segmenter bundle trained on the labeled slices only (e.g. the baseline): its loss
    # against the map's infection on the drawn image is added to the generator's (0 = off)
    segmenter: str = ""
    lambda_seg: float = 0.0
    # a 5th map class, vessel, thresholded from the slice itself (plsynth.data.vessels), so the
    # generator is told where the lung's vessels are instead of averaging them away
    vessels: bool = False
    # weight of the real infection's fine texture laid over the drawn infection (plsynth.models.texture):
    # the bundle then carries residual patches of its labeled slices' infection (0 = off)
    texture: float = 0.0

    def __post_init__(self) -> None:
        if self.num_up < 1 or self.image_size % 2**self.num_up:
            raise ValueError(f"synth.image_size must be a multiple of 2**num_up, got {self.image_size}, {self.num_up}")
        if self.image_size // 2**self.num_up < 2:
            raise ValueError(f"synth.image_size / 2**num_up must be >= 2, got {self.image_size}, {self.num_up}")
        if self.d_width < 0 or self.rotate_degrees < 0 or not 0 <= self.scale < 1 or not 0 <= self.intensity < 1:
            raise ValueError("synth.d_width / rotate_degrees must be >= 0, synth.scale and intensity in [0, 1)")
        for name in ("width", "style_dim", "epochs", "batch_size", "pool_k", "num_d"):
            if getattr(self, name) < 1:
                raise ValueError(f"synth.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.norm_hidden < 0 or min(self.noise_init, self.texture, self.lambda_l1, self.lambda_feat, self.lambda_vgg, self.lambda_seg) < 0:
            raise ValueError("synth.lr must be > 0 and synth.norm_hidden / noise_init / texture / lambda_* must be >= 0")
        if self.lambda_seg and not self.segmenter:
            raise ValueError("synth.lambda_seg > 0 needs synth.segmenter (a segmenter bundle trained on the labeled slices)")


@dataclass(frozen=True)
class OptimConfig:
    """SGD with poly decay, stepped per iteration (paper: lr 1e-2, momentum 0.9, power 0.9)."""

    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run of a segmentation method.

    An epoch is one pass over the unlabeled slices (baseline: over an equal number of
    labeled batches), so every method with the same `epochs` and batch sizes gets the same
    number of iterations and the same batch composition.
    """

    method: Literal["baseline", "cps", "sa-cps", "st", "sa-st"] = "baseline"
    epochs: int = 20  # paper: 20 (COVID-19-20), 10 (MosMedData)
    max_iters: int = 0  # > 0 caps the run at this many iterations (CPU presets, benchmarks)
    batch_labeled: int = 8
    batch_unlabeled: int = 8
    tau: float = 0.5  # pseudo-label threshold
    lam: float = 0.5  # SA-CPS weight of the unsupervised terms (lambda)
    mu: float = 0.5  # SA-ST weight of the pseudo/synthetic terms
    use_pseudo: bool = True  # Table II / III switches
    use_synthetic: bool = True
    teacher: str = ""  # st / sa-st: bundle of the teacher (baseline or sa-cps)
    flip: bool = True
    rotate_degrees: float = 15.0
    # Iterations between validations, each a point of val.csv / curves.png; 0 validates at the
    # end of every epoch. The last iteration always validates (the benchmark's final score).
    val_every_iters: int = 0
    tolerance_mm: float = 1.0  # NSD tolerance (1 pixel when there is no spacing)
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # torch.compile the networks of the step (inductor): 0.5-0.65x the step time at the CPU preset,
    # after a compilation of ~3 min on a loaded 2-core machine (BENCHMARKS.md), so it pays for long
    # runs only; checkpoints and bundles hold the plain networks either way.
    compile: bool = False
    pseudo_in_lung: bool = True  # zero pseudo-infection outside the lung mask (cps, sa-cps, st, sa-st)
    checkpoint_every: int = 0  # iterations between last.pt saves; 0 saves at the end of each epoch only
    bundle_from: Literal["best", "last"] = "best"  # which checkpoint becomes DIR/bundle ("last": benchmarks)
    offline_batch: int = 16  # st / sa-st: slices per teacher / synthesizer call when making the offline set
    # Where the segmenter trains: "auto" is CUDA when torch sees a GPU, else the CPU; "cuda"
    # without a GPU is an error. Under Ray Train a worker uses the device Ray gives it.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Mixed precision, CUDA only (the CPU always trains in float32): "auto" is bfloat16 where the
    # GPU supports it, else float16 with a gradient scaler; "off" keeps float32 on the GPU too.
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"train.tau must be in (0, 1), got {self.tau}")
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        for name in ("batch_labeled", "batch_unlabeled", "offline_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "val_every_iters", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lam < 0 or self.mu < 0:
            raise ValueError(f"train.lam and train.mu must be >= 0, got {self.lam}, {self.mu}")


@dataclass(frozen=True)
class RayConfig:
    """Ray Train and the synthesis service (used by the train_sa_cps / train_sa_st entry points)."""

    address: str = ""  # "" joins a running cluster if RAY_ADDRESS is set, else starts a local one
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = ""  # Ray Train checkpoints; "" means <out>/ray
    max_failures: int = 2
    synth_actors: int = 1
    synth_actor_cpus: float = 0.5
    synth_max_batch: int = 32
    synth_actor_gpus: float = 0.0  # GPU share of each synthesis actor when use_gpu (logical, not a memory cap)
    synth_backend: Literal["auto", "trt", "ort", "torch"] = "auto"  # decoder inside the actor
    synth_gather_ms: float = 5.0  # how long the actor waits to gather concurrent requests into one batch
    synth_max_restarts: int = 3  # Ray restarts a crashed synthesis actor this many times
    synth_retries: int = 5  # client retries of a failed call (exponential backoff from 0.5 s)

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.synth_actors < 1 or self.synth_max_batch < 1:
            raise ValueError(f"ray.num_workers must be >= 0, synth_actors and synth_max_batch >= 1, got "
                             f"{self.num_workers}, {self.synth_actors}, {self.synth_max_batch}")
        if self.cpus_per_worker < 0 or self.synth_actor_cpus < 0 or self.synth_gather_ms < 0:
            raise ValueError("ray.cpus_per_worker, synth_actor_cpus and synth_gather_ms must be >= 0")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    name: str = "plsynth"
    source: str = ""  # the YAML file this came from (set by load_config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


def presets() -> list[str]:
    """Names of the presets shipped with plsynth (``--config phantom-smoke``)."""
    return sorted(p.name.removesuffix(".yaml") for p in _preset_folder().iterdir() if p.name.endswith(".yaml"))


def _preset_folder() -> Path:
    # Package data, plain files (plsynth installs unzipped); configs/ in the checkout links here.
    return Path(str(resources.files("plsynth") / "configs"))


def config_path(name_or_path: str | Path) -> Path:
    """The file of a preset named bare (``phantom-smoke``: no folder, no suffix), else the path as given."""
    text = str(name_or_path)
    if Path(text).parts != (text,) or Path(text).suffix:
        return Path(name_or_path)
    if text not in presets():
        raise ConfigError(f"{text}: no such preset (presets: {', '.join(presets())}); a config file needs its path")
    return _preset_folder() / f"{text}.yaml"


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (a file, or a preset by name), apply dotted ``key=value`` overrides, validate every field."""
    path = config_path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=0.005")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    raw["source"] = str(path)
    return config_from_dict(raw, where=str(path))


# Keys (and values) that are gone: they did nothing, or were tried and not kept. Configs that hold
# them still load: a YAML file with a warning (its author can delete the key), a stored copy
# (checkpoint, bundle) with a log line only, so that every plsynth-infer run on an old bundle does
# not warn about a training knob.
REMOVED_KEYS = {"train.num_workers": "it never started DataLoader workers (batches are built in-process)",
                "synth.lambda_texture": "a texture term from the frozen segmenter, tried and not kept (BENCHMARKS.md, issue 11)",
                "synth.l1_pool": "the pixel L1 on block means, tried and not kept (BENCHMARKS.md, issue 11)",
                "synth.oasis_feat": "feature matching on the OASIS discriminator, tried and not kept (BENCHMARKS.md, issue 11)",
                "synth.diffaugment": "DiffAugment before the discriminator, tried and not kept (BENCHMARKS.md, issue 11)",
                "synth.ema": "a moving average of the generator's weights, tried and not kept (BENCHMARKS.md, issue 11)",
                "synth.patch_layers": "a local PatchGAN beside the OASIS discriminator, tried and not kept (BENCHMARKS.md, issue 11)",
                "synth.lambda_patch": "the local PatchGAN's weight, tried and not kept (BENCHMARKS.md, issue 11)"}
REMOVED_VALUES = {("synth.backend", "trt"): ("torch", "trainers never ran TensorRT; the synthesis actor does (ray.synth_backend)")}
# Switches tried and not kept that change what a synthesizer draws or its networks: at their old
# default they are dropped like the keys above; any other value raises (a bundle trained with it
# cannot be served by this version; BENCHMARKS.md names the commit that can).
REMOVED_SWITCHES = {"synth.wall": (False, "the chest wall as a 6th map class"),
                    "synth.infection_vessels": (False, "vessels drawn through the infection"),
                    "synth.padding": ("zeros", "reflect padding in the decoder"),
                    "synth.margin": (0, "a margin of map drawn around the slice"),
                    "synth.augment_padding": ("zeros", "edge padding in the synthesizer's augmentation"),
                    "synth.ignore_padding": (False, "the augmentation's black band left out of every loss")}


def drop_removed(raw: dict[str, Any], where: str, stored: bool) -> dict[str, Any]:
    """A copy of ``raw`` without the removed keys and values above (YAML: a warning; a stored copy:
    a log line, none for a removed switch at its old default); ConfigError for a removed switch
    that was on."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    dropped = []
    for key, why in REMOVED_KEYS.items():
        section, leaf = key.split(".")
        if isinstance(raw.get(section), dict) and leaf in raw[section]:
            del raw[section][leaf]
            dropped.append(f"{key} is ignored and no longer a config key: {why}")
    for key, (default, what) in REMOVED_SWITCHES.items():
        section, leaf = key.split(".")
        if isinstance(raw.get(section), dict) and leaf in raw[section]:
            value = raw[section].pop(leaf)
            if value != default:
                raise ConfigError(f"{where}: {key}: {value!r}: {what} was tried and not kept, and this version "
                                  f"no longer has it (BENCHMARKS.md, issue 11, names the commit that does)")
            if not stored:  # a stored copy at the old default is what the code does now: nothing to say
                dropped.append(f"{key} is ignored and no longer a config key: {what}, tried and not kept (BENCHMARKS.md, issue 11)")
    for (key, value), (new, why) in REMOVED_VALUES.items():
        section, leaf = key.split(".")
        if isinstance(raw.get(section), dict) and raw[section].get(leaf) == value:
            raw[section][leaf] = new
            dropped.append(f"{key}: {value} is read as {new}: {why}")
    for message in dropped:
        if stored:
            logging.getLogger(__name__).info("%s: %s", where, message)
        else:
            warnings.warn(f"{where}: {message}", stacklevel=4)
    return raw


def config_from_dict(raw: dict[str, Any], where: str = "<dict>", stored: bool = False) -> Config:
    """Build a Config from plain data; ``stored``: a copy saved in a checkpoint or bundle."""
    return _build(Config, drop_removed(_renamed(raw, where), where, stored), where, prefix="")


def _renamed(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Older configs, checkpoints and bundles: ``train.val_every`` (epochs between validations,
    until 2026-12-02) became ``train.val_every_iters``; its value 1 is the new default 0."""
    train = raw.get("train") if isinstance(raw, dict) else None
    if not isinstance(train, dict) or "val_every" not in train:
        return raw
    train = dict(train)
    every = train.pop("val_every")
    if every != 1:
        raise ConfigError(f"{where}: train.val_every ({every!r} epochs) was replaced by train.val_every_iters "
                          "(iterations between validations; 0 = at the end of every epoch); set that instead")
    return {**raw, "train": train}


def saved_config(raw: dict[str, Any], where: str) -> Config:
    """The config stored in a checkpoint or bundle. Those saved before `model.norm` existed
    (2026-11-28) hold batch-norm networks, so a missing norm means "batch" there, not the default."""
    model = raw.get("model")
    if isinstance(model, dict) and "norm" not in model:
        raw = {**raw, "model": {**model, "norm": "batch"}}
    return config_from_dict(raw, where=where, stored=True)


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {keys}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        kwargs[name] = _coerce(hints[name], value, where, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {exc}") from exc


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {key} must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where, key) for a, v in zip(args, value))
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {value!r}")
    return value
