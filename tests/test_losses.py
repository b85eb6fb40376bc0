"""L_seg = BCE + Dice (paper eq. 6-8) on inputs whose losses are derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from plsynth.training.losses import DICE_SMOOTH, bce_loss, dice_loss, seg_loss


def test_bce_of_an_undecided_prediction_is_log_two_whatever_the_target():
    logits = torch.zeros(2, 1, 5, 7)  # p = 0.5 everywhere
    target = (torch.arange(70).reshape(2, 1, 5, 7) % 3 == 0).float()
    assert bce_loss(logits, target).item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_bce_is_positive_mean_not_sum():
    # Eq. 7 without its minus sign would be negative; a sum would scale with the image size.
    target = torch.ones(1, 1, 4, 4)
    small = bce_loss(torch.full((1, 1, 4, 4), -1.0), target)
    large = bce_loss(torch.full((3, 1, 40, 40), -1.0), torch.ones(3, 1, 40, 40))
    expected = -math.log(1.0 / (1.0 + math.exp(1.0)))
    assert small.item() == pytest.approx(expected, rel=1e-6)
    assert large.item() == pytest.approx(expected, rel=1e-6)


def test_dice_of_a_half_probability_on_half_foreground_matches_eq_8():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1.0  # 8 of 16 pixels
    logits = torch.zeros_like(target)  # p = 0.5
    n = target.numel()
    intersection, sum_p, sum_y = 0.5 * 8, 0.5 * n, 8.0
    expected = 1.0 - (2 * intersection + DICE_SMOOTH) / (sum_p + sum_y + DICE_SMOOTH)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_confident_correct_prediction_has_near_zero_loss_and_wrong_one_a_large_loss():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 3:7] = 1.0
    right = (target * 2 - 1) * 30.0
    assert seg_loss(right, target).item() < 1e-4
    wrong = -right
    assert seg_loss(wrong, target).item() > 25.0  # BCE ~ 30, Dice ~ 1


def test_empty_target_predicted_empty_costs_nothing():
    target = torch.zeros(1, 1, 6, 6)
    assert dice_loss(torch.full_like(target, -40.0), target).item() == pytest.approx(0.0, abs=1e-6)


def test_seg_loss_is_bce_plus_dice_and_rejects_mismatched_shapes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 9, 11, generator=g)
    target = (torch.rand(3, 1, 9, 11, generator=g) > 0.6).float()
    assert seg_loss(logits, target).item() == pytest.approx((bce_loss(logits, target) + dice_loss(logits, target)).item())
    with pytest.raises(ValueError, match="shape"):
        seg_loss(logits, target[:, :, :8])


def test_dice_on_an_empty_target_leaves_the_prediction_to_bce():
    """An empty (pseudo-)label must not drive Dice's gradient: with a large smoothing term it
    pulled every foreground probability to zero and collapsed CPS / SA-CPS (BENCHMARKS.md)."""
    logits = torch.zeros(2, 1, 16, 16, requires_grad=True)  # p = 0.5 everywhere
    dice_loss(logits, torch.zeros(2, 1, 16, 16)).backward()
    assert logits.grad.abs().max() < 1e-9
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:8, 4:8] = 1
    logits.grad = None
    dice_loss(logits, target).backward()
    assert logits.grad.abs().max() > 1e-4
