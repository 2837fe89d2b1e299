"""Tiling on real photos: HR, LR and SPE mask tiles are exactly aligned with the whole-image results."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from samdiffsr.imresize import imresize
from samdiffsr.masks.classical import FelzenszwalbMasker
from samdiffsr.masks.rle import records_to_masks
from samdiffsr.masks.spe import spe_map
from samdiffsr.sharding.tiles import (
    TileSpec,
    cut_tile,
    iter_tiles,
    mod_crop,
    prepare_image,
    tile_positions,
)


@pytest.fixture(scope="module")
def chelsea():
    """A real photo whose sides (300 x 451) are not multiples of 4, with real (Felzenszwalb) masks."""
    image = skimage.data.chelsea()
    masks = records_to_masks(FelzenszwalbMasker()(image), image.shape[:2])
    assert masks.shape[0] > 5
    return image, masks


def reference_positions(h, w, tile, thresh, step):
    """The reference's loop (data_gen/utils.py), written out independently."""
    out = []
    x = 0
    while x < h - thresh:
        y = 0
        while y < w - thresh:
            out.append((x, y))
            y += step
        x += step
    return out


@pytest.mark.parametrize("size", [(512, 512), (300, 448), (480, 480), (481, 640), (160, 800), (1408, 1000)])
@pytest.mark.parametrize("spec", [TileSpec(), TileSpec(scale=4, tile=96, step=64, thresh=48), TileSpec(2, 64, 64, 0)])
def test_positions_follow_the_reference_rule(size, spec):
    h, w = size
    positions = tile_positions(h, w, spec)
    assert positions == reference_positions(h, w, spec.tile, spec.thresh, spec.stride)
    for y, x in positions:
        assert y % spec.scale == 0 and x % spec.scale == 0
        assert min(h - y, spec.tile) > spec.thresh and min(w - x, spec.tile) > spec.thresh


def test_tile_spec_rejects_misaligned_sizes():
    for bad in (dict(tile=322), dict(step=30), dict(thresh=320), dict(thresh=-1), dict(scale=0)):
        with pytest.raises(ValueError):
            TileSpec(**bad)


def test_prepare_image_uses_the_whole_image(chelsea):
    image, masks = chelsea
    prepared = prepare_image(image, masks, 4)
    hr = image[:300, :448]
    assert prepared.hr.shape == (300, 448, 3) and np.array_equal(prepared.hr, hr)
    assert np.array_equal(prepared.lr, imresize(hr, 0.25))
    assert prepared.lr.shape == (75, 112, 3)
    full = spe_map(masks[:, :300, :448])  # computed independently of the label form
    assert prepared.values.dtype == np.float32
    assert np.array_equal(prepared.values[prepared.labels], full)
    assert prepared.num_masks == masks.shape[0]
    assert np.array_equal(mod_crop(image, 4), hr)


def test_tiles_align_exactly_with_whole_image_lr_and_mask(chelsea):
    image, masks = chelsea
    spec = TileSpec(scale=4, tile=128, step=96, thresh=48)  # overlapping tiles, cut-short edges
    prepared = prepare_image(image, masks, 4)
    hr = image[:300, :448]
    lr_whole = imresize(hr, 0.25)
    map_whole = spe_map(masks[:, :300, :448])
    tiles = list(iter_tiles(prepared, spec))
    assert [(t.y, t.x) for t in tiles] == tile_positions(300, 448, spec)
    edge_sizes = set()
    lr_differs_from_tile_resize = False
    for t in tiles:
        y, x = t.y, t.x
        assert np.array_equal(t.hr, hr[y : y + 128, x : x + 128])
        assert np.array_equal(t.lr, lr_whole[y // 4 : (y + 128) // 4, x // 4 : (x + 128) // 4])
        assert t.lr.shape[0] * 4 == t.hr.shape[0] and t.lr.shape[1] * 4 == t.hr.shape[1]
        assert np.array_equal(prepared.values[t.labels], map_whole[y : y + 128, x : x + 128])
        edge_sizes.add(t.hr.shape[:2])
        lr_differs_from_tile_resize |= not np.array_equal(t.lr, imresize(t.hr, 0.25))
    assert len(edge_sizes) > 1  # some edge tiles are cut short
    assert lr_differs_from_tile_resize  # LR comes from the whole image, not from the tile


def test_mask_tile_is_not_cut_with_lr_coordinates(chelsea):
    """The reference bug (mask cropped at y/s, x/s) would give a different tile: the test can tell."""
    image, masks = chelsea
    prepared = prepare_image(image, masks, 4)
    full = prepared.values[prepared.labels]
    t = cut_tile(prepared, 128, 192, 96)
    ours = prepared.values[t.labels]
    buggy = full[128 // 4 : 128 // 4 + 96, 192 // 4 : 192 // 4 + 96]
    assert np.array_equal(ours, full[128:224, 192:288])
    assert not np.array_equal(ours, buggy)


def test_no_masks_and_misaligned_requests(chelsea):
    image, _ = chelsea
    prepared = prepare_image(image, None, 4)
    assert prepared.labels is None and prepared.num_masks == 0
    assert all(t.labels is None for t in iter_tiles(prepared, TileSpec(4, 160, None, 80)))
    with pytest.raises(ValueError):
        cut_tile(prepared, 2, 0, 64)
    with pytest.raises(ValueError):
        prepare_image(image[:3], None, 4)
    with pytest.raises(ValueError):
        list(iter_tiles(prepared, TileSpec(scale=2, tile=64, thresh=0)))
