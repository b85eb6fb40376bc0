"""Segmentation losses of the paper (eq. 6-8): L_seg = BCE + Dice, both as means.

The paper's eq. 7 lacks its minus sign (as written it is a log-likelihood, to be maximised);
here BCE is the usual positive loss, averaged over pixels and samples rather than summed, so
that its scale does not depend on the image size and lambda / mu keep their meaning.

All functions take *logits* (B, 1, H, W), not probabilities: BCE on logits is numerically
stable (log-sum-exp) where ``log(sigmoid(x))`` underflows for confident predictions.

Data-parallel training (`global_batch`): each worker holds a shard of the global batch, and
both terms are functions of sums over the *global* batch (the BCE mean, the batch Dice). Inside
``global_batch()`` `seg_loss` sums its few statistics across the workers with an autograd-aware
all-reduce, so every worker computes the single-process loss and DDP's gradient average equals
the single-process gradient (the all-reduce's backward sums the N equal loss gradients, DDP
divides by N). Outside it (one process), the plain means below are used.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

# eq. 8's epsilon, added to numerator and denominator (the authors' SSL4MIS loss, MONAI and
# nnU-Net all use 1e-5). A large value (1.0) collapsed CPS / SA-CPS to empty masks: with an
# empty pseudo-label, 1 - s / (sum p + s) pulls every remaining foreground probability to zero,
# while with 1e-5 an empty target gives Dice no gradient and only BCE acts.
DICE_SMOOTH = 1e-5


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 7 with its sign fixed: mean over every pixel of -(y log p + (1-y) log(1-p))."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="mean")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Eq. 8, soft Dice over the whole batch: ``1 - (2 sum(p y) + s) / (sum p + sum y + s)``.

    p = sigmoid(logits). The sums run over the batch and all pixels at once (one Dice per
    batch, as the official SSL4MIS-style loss does), because many CT slices carry no infection:
    a per-slice Dice would be undefined or maximal on each of them. The smoothing term ``s`` is
    added to the numerator as well as the denominator (eq. 8 has it in the denominator only), so
    an empty target predicted empty gives a loss of 0 instead of 1 (see DICE_SMOOTH).
    """
    prob = torch.sigmoid(logits)
    target = target.to(prob.dtype)
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (prob.sum() + target.sum() + smooth)


_global_batch = False


@contextlib.contextmanager
def global_batch(enabled: bool = True) -> Iterator[None]:
    """Within this block `seg_loss` is the loss of the global batch of all data-parallel workers.

    Needs an initialised ``torch.distributed`` process group (Ray Train sets it up); every
    worker must then call `seg_loss` equally often, in the same order (the step functions do).
    """
    global _global_batch
    previous, _global_batch = _global_batch, enabled
    try:
        yield
    finally:
        _global_batch = previous


def _global_seg_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """`seg_loss` over the union of every worker's shard: one all-reduce of five sums."""
    from torch.distributed.nn.functional import all_reduce

    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    count = torch.tensor(float(logits.numel()), device=logits.device, dtype=logits.dtype)
    sums = all_reduce(torch.stack([bce, (prob * target).sum(), prob.sum(), target.sum(), count]))
    return sums[0] / sums[4] + 1.0 - (2.0 * sums[1] + smooth) / (sums[2] + sums[3] + smooth)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 6: L_seg(p, y) = L_BCE(p, y) + L_DICE(p, y); target (B, 1, H, W) in {0, 1}."""
    if logits.shape != target.shape:
        raise ValueError(f"seg_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    logits = logits.float()  # under autocast (AMP) the sums still run in float32
    if _global_batch:
        return _global_seg_loss(logits, target)
    return bce_loss(logits, target) + dice_loss(logits, target)
