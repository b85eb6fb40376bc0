"""GAN training of the SEAN synthesizer: ``plsynth train synthesizer --config FILE --out DIR``.

Data: the training split's labeled slices only (``build_splits(cfg, out).labeled``); validation
slices never reach the synthesizer or its pool (paper; SASSL issue #1). Each slice gives its
image in [0, 1] (mapped to [-1, 1]) and its 4-class map from lung mask + infection label, with
``synth.vessels`` a 5th class, the vessels, read from the (augmented) image itself.
Augmentation (``synth.flip``, ``rotate_degrees``, ``scale``, ``intensity``; ``augment_batch``)
moves image and map jointly, so 40 slices are not memorised (what comes in from outside the slice
is black: replicating the slice's edge instead took the dark frame out of the drawing but made
the pairs worse for the segmenter, BENCHMARKS.md); the one flip mirrors left and
right (along the axis between the two lungs, ``augment.flip_across_lungs``) and swaps the lung
labels, so the patient-left lung stays class 1 on its side; front and back are never mirrored.

Per step (the defaults of SEAN's own train.py, ZPdesu/SEAN): the encoder reads the real
image's style under its map, the decoder reconstructs it (with fresh noise); hinge GAN loss on
a multi-scale PatchGAN fed (map, image) and discriminator feature matching (``lambda_feat``),
or (``synth.discriminator: oasis``) OASIS's per-pixel (4 + 1)-class loss with LabelMix; a
VGG19 perceptual loss only when ``synth.vgg_weights`` names a local file (never downloaded);
a pixel L1 (``lambda_l1``, not in SEAN: it stands in for VGG where no weights exist); with
``synth.segmenter`` / ``lambda_seg``, a frozen segmenter trained on the labeled slices must find
the map's infection, and nothing else, in the drawn image (``ConsistencyLoss``); Adam
with two time-scale rates (G and E: lr / 2, D: lr * 2, betas (beta1, beta2)), constant for the
first half of the epochs then linearly decayed (SEAN: 50 + 50 epochs).

The run folder holds ``last.pt`` (nets, optimizers, epoch, config; a rerun resumes from it),
``grids/epoch_XXX.png`` (real | map | reconstruction | synthesis with a pool style) and, at
the end, ``bundle/`` (``plsynth.bundles.synthesizer``) with the pool built once from
all labeled slices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from plsynth.atomic import atomic_write
from plsynth.config import Config
from plsynth.models.discriminator import (
    MultiScaleDiscriminator,
    SegmentationDiscriminator,
    class_balanced_ce,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    labelmix_loss,
)
from plsynth.models.sean import SEANDecoder, StyleEncoder, build_synthesizer

log = logging.getLogger(__name__)


# -- data -------------------------------------------------------------------------------------


def prepare_batch(batch: dict[str, Any], size: int, vessels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset batch -> (image (B, 1, size, size) in [-1, 1], one-hot map (B, C, size, size)).

    The same condition as the synthesis service's requests (``plsynth.data.semantic.class_map_at``:
    resized to ``size``; with ``vessels``, ``synth.vessels``, the 5th class read from the image).
    """
    from plsynth.data.semantic import class_map_at, map_classes, one_hot

    image, semantic = class_map_at(size, batch["lung"], batch["label"], batch["image"], vessels)
    onehot = one_hot(semantic, map_classes(vessels))
    return image * 2 - 1, onehot


def augment_batch(batch: dict[str, Any], cfg: Config, generator: torch.Generator) -> dict[str, Any]:
    """The synthesizer's training augmentation, joint on image, lung and label (see module doc)."""
    from plsynth.training.augment import apply_transforms, flip_across_lungs, jitter_intensity, random_transforms

    s = cfg.synth
    image = jitter_intensity(batch["image"].float(), generator, s.intensity)
    if not (s.flip or s.rotate_degrees or s.scale):
        return {**batch, "image": image}
    lung = batch["lung"].long()
    theta, hflip = random_transforms(len(image), generator, s.flip, s.rotate_degrees, s.scale, vflip=False)
    theta = flip_across_lungs(theta, hflip, lung)
    image, lung, label = apply_transforms(theta, hflip, image, lung, batch["label"].float())
    return {**batch, "image": image, "lung": lung, "label": label}


def pool_batches(dataset, size: int, batch_size: int, vessels: bool = False) -> Iterator[dict[str, Any]]:
    """Batches for ``build_style_pool``: image in [0, 1], one-hot, case, index."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        image, onehot = prepare_batch(batch, size, vessels)
        yield {
            "image": (image + 1) / 2,
            "onehot": onehot,
            "has_infection": batch["label"].flatten(1).amax(1) > 0.5,  # ground truth at the data's size
            "case": batch.get("case"),
            "index": batch.get("index"),
        }


# -- perceptual loss (optional, local weights only) ---------------------------------------------

_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


class VGGLoss(nn.Module):
    """SEAN's VGG19 perceptual L1 (relu1_1..relu5_1, weights 1/32 .. 1) from a local state dict.

    ``weights`` is a torchvision-layout ``vgg19`` state dict (keys ``features.N.weight``); the
    1-channel image is repeated to 3 channels and fed in [-1, 1] as SEAN does.
    """

    slices = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))
    layer_weights = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)

    def __init__(self, weights: Path) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG19:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        missing = [k for k in self.features.state_dict() if k not in features]
        if missing:
            raise ValueError(f"{weights}: not a torchvision vgg19 state dict (missing features.{missing[0]})")
        self.features.load_state_dict({k: features[k] for k in self.features.state_dict()})
        self.requires_grad_(False).eval()

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x, y = fake.repeat(1, 3, 1, 1), real.repeat(1, 3, 1, 1)
        total = fake.new_zeros(())
        for (start, stop), weight in zip(self.slices, self.layer_weights):
            block = self.features[start:stop]
            x, y = block(x), block(y)
            total = total + weight * F.l1_loss(x, y.detach())
        return total


# -- label consistency (optional, a frozen segmenter) ---------------------------------------------


class ConsistencyLoss(nn.Module):
    """The segmentation loss of a frozen segmenter on the drawn image against the map's infection.

    The adversarial signal alone lets the generator draw infection faintly, or texture the segmenter
    reads as infection on infection-free lung; SA-CPS trains on these pairs with exactly this loss,
    so the generator is asked for images on which it is low. The segmenter (``model`` of a bundle
    trained on real labeled slices only, e.g. the baseline) sees the drawn image as it saw its
    training slices: in [0, 1] at its own size, black outside the lung field if it was trained so
    (``lung_handling: mask``), cut to the map's lung boxes if it was trained on them (``lung_box``).
    """

    def __init__(self, bundle: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from plsynth.bundles.segmenter import load_bundle
        from plsynth.errors import BundleError

        try:
            loaded = load_bundle(Path(bundle).expanduser())
        except BundleError as exc:  # the same checks as plsynth-infer, named by the config key
            raise BundleError(f"synth.segmenter: {exc} (a segmenter bundle: train the baseline first)") from None
        self.size = loaded.image_size
        self.view = loaded.field_of_view
        self.mask_outside = loaded.lung_handling == "mask"
        self.meta_sha256 = loaded.meta_sha256()
        self.net = loaded.torch_networks(str(device))["model"]
        self.requires_grad_(False).eval()

    def forward(self, fake: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        from plsynth.data.preprocess import run_on_lung_boxes
        from plsynth.data.semantic import BACKGROUND, INFECTION, black_outside_field
        from plsynth.training.losses import seg_loss

        image, target = (fake + 1) / 2, onehot[:, INFECTION : INFECTION + 1]
        field = 1 - onehot[:, BACKGROUND : BACKGROUND + 1]  # lung classes and infection: the map's lung field
        if self.mask_outside:
            image = black_outside_field(image, onehot)
        if image.shape[-1] != self.size or image.shape[-2] != self.size:
            image = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False)
            target, field = (F.interpolate(t, size=(self.size, self.size), mode="nearest") for t in (target, field))
        return seg_loss(run_on_lung_boxes(self.net, image, field[:, 0], self.view), target)

    def train(self, mode: bool = True) -> "ConsistencyLoss":
        return super().train(False)  # frozen: instance/batch norm stay in eval


# -- one GAN step -------------------------------------------------------------------------------


@dataclass
class SynthNets:
    decoder: SEANDecoder
    encoder: StyleEncoder
    discriminator: MultiScaleDiscriminator | SegmentationDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    vgg: VGGLoss | None = None
    consistency: ConsistencyLoss | None = None


def build_nets(cfg: Config, device: str | torch.device = "cpu") -> SynthNets:
    s = cfg.synth
    decoder, encoder = build_synthesizer(s)
    d_width = s.d_width or s.width
    if s.discriminator == "oasis":
        discriminator = SegmentationDiscriminator(decoder.num_classes, d_width, depth=min(s.num_up, 5))
    else:
        discriminator = MultiScaleDiscriminator(s.num_d, d_width, in_channels=decoder.num_classes + 1)
    for net in (decoder, encoder, discriminator):
        net.to(device).train()
    # SEAN's TTUR: generator lr / 2, discriminator lr * 2, betas (0, 0.9)
    opt_g = torch.optim.Adam([*decoder.parameters(), *encoder.parameters()], lr=s.lr / 2, betas=(s.beta1, s.beta2))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=s.lr * 2, betas=(s.beta1, s.beta2))
    vgg = None
    if s.vgg_weights:
        path = Path(s.vgg_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"synth.vgg_weights: {path} does not exist (weights are never downloaded)")
        vgg = VGGLoss(path).to(device)
    else:
        log.info("VGG perceptual loss off (synth.vgg_weights is empty)")
    consistency = ConsistencyLoss(s.segmenter, device).to(device) if s.lambda_seg else None
    return SynthNets(decoder, encoder, discriminator, opt_g, opt_d, vgg, consistency)


def gan_step(nets: SynthNets, image: torch.Tensor, onehot: torch.Tensor, cfg: Config) -> dict[str, float]:
    """One generator step then one discriminator step on a batch; returns the losses."""
    s = cfg.synth
    noise = nets.decoder.make_noise(len(image), device=image.device)
    style = nets.encoder(image, onehot)
    fake = nets.decoder(onehot, style, noise)

    oasis = s.discriminator == "oasis"
    nets.discriminator.requires_grad_(False)
    if oasis:
        losses = {"g_gan": class_balanced_ce(nets.discriminator(fake), onehot, real=True)}
    else:
        pred_fake = nets.discriminator(onehot, fake)
        with torch.no_grad():
            pred_real = nets.discriminator(onehot, image)
        losses = {"g_gan": hinge_g_loss(pred_fake), "g_feat": s.lambda_feat * feature_matching_loss(pred_real, pred_fake)}
    if s.lambda_l1:
        losses["g_l1"] = s.lambda_l1 * F.l1_loss(fake, image)
    if nets.vgg is not None:
        losses["g_vgg"] = s.lambda_vgg * nets.vgg(fake, image)
    if nets.consistency is not None:
        losses["g_seg"] = s.lambda_seg * nets.consistency(fake, onehot)
    g_total = torch.stack(list(losses.values())).sum()
    nets.opt_g.zero_grad(set_to_none=True)
    g_total.backward()
    nets.opt_g.step()

    nets.discriminator.requires_grad_(True)
    if oasis:
        fake = fake.detach()
        logits_real, logits_fake = nets.discriminator(image), nets.discriminator(fake)
        d_loss = class_balanced_ce(logits_real, onehot, real=True) + class_balanced_ce(logits_fake, onehot, real=False)
        if s.lambda_labelmix:
            d_loss = d_loss + s.lambda_labelmix * labelmix_loss(
                nets.discriminator, image, fake, onehot, logits_real, logits_fake)
    else:
        d_loss = hinge_d_loss(nets.discriminator(onehot, image), nets.discriminator(onehot, fake.detach()))
    nets.opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    nets.opt_d.step()
    out = {k: float(v.detach()) for k, v in losses.items()}
    out["d_loss"] = float(d_loss.detach())
    out["recon_l1"] = float(F.l1_loss(fake.detach(), image))
    return out


@torch.no_grad()
def reconstruction_l1(decoder: SEANDecoder, encoder: StyleEncoder, image: torch.Tensor, onehot: torch.Tensor) -> float:
    """Mean |decoder(map, encoder(image, map)) - image| in [-1, 1] units, eval mode, no noise."""
    modes = decoder.training, encoder.training
    decoder.eval(), encoder.eval()
    try:
        return float(F.l1_loss(decoder(onehot, encoder(image, onehot), None), image))
    finally:
        decoder.train(modes[0]), encoder.train(modes[1])


@torch.no_grad()
def write_training_grid(decoder, encoder, preview, cfg: Config, path: Path) -> Path | None:
    """real | map | reconstruction | synthesis with a pool style, for ``grid_samples`` slices.

    The pool style is drawn from the codes of the preview slices (positive ones when any).
    """
    from plsynth.bundles.style_pool import build_style_pool
    from plsynth.training.synth_preview import colorize_map, gray_to_rgb, save_grid

    s = cfg.synth
    if len(preview) == 0 or s.grid_samples < 1:
        return None
    batch = next(iter(torch.utils.data.DataLoader(preview, batch_size=s.grid_samples, shuffle=False)))
    device = next(decoder.parameters()).device
    image, onehot = prepare_batch(batch, s.image_size, s.vessels)
    image, onehot = image.to(device), onehot.to(device)
    modes = decoder.training, encoder.training
    decoder.eval(), encoder.eval()
    try:
        generator = torch.Generator().manual_seed(s.seed)
        noise = decoder.make_noise(len(image), generator)
        noise = None if noise is None else noise.to(device)
        recon = decoder(onehot, encoder(image, onehot), noise)
        pool = build_style_pool(encoder, pool_batches(preview, s.image_size, s.batch_size, s.vessels), device=device)
        mode = "positive" if pool.n_positive else "all"
        style = pool.draw(len(image), s.pool_k, generator, mode=mode).to(device)
        drawn = decoder(onehot, style, noise)
    finally:
        decoder.train(modes[0]), encoder.train(modes[1])
    semantic = onehot.argmax(1).cpu().numpy()
    rows = [
        [
            gray_to_rgb((image[i, 0].cpu().numpy() + 1) / 2),
            colorize_map(semantic[i]),
            gray_to_rgb((recon[i, 0].cpu().numpy() + 1) / 2),
            gray_to_rgb((drawn[i, 0].cpu().numpy() + 1) / 2),
        ]
        for i in range(len(image))
    ]
    return save_grid(rows, path)


def lr_factor(epoch: int, epochs: int) -> float:
    """SEAN's schedule scaled to ``epochs``: 1 for the first half, then linear decay (never 0)."""
    half = epochs // 2
    return 1.0 if epoch < half else (epochs - epoch) / (epochs - half)


# -- run ----------------------------------------------------------------------------------------


def _save_last(path: Path, nets: SynthNets, epoch: int, cfg: Config, history: list[dict]) -> None:
    state = {
        "epoch": epoch,
        "decoder": nets.decoder.state_dict(),
        "encoder": nets.encoder.state_dict(),
        "discriminator": nets.discriminator.state_dict(),
        "opt_g": nets.opt_g.state_dict(),
        "opt_d": nets.opt_d.state_dict(),
        "config": cfg.to_dict(),
        "history": history,
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path, nets: SynthNets, cfg: Config) -> tuple[int, list[dict]]:
    if not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"].get("synth") != cfg.to_dict()["synth"]:
        changed = sorted(k for k, v in cfg.to_dict()["synth"].items() if state["config"]["synth"].get(k) != v)
        log.warning("resuming %s with a changed synth config: %s", path, ", ".join(changed))
    nets.decoder.load_state_dict(state["decoder"])
    nets.encoder.load_state_dict(state["encoder"])
    nets.discriminator.load_state_dict(state["discriminator"])
    nets.opt_g.load_state_dict(state["opt_g"])
    nets.opt_d.load_state_dict(state["opt_d"])
    log.info("resumed %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state.get("history", []))


def _preview_subset(dataset, n: int) -> list[int]:
    """Indices of up to n labeled slices for the grid, slices with infection first."""
    infected, clean = [], []
    for i in range(min(len(dataset), 64)):
        (infected if float(dataset[i]["label"].sum()) > 0 else clean).append(i)
    return (infected + clean)[:n]


def train_synthesizer(cfg: Config, out: str | Path, device: str | torch.device | None = None, *,
                      labeled: Any = None) -> Path:
    """Train the synthesizer on ``labeled`` (a slice dataset, items as ``plsynth.data.datasets``;
    default ``build_splits(cfg, out).labeled``) and write ``out/bundle``; resumes from out/last.pt.

    device: default ``train.device`` (a Ray Train worker passes the device Ray gave it).
    """
    from plsynth.bundles.style_pool import build_style_pool
    from plsynth.bundles.synthesizer import write_decoder_bundle
    from plsynth.training.loop import select_device
    from plsynth.torch_setup import flush_denormals

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if labeled is None:
        from plsynth.data.datasets import build_splits

        labeled = build_splits(cfg, Path(out)).labeled
    device = device or select_device(cfg.train.device)
    flush_denormals()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = cfg.synth
    if len(labeled) == 0:
        raise ValueError("synthesizer training needs labeled slices; the labeled split is empty")
    torch.manual_seed(s.seed)
    nets = build_nets(cfg, device)
    start, history = _resume(out / "last.pt", nets, cfg)
    generator = torch.Generator().manual_seed(s.seed)
    loader = torch.utils.data.DataLoader(
        labeled, batch_size=s.batch_size, shuffle=True, drop_last=len(labeled) > s.batch_size, generator=generator
    )
    preview = torch.utils.data.Subset(labeled, _preview_subset(labeled, max(s.grid_samples, 1) * 4))
    t_train = time.perf_counter()
    for epoch in range(start, s.epochs):
        for opt, base in ((nets.opt_g, s.lr / 2), (nets.opt_d, s.lr * 2)):
            for group in opt.param_groups:
                group["lr"] = base * lr_factor(epoch, s.epochs)
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        for batch in loader:
            image, onehot = prepare_batch(augment_batch(batch, cfg, generator), s.image_size, s.vessels)
            for k, v in gan_step(nets, image.to(device), onehot.to(device), cfg).items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0, **{k: v / max(steps, 1) for k, v in sums.items()}}
        history.append(record)
        log.info(
            "synth epoch %d/%d: %s", epoch + 1, s.epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
        )
        _save_last(out / "last.pt", nets, epoch + 1, cfg, history)
        write_training_grid(nets.decoder, nets.encoder, preview, cfg, out / "grids" / f"epoch_{epoch + 1:03d}.png")
    train_seconds = time.perf_counter() - t_train

    batches = pool_batches(labeled, s.image_size, s.batch_size, s.vessels)
    if s.texture > 0:
        batches = list(batches)  # the texture patches come from the same slices and maps
    pool = build_style_pool(nets.encoder, batches, device=device)
    nets.decoder.eval()
    nets.encoder.eval()
    extra = {
        "labeled_slices": len(labeled),
        "epochs": s.epochs,
        "train_seconds_this_run": train_seconds,
        "history": history,
        "vgg_loss": bool(s.vgg_weights),
    }
    if nets.consistency is not None:
        extra["consistency_segmenter"] = {"path": str(s.segmenter), "meta_sha256": nets.consistency.meta_sha256}
    texture = None
    if s.texture > 0:
        from plsynth.models.texture import residual_patches

        texture = residual_patches(torch.cat([b["image"] for b in batches]), torch.cat([b["onehot"] for b in batches]),
                                   seed=s.seed)
        if len(texture) == 0:
            log.warning("synth.texture: no %d px square lies inside a labeled slice's infection; drawings get none",
                        texture.shape[-1])
    return write_decoder_bundle(out / "bundle", nets.decoder, nets.encoder, pool, cfg, extra=extra, texture=texture)


__all__ = [
    "ConsistencyLoss",
    "VGGLoss",
    "augment_batch",
    "build_nets",
    "gan_step",
    "lr_factor",
    "prepare_batch",
    "reconstruction_l1",
    "train_synthesizer",
]
