"""Flips and rotations move image, lung and label together; lungs keep the patient's side."""

from __future__ import annotations

import torch

from plsynth.training.augment import apply_transforms, augment, random_transforms


def _scene(n: int = 6, size: int = 33):
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(n, 1, size, size)
    lung = torch.zeros(n, size, size, dtype=torch.long)
    lung[:, 5:28, 3:15] = 2  # patient right lung on the image's left (radiological view)
    lung[:, 5:28, 18:30] = 1  # patient left lung on the image's right
    for i in range(n):
        r, c = torch.randint(8, 20, (2,), generator=g).tolist()
        label[i, 0, r : r + 6, c : c + 5] = 1.0
    image = 0.3 * (lung[:, None] > 0).float() + 0.6 * label
    return image, lung, label


def test_horizontal_flip_mirrors_all_three_and_swaps_left_and_right_lung():
    image, lung, label = _scene(2)
    theta, _ = random_transforms(2, torch.Generator().manual_seed(0), flip=False, rotate_degrees=0.0)
    theta[:, 0, 0] = -1.0  # horizontal flip only
    hflip = torch.tensor([True, True])
    out_image, out_lung, out_label = apply_transforms(theta, hflip, image, lung, label)
    assert torch.allclose(out_image, image.flip(-1), atol=1e-6)
    assert torch.equal(out_label, label.flip(-1))
    mirrored = lung.flip(-1)
    expected = torch.where(mirrored == 1, 2, torch.where(mirrored == 2, 1, mirrored))
    assert torch.equal(out_lung, expected)
    # The patient's left lung (1) is again on the image's right (larger column index).
    cols = torch.nonzero(out_lung[0] == 1)[:, 1].float().mean()
    assert cols > out_lung.shape[-1] / 2


def test_random_rotation_keeps_labels_on_the_image_content_and_masks_discrete():
    image, lung, label = _scene()
    out_image, out_lung, out_label = augment(image, lung, label, generator=torch.Generator().manual_seed(5),
                                             flip=True, rotate_degrees=20.0)
    assert out_image.shape == image.shape and out_lung.dtype == torch.long and out_label.shape == label.shape
    assert set(out_lung.unique().tolist()) <= {0, 1, 2}
    assert set(out_label.unique().tolist()) <= {0.0, 1.0}
    # The label was drawn as the brightest part of the image: after the joint transform the
    # pixels above 0.75 still lie (almost all) under the moved label.
    bright = out_image > 0.75
    agreement = (bright & (out_label > 0)).sum() / bright.sum()
    assert agreement > 0.9
    assert not torch.equal(out_label, label)  # something actually moved


def test_same_generator_seed_gives_the_same_transform_and_off_is_identity():
    image, lung, label = _scene()
    a = augment(image, lung, label, generator=torch.Generator().manual_seed(9), rotate_degrees=15.0)
    b = augment(image, lung, label, generator=torch.Generator().manual_seed(9), rotate_degrees=15.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    same = augment(image, lung, label, generator=torch.Generator().manual_seed(9), flip=False, rotate_degrees=0.0)
    assert same[0] is image and same[1] is lung and same[2] is label
