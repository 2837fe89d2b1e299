"""SPE: the closed form against the written-out formula and against rotary-embedding-torch (the authors' tool)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from references import require

from samdiffsr.masks.spe import spe_label_map, spe_map, spe_table, spe_values


def formula_table(height: int, width: int) -> np.ndarray:
    """R written out element by element; an odd width's last column is the unrotated 1."""
    table = np.ones((height, width))
    for r in range(height):
        for c in range(width - width % 2):
            f = 10000.0 ** (-2 * (c // 2) / width)
            sign = -1.0 if c % 2 == 0 else 1.0
            table[r, c] = math.cos(r * f) + sign * math.sin(r * f)
    return table


def random_masks(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """Overlapping rectangles and blobs, plus one full-image mask, in a fixed order."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    masks = []
    for _ in range(count):
        r0, c0 = rng.integers(0, height), rng.integers(0, width)
        if rng.random() < 0.5:
            masks.append((yy >= r0) & (yy < r0 + rng.integers(1, height)) & (xx >= c0) & (xx < c0 + 7))
        else:
            radius = rng.uniform(1, max(height, width) / 3)
            masks.append((yy - r0) ** 2 + (xx - c0) ** 2 <= radius**2)
    masks.insert(count // 2, np.ones((height, width), bool))
    return np.stack(masks)


def rotary_oracle():
    """rotary-embedding-torch 0.5.x, the authors' version (0.9.x refuses odd widths); test-only."""
    return require("rotary_embedding_torch", "rotary-embedding-torch", "0.5.").RotaryEmbedding


def authors_map(masks: np.ndarray) -> np.ndarray:
    """The authors' procedure: rotate an all-ones (1, 1, H, W) tensor, mean over mask products, overwrite."""
    _, height, width = masks.shape
    table = rotary_oracle()(dim=width).rotate_queries_or_keys(torch.ones(1, 1, height, width))
    merged = torch.zeros(1, 1, height, width)
    for mask in masks:
        inside = torch.from_numpy(mask.astype(np.uint8))[None, None]
        value = (table * inside).mean()
        merged = torch.where(inside.bool(), torch.ones(1, 1, height, width) * value, merged)
    return merged[0, 0].numpy()


@pytest.mark.parametrize("height, width", [(7, 10), (6, 9), (1, 1), (5, 2), (3, 17)])
def test_table_matches_formula(height, width):
    np.testing.assert_allclose(spe_table(height, width), formula_table(height, width), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("height, width", [(37, 64), (50, 33), (128, 96), (96, 127), (9, 1)])
def test_table_matches_rotary_embedding(height, width):
    rope = rotary_oracle()(dim=width)
    theirs = rope.rotate_queries_or_keys(torch.ones(1, 1, height, width))[0, 0].double().numpy()
    # The library works in float32; its angle error grows with the row index.
    np.testing.assert_allclose(spe_table(height, width), theirs, rtol=0, atol=2e-5)
    if width % 2:
        np.testing.assert_array_equal(theirs[:, -1], 1.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("height, width, count", [(48, 64, 9), (41, 37, 12)])
def test_map_reproduces_authors_procedure(height, width, count):
    masks = random_masks(count, height, width, seed=height)
    got = spe_map(masks)
    assert got.dtype == np.float32 and got.shape == (height, width)
    np.testing.assert_allclose(got, authors_map(masks), rtol=0, atol=1e-6)


def test_values_are_whole_image_means():
    height, width = 30, 25
    masks = random_masks(6, height, width, seed=1)
    table = formula_table(height, width)
    expected = [(table * m).sum() / (height * width) for m in masks]
    got = spe_values(masks)
    assert got.dtype == np.float32 and got.shape == (7,)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    single = np.zeros((1, height, width), bool)
    single[0, 11, 4] = True
    np.testing.assert_allclose(spe_values(single), [table[11, 4] / (height * width)], rtol=1e-6)


def test_later_masks_overwrite_but_values_use_full_masks():
    height, width = 20, 16
    first = np.zeros((height, width), bool)
    first[2:12, 1:15] = True
    second = np.zeros((height, width), bool)
    second[8:18, 5:10] = True
    table = formula_table(height, width)
    v_first = (table * first).sum() / (height * width)
    v_second = (table * second).sum() / (height * width)
    got = spe_map(np.stack([first, second]))
    np.testing.assert_allclose(got[second], v_second, rtol=1e-6)
    np.testing.assert_allclose(got[first & ~second], v_first, rtol=1e-6)  # not the visible part's value
    assert not np.isclose(v_first, (table * (first & ~second)).sum() / (height * width))
    np.testing.assert_array_equal(got[~(first | second)], 0.0)
    swapped = spe_map(np.stack([second, first]))
    np.testing.assert_allclose(swapped[first], v_first, rtol=1e-6)


def test_label_map_is_the_compact_form():
    masks = random_masks(8, 33, 40, seed=5)
    labels, values = spe_label_map(masks)
    assert labels.dtype == np.uint16 and labels.shape == (33, 40)
    assert values.dtype == np.float32 and values.shape == (masks.shape[0] + 1,) and values[0] == 0
    np.testing.assert_array_equal(values[1:], spe_values(masks))
    last = np.zeros((33, 40), np.uint16)
    for k, m in enumerate(masks):
        last[m] = k + 1
    np.testing.assert_array_equal(labels, last)
    np.testing.assert_array_equal(values[labels], spe_map(masks))


def test_no_masks_and_empty_masks_give_zeros():
    labels, values = spe_label_map(np.zeros((0, 12, 9), bool))
    np.testing.assert_array_equal(labels, 0)
    np.testing.assert_array_equal(values, [0.0])
    np.testing.assert_array_equal(spe_map(np.zeros((0, 12, 9), bool)), np.zeros((12, 9), np.float32))
    masks = np.zeros((2, 12, 9), bool)
    masks[1, 3:5, 3:5] = True
    labels, values = spe_label_map(masks)
    assert values[1] == 0 and values[2] != 0
    assert set(np.unique(labels)) == {0, 2}


def test_numeric_masks_count_nonzero_as_inside():
    masks = random_masks(5, 24, 30, seed=9)
    np.testing.assert_array_equal(spe_map(masks.astype(np.uint8)), spe_map(masks))
    np.testing.assert_array_equal(spe_map(masks.astype(np.float32) * 3), spe_map(masks))


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        spe_map(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="at most"):
        spe_label_map(np.zeros((70000, 1, 1), bool))
    with pytest.raises(TypeError, match="bool or numeric"):
        spe_map(np.zeros((1, 2, 2), dtype=object))
