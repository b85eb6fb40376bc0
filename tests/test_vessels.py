"""Vessels read from the slice (the synthesizer's 5th map class): thin bright lines on dark lung are
found, the chest wall at the lung field's border and the parenchyma are not, and the per-slice
threshold follows a slice's brightness and contrast. The chest wall (6th class) is that rim of the
field, and never a vessel or parenchyma."""

from __future__ import annotations

import torch

from plsynth.data.vessels import vessel_mask


def _slice(size: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dark lung disk (noisy parenchyma) with 2-px bright lines through it, in a thin bright
    chest wall (3 px, then darker fat); the lung field is the disk grown by 2 px, so it takes in a
    rim of chest wall, as the classical field does."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    lung = r < size * 0.35
    image = torch.full((size, size), 0.45)
    image[r < size * 0.35 + 3] = 0.8
    image[lung] = 0.15
    image += 0.02 * torch.randn(size, size, generator=g)
    lines = torch.zeros(size, size, dtype=torch.bool)
    for k in range(-3, 4):
        lines |= ((yy - xx - 9 * k).abs() <= 1) | ((yy + xx - size - 11 * k).abs() <= 0)
    lines &= r < size * 0.3
    image[lines] = 0.55
    field = (r < size * 0.35 + 2).long()
    return image.clamp(0, 1)[None, None], field[None], lines[None]


def test_thin_bright_lines_on_dark_lung_are_vessels_and_the_chest_wall_rim_is_not():
    image, field, lines = _slice()
    found = vessel_mask(image, field)
    assert found.shape == field.shape and found.dtype == torch.bool
    recall = (found & lines).sum() / lines.sum()
    precision = (found & lines).sum() / found.sum()
    assert recall > 0.8 and precision > 0.9, (float(recall), float(precision))
    rim = (field[0] > 0) & (image[0, 0] > 0.5) & ~lines[0]
    assert rim.any() and not (found[0] & rim).any()


def test_the_threshold_follows_the_slices_brightness_and_contrast():
    image, field, _ = _slice()
    found = vessel_mask(image, field)
    darker = vessel_mask((image * 0.7 + 0.02).clamp(0, 1), field)
    agree = (found & darker).sum() / (found | darker).sum()
    assert agree > 0.85, float(agree)


def test_a_lung_without_vessels_or_without_lung_gets_none_and_the_batch_is_per_slice():
    image, field, lines = _slice()
    flat = torch.full_like(image, 0.15) + 0.02 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    both = vessel_mask(torch.cat([image, flat]), torch.cat([field, field]))
    assert torch.equal(both[0], vessel_mask(image, field)[0])
    assert both[1].float().mean() < 0.01  # noise above the slice's own threshold only
    assert not vessel_mask(image, torch.zeros_like(field)).any()


def _dark_windowed(size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """COVID-SemiSeg's darker unlabeled slices: lung ~0.08, chest wall ~0.3 with ribs, a field that
    takes in the wall up to the ribs. Returns image, field, lines (vessels), ribs, and the radius map."""
    g = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    radius = size * 0.33
    image = torch.zeros(size, size)
    image[r < radius + 12] = 0.3  # chest wall
    image[r < radius] = 0.08  # lung
    ribs = (r > radius + 3) & (r < radius + 5) & ((torch.atan2(yy - size / 2, xx - size / 2) * 6).cos() > 0.3)
    image[ribs] = 0.5
    lines = (((yy - xx).abs() <= 1) | ((yy + xx - size).abs() <= 1)) & (r < radius - 6)
    image[lines] = 0.25
    image = (image + 0.01 * torch.randn(size, size, generator=g)).clamp(0, 1)[None, None]
    field = (r < radius + 7).long()[None]
    return image, field, lines, ribs, r / radius


def test_on_a_dark_windowed_slice_bright_bits_of_the_chest_wall_inside_the_field_are_not_vessels():
    """COVID-SemiSeg's unlabeled slices come darker (lung ~0.08, chest wall ~0.3): a fixed background
    limit took the ribs' edges in the field's rim for vessels; the slice's own levels do not."""
    image, field, lines, ribs, _ = _dark_windowed()
    found = vessel_mask(image, field)[0]
    assert not (found & ribs).any()
    assert (found & lines).sum() > 0.8 * lines.sum()


def test_on_a_lung_masked_slice_the_field_edge_is_not_read_as_vessel():
    """``data.lung_handling: mask`` zeroes everything outside the field: without the body around it
    the opening sinks to black at the field's edge, and the lung's rim came out as a ring of vessel
    where the field takes in more chest wall than the vessel rule's margin (on 12 labeled COVID-SemiSeg
    slices 3.8x the unmasked slices' vessel pixels within 4 px of the field's edge).
    The masked slice must give the vessels the unmasked one gives."""
    image, _, lines = _slice()
    size = image.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    field = ((((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()) < size * 0.35 + 5).long()[None]  # wall, fat
    masked = torch.where(field[:, None] > 0, image, torch.zeros_like(image))
    found, on_masked = vessel_mask(image, field)[0], vessel_mask(masked, field)[0]
    assert (on_masked & lines[0]).sum() > 0.8 * lines[0].sum()
    agree = (found & on_masked).sum() / (found | on_masked).sum()
    assert agree > 0.95, float(agree)
