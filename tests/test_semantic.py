"""The semantic map: infection overrides lung (and vessel, and chest wall), one-hot layout, lungmask's label remap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plsynth.data.semantic import (
    CLASS_NAMES,
    INFECTION,
    LEFT_LUNG,
    NUM_CLASSES,
    RIGHT_LUNG,
    VESSEL,
    from_lungmask_labels,
    map_classes,
    one_hot,
    semantic_map,
)


def _example(rng: np.random.Generator, shape=(2, 7, 9)) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 3, size=shape).astype(np.uint8), (rng.random(shape) < 0.3).astype(np.uint8)


def test_infection_overrides_lung_and_keeps_infection_outside_the_lung():
    lung, infection = _example(np.random.default_rng(0))
    sem = semantic_map(lung, infection)
    assert sem.dtype == np.uint8
    assert np.all(sem[infection > 0] == INFECTION)
    assert np.array_equal(sem[infection == 0], lung[infection == 0])
    assert np.any((lung == 0) & (infection > 0)) and np.all(sem[(lung == 0) & (infection > 0)] == INFECTION)


def test_torch_and_numpy_give_the_same_map():
    lung, infection = _example(np.random.default_rng(1), shape=(3, 1, 5, 6))
    sem_t = semantic_map(torch.from_numpy(lung), torch.from_numpy(infection))
    assert sem_t.dtype == torch.int64
    assert np.array_equal(sem_t.numpy(), semantic_map(lung, infection))


def test_semantic_map_rejects_mismatched_shapes_and_bad_lung_labels():
    with pytest.raises(ValueError, match="shape"):
        semantic_map(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="0..2"):
        semantic_map(np.full((4, 4), 3, np.uint8), np.zeros((4, 4), np.uint8))


def test_one_hot_puts_classes_before_height_and_width():
    lung, infection = _example(np.random.default_rng(2), shape=(2, 5, 7))
    sem = semantic_map(lung, infection)
    encoded = one_hot(torch.from_numpy(sem))
    assert encoded.shape == (2, NUM_CLASSES, 5, 7) and encoded.dtype == torch.float32
    assert torch.all(encoded.sum(dim=1) == 1)
    assert torch.equal(encoded.argmax(dim=1), torch.from_numpy(sem).long())
    encoded_np = one_hot(sem)
    assert encoded_np.shape == (2, NUM_CLASSES, 5, 7)
    assert np.array_equal(encoded_np, encoded.numpy())
    with pytest.raises(ValueError):
        one_hot(np.full((3, 3), 4))


def test_lungmask_labels_are_swapped_to_the_project_contract():
    fake = np.array([[0, 1, 1, 2], [2, 2, 0, 1]], dtype=np.uint8)  # lungmask: 1 right, 2 left
    ours = from_lungmask_labels(fake)
    assert np.array_equal(ours == LEFT_LUNG, fake == 2)
    assert np.array_equal(ours == RIGHT_LUNG, fake == 1)
    assert np.array_equal(ours == 0, fake == 0)
    assert torch.equal(from_lungmask_labels(torch.from_numpy(fake)), torch.from_numpy(ours))
    with pytest.raises(ValueError, match="lobe"):
        from_lungmask_labels(np.array([0, 5]))


def test_class_names_follow_the_contract():
    assert NUM_CLASSES == map_classes(False) == 4 and map_classes(True) == 5
    assert CLASS_NAMES[VESSEL] == "vessel" and CLASS_NAMES[INFECTION] == "infection"
    assert CLASS_NAMES[LEFT_LUNG] == "left lung" and CLASS_NAMES[RIGHT_LUNG] == "right lung"


def test_a_vessel_is_marked_only_inside_the_lung_and_infection_overrides_it():
    lung, infection = _example(np.random.default_rng(3))
    vessel = (np.random.default_rng(4).random(lung.shape) < 0.4).astype(np.uint8)
    sem = semantic_map(lung, infection, vessel)
    assert np.all(sem[infection > 0] == INFECTION)
    inside = (vessel > 0) & (lung > 0) & (infection == 0)
    assert inside.any() and np.all(sem[inside] == VESSEL)
    outside = (vessel > 0) & (lung == 0) & (infection == 0)
    assert outside.any() and np.all(sem[outside] == 0)
    assert np.array_equal(sem[vessel == 0], semantic_map(lung, infection)[vessel == 0])
    as_tensor = semantic_map(torch.from_numpy(lung), torch.from_numpy(infection), torch.from_numpy(vessel))
    assert np.array_equal(as_tensor.numpy(), sem)
    assert one_hot(sem, map_classes(True)).shape == (2, 5, 7, 9)
