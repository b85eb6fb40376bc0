"""One training step per method: baseline, CPS, SA-CPS (paper eq. 4-14), ST and SA-ST (eq. 15-18).

Every step function has the signature ``step(nets, batch, cfg, synth, seed) -> StepOutput`` and
only computes the loss; the loop (`training.loop`) owns the optimizers, the schedule and the
data. ``batch`` holds tensors already augmented and on the networks' device:

    image (B_l, 1, S, S), label (B_l, 1, S, S), lung (B_l, S, S)     labeled slices
    u_image (B_u, 1, S, S), u_lung (B_u, S, S)                       unlabeled slices
    u_pseudo (B_u, 1, S, S), u_synthetic (B_u, 1, S, S)              ST / SA-ST: the offline set

Which pseudo-label supervises which network (paper eq. 9-12): ``y1 = 1(s1(x_u) >= tau)`` and
``y2 = 1(s2(x_u) >= tau)``; s1 learns from ``(x_u, y2)`` and from ``x1_hat = Dec(y2, SC_ref)``
with ``y2``; s2 learns from ``(x_u, y1)`` and ``x2_hat = Dec(y1, SC_ref)`` with ``y1``. So the
synthetic image drawn from one network's pseudo-label trains the *other* network, with that
same pseudo-label as its target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from plsynth.config import Config, TrainConfig
from plsynth.training.losses import seg_loss

logger = logging.getLogger(__name__)

METHODS = ("baseline", "cps", "sa-cps", "st", "sa-st")


@dataclass
class StepOutput:
    loss: torch.Tensor
    terms: dict[str, float]  # loss_s, loss_pseudo, loss_synthetic, ... for the log
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # pseudo-labels etc., for tests


def network_names(method: str) -> tuple[str, ...]:
    """Networks a method trains: two peers for CPS / SA-CPS, one otherwise."""
    if method not in METHODS:
        raise ValueError(f"train.method must be one of {METHODS}, got {method!r}")
    return ("model", "peer") if method in ("cps", "sa-cps") else ("model",)


def method_switches(cfg: TrainConfig) -> tuple[bool, bool]:
    """(use_pseudo, use_synthetic) actually in force for ``cfg.method``.

    ``cps`` and ``st`` are the synthesis-free methods (pseudo term on, synthetic term off); the
    switches of Tables II / III apply to ``sa-cps`` and ``sa-st`` only; the baseline uses neither.
    """
    if cfg.method == "baseline":
        return False, False
    if cfg.method in ("cps", "st"):
        return True, False
    return cfg.use_pseudo, cfg.use_synthetic


def pseudo_label(logits: torch.Tensor, tau: float, lung: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 9: ``1(sigmoid(logits) >= tau)`` as float {0, 1}, detached (stop-gradient).

    With ``lung`` (B, H, W) the pseudo-infection is kept inside the lung (lung > 0): infection
    outside the lungs is anatomically impossible here, and the synthesizer only learned to draw
    infection inside lung regions.
    """
    label = (torch.sigmoid(logits.detach()) >= tau).to(logits.dtype)
    if lung is not None:
        label = label * (lung[:, None] > 0).to(label.dtype)
    return label


def _lung_or_none(batch: dict, key: str, cfg: TrainConfig) -> torch.Tensor | None:
    return batch[key] if cfg.pseudo_in_lung else None


def baseline_step(nets: dict[str, nn.Module], batch: dict, cfg: TrainConfig, synth: Any = None, seed: int = 0) -> StepOutput:
    """Supervised only: L_s = L_seg(f(x_l), y) (eq. 15 without the unlabeled terms)."""
    loss = seg_loss(nets["model"](batch["image"]), batch["label"])
    return StepOutput(loss, {"loss_s": float(loss.detach())})


def cross_pseudo_terms(
    logits1: torch.Tensor, logits2: torch.Tensor, tau: float, lung: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 9 and 11: ``(L_pseudo, y1, y2)``; s1's logits are scored against y2 and s2's against y1."""
    y1 = pseudo_label(logits1, tau, lung)
    y2 = pseudo_label(logits2, tau, lung)
    return seg_loss(logits1, y2) + seg_loss(logits2, y1), y1, y2


def synthesize_pairs(synth: Any, batch: dict, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Eq. 10 for stacked pseudo-labels ``labels`` (2 B_u, 1, S, S) of the augmented unlabeled
    slices: ``(x_a, y_a, x_b, y_b)``, the synthetic images of the two halves with their labels.

    The synthesizer learned un-rotated maps, so with the batch's transform (``u_theta`` /
    ``u_hflip``, from the loop) each label is taken back to the slice's own frame, drawn there,
    and image and label are then moved by the same transform together; the label that goes with
    a synthetic image is that moved label, so the pair is exact. One request, one pool draw.
    """
    from plsynth.data.preprocess import crop_at, paste_at
    from plsynth.training.augment import apply_transforms, invert_transforms

    xu, lung = batch["u_image"], batch["u_lung"]
    corners = batch.get("u_corners")
    if corners is not None:  # data.lung_box: draw in the whole frames, then cut the boxes the networks see
        corners = np.concatenate([corners.cpu().numpy()] * 2)
        box = tuple(xu.shape[-2:])
        xu, lung = batch["u_frame"], batch["u_frame_lung"]
        labels = paste_at(labels, corners, int(xu.shape[-1]))
    images, lungs = torch.cat([xu, xu]), torch.cat([lung, lung])
    theta = batch.get("u_theta")
    if theta is not None:
        theta, hflip = torch.cat([theta, theta]), torch.cat([batch["u_hflip"], batch["u_hflip"]])
        images, lungs, labels = apply_transforms(invert_transforms(theta), hflip, images, lungs, labels)
    with torch.no_grad():
        drawn = synth.synthesize(labels, lungs, images=images, seed=seed)
    drawn = drawn.to(device=xu.device, dtype=xu.dtype).detach()
    if theta is not None:
        drawn, _, labels = apply_transforms(theta, hflip, drawn, None, labels)
    if corners is not None:
        drawn, labels = crop_at(drawn, corners, *box), crop_at(labels, corners, *box)
    n = xu.shape[0]
    return drawn[:n], labels[:n], drawn[n:], labels[n:]


def cps_step(
    nets: dict[str, nn.Module],
    batch: dict,
    cfg: TrainConfig,
    synth: Any = None,
    seed: int = 0,
    use_pseudo: bool = True,
    use_synthetic: bool = False,
) -> StepOutput:
    """CPS and SA-CPS: L = L_s + lambda (L_pseudo + L_synthetic) (eq. 5, 11-14).

    Each network sees labeled and unlabeled slices in one forward pass (with `model.norm: batch`, one BatchNorm batch).
    The synthetic images of both networks are drawn in one request, with one reference style
    (the client's pool draw for ``seed``), then fed through the network they supervise.
    """
    s1, s2 = nets["model"], nets["peer"]
    xl, y, xu = batch["image"], batch["label"], batch["u_image"]
    n_l = xl.shape[0]
    x = torch.cat([xl, xu])
    out1, out2 = s1(x), s2(x)
    loss_s = seg_loss(out1[:n_l], y) + seg_loss(out2[:n_l], y)
    loss_pseudo, y1, y2 = cross_pseudo_terms(out1[n_l:], out2[n_l:], cfg.tau, _lung_or_none(batch, "u_lung", cfg))
    loss = loss_s
    terms = {"loss_s": float(loss_s.detach())}
    extras = {"pseudo_model": y1, "pseudo_peer": y2}
    if use_pseudo:  # off (Table II's L_s + L_synthetic): the pseudo-labels only feed the synthesizer
        loss = loss + cfg.lam * loss_pseudo
        terms["loss_pseudo"] = float(loss_pseudo.detach())
    if use_synthetic:
        if synth is None:
            raise ValueError("sa-cps with train.use_synthetic needs a synthesis client (synth.bundle)")
        n_u = xu.shape[0]
        x1_hat, t2, x2_hat, t1 = synthesize_pairs(synth, batch, torch.cat([y2, y1]), seed)
        loss_synthetic = seg_loss(s1(x1_hat), t2) + seg_loss(s2(x2_hat), t1)
        loss = loss + cfg.lam * loss_synthetic
        terms["loss_synthetic"] = float(loss_synthetic.detach())
        extras.update(synthetic_model=x1_hat, synthetic_peer=x2_hat)
    return StepOutput(loss, terms, extras)


def self_training_step(
    nets: dict[str, nn.Module],
    batch: dict,
    cfg: TrainConfig,
    synth: Any = None,
    seed: int = 0,
    use_pseudo: bool = True,
    use_synthetic: bool = False,
) -> StepOutput:
    """ST and SA-ST student step: L = L_s + mu (L_pseudo + L_synthetic) (eq. 15-18).

    The pseudo-labels and synthetic images come from the offline set made once by the teacher
    (Algorithm 1, steps 2-3); real, pseudo and synthetic pairs share one forward pass.
    """
    student = nets["model"]
    parts, targets = [batch["image"]], [batch["label"]]
    if use_pseudo:
        parts.append(batch["u_image"])
        targets.append(batch["u_pseudo"])
    if use_synthetic:
        parts.append(batch["u_synthetic"])
        targets.append(batch["u_pseudo"])
    out = student(torch.cat(parts))
    chunks = torch.split(out, [p.shape[0] for p in parts])
    loss_s = seg_loss(chunks[0], targets[0])
    loss = loss_s
    terms = {"loss_s": float(loss_s.detach())}
    k = 1
    for flag, name in ((use_pseudo, "loss_pseudo"), (use_synthetic, "loss_synthetic")):
        if flag:
            term = seg_loss(chunks[k], targets[k])
            loss = loss + cfg.mu * term
            terms[name] = float(term.detach())
            k += 1
    return StepOutput(loss, terms)


StepFunction = Callable[..., StepOutput]


def step_function(cfg: TrainConfig) -> StepFunction:
    """The step of ``cfg.method`` with its switches bound."""
    use_pseudo, use_synthetic = method_switches(cfg)
    if cfg.method == "baseline":
        return baseline_step
    if cfg.method in ("cps", "sa-cps"):
        return lambda nets, batch, c, synth=None, seed=0: cps_step(nets, batch, c, synth, seed, use_pseudo, use_synthetic)
    return lambda nets, batch, c, synth=None, seed=0: self_training_step(
        nets, batch, c, synth, seed, use_pseudo, use_synthetic
    )


def make_synthesis_client(cfg: Config, seed: int | None = None) -> Any:
    """The synthesizer that SA-CPS / SA-ST talk to, chosen by ``cfg.synth.backend``.

    ``torch`` / ``ort``: an in-process decoder (`synth_service.local.LocalSynthesizer`)
    loaded from ``cfg.synth.bundle``; ``service``: the Ray synthesis actor. Both implement
    `synth_service.protocol.SynthesisClient`, so the trainers cannot tell them apart.
    """
    if not cfg.synth.bundle:
        raise ValueError(
            f"{cfg.source or 'config'}: synth.bundle is empty; {cfg.train.method} needs a synthesizer bundle "
            "(train one with `plsynth train synthesizer` on the same split and set synth.bundle)"
        )
    seed = cfg.synth.seed if seed is None else seed
    if cfg.synth.backend == "service":
        # The Ray actor must already run (the train_sa_cps / train_sa_st entry points start it).
        from plsynth.synth_service.actor import connect_service

        return connect_service(cfg, seed=seed)
    from plsynth.synth_service.local import LocalSynthesizer

    return LocalSynthesizer(cfg.synth.bundle, backend=cfg.synth.backend, seed=seed, k=cfg.synth.pool_k,
                            pool_mode=cfg.synth.pool_mode)  # the run's draw, not the bundle's training one
