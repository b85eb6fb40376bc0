"""The real infection's texture laid over drawn infection (``plsynth.models.texture``)."""

from __future__ import annotations

import torch

from plsynth.data.semantic import INFECTION, one_hot
from plsynth.models.texture import PATCH, add_texture, residual_patches, texture_field

torch.set_num_threads(1)


def _slices(n: int = 3, size: int = 48):
    """Slices whose infection (a square) is grainy (std 0.1) on a smooth ramp and whose lung is
    flat at 0.3 with a bright streak, so a patch taken from the wrong place shows."""
    g = torch.Generator().manual_seed(0)
    semantic = torch.ones(n, size, size, dtype=torch.long)
    semantic[:, :, : size // 2] = 2
    semantic[:, 8:40, 8:40] = INFECTION
    ramp = torch.linspace(0.4, 0.6, size)[None, :].expand(size, size)
    images = torch.full((n, 1, size, size), 0.3)
    images[:, 0, :, 45] = 0.9
    grain = 0.1 * torch.randn(n, 1, size, size, generator=g)
    inf = (semantic == INFECTION)[:, None]
    images = torch.where(inf, ramp + grain, images)
    return images, one_hot(semantic, 4)


def test_patches_come_from_the_infection_interior_only():
    images, onehot = _slices()
    patches = residual_patches(images, onehot)
    assert patches.shape[1:] == (PATCH, PATCH) and len(patches) > 10
    # the grain survives the residual (about 0.07-0.1), the lung's streak and the lesion's edge do not reach it
    assert 0.05 < patches.std() < 0.12 and patches.abs().max() < 0.6
    assert len(residual_patches(images, onehot.index_fill(1, torch.tensor([INFECTION]), 0))) == 0
    assert len(residual_patches(images, onehot, max_patches=5)) == 5


def test_the_field_keeps_the_patches_variance_without_seams_and_repeats_with_its_seed():
    g = torch.Generator().manual_seed(1)
    patches = torch.randn(200, PATCH, PATCH, generator=g) * 0.05
    field = texture_field(patches, 2, 64, torch.Generator().manual_seed(3))
    assert field.shape == (2, 1, 64, 64)
    assert 0.04 < field.std() < 0.06
    # no seam: the field's std along rows and columns varies as little at patch borders as elsewhere
    row_std = field[:, 0].std(dim=(0, 2))
    assert row_std.max() / row_std.min() < 1.8
    assert torch.equal(field, texture_field(patches, 2, 64, torch.Generator().manual_seed(3)))
    assert not torch.equal(field, texture_field(patches, 2, 64, torch.Generator().manual_seed(4)))


def test_texture_is_added_inside_the_infection_only():
    images, onehot = _slices(2)
    patches = residual_patches(images, onehot)
    drawn = torch.full_like(images, 0.5)  # a drawing as smooth as the CPU preset's infection
    out = add_texture(drawn, onehot, patches, 1.0, torch.Generator().manual_seed(0))
    inf = onehot[:, INFECTION : INFECTION + 1] > 0
    near = torch.nn.functional.max_pool2d(inf.float(), 3, stride=1, padding=1) > 0
    assert (out - drawn)[~near].abs().max() == 0
    inner = torch.nn.functional.max_pool2d((~inf).float(), 5, stride=1, padding=2) == 0
    assert (out - drawn)[inner].std() > 0.04
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(add_texture(drawn, onehot, patches, 0.0, torch.Generator()), drawn)
    assert torch.equal(add_texture(drawn, onehot, patches[:0], 1.0, torch.Generator()), drawn)
