"""One image -> exactly aligned (HR, LR, mask-label) tiles, following the SRDiff / SAM-DiffSR data rules.

1. The HR image is cropped to a multiple of the scale (top-left kept): ``H - H % s``, ``W - W % s``.
2. The LR image is made from the WHOLE cropped HR image with MATLAB-compatible bicubic
   ``imresize(hr, 1/s)`` (so LR tiles carry the context of their neighbours, like the reference).
3. The SPE label map is computed on the full cropped HR image from the masks cropped the same way
   (the SPE formula depends on H and W, so it is always the full HR image's, never a tile's).
4. Tiles start at ``y = 0, step, 2*step, ...`` while ``y < H - thresh`` (likewise ``x``), and are
   ``tile x tile`` pixels, cut short at the image's right/bottom edge: the reference's rule
   (``crop_size`` 320, step = crop_size, ``thresh_size`` 160), so an edge tile is kept only if more
   than ``thresh`` pixels remain, and every kept tile is larger than ``thresh`` in both dimensions.

The HR tile at ``(y, x)`` is ``hr[y:y+t, x:x+t]``; its LR tile is ``lr[y/s:(y+t)/s, x/s:(x+t)/s]``; its mask
tile is ``labels[y:y+t, x:x+t]`` at HR coordinates (the reference cropped the mask with LR coordinates,
lose4578/SAM-DiffSR issue 13). Positions and sizes are multiples of ``s``, so the alignment is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from samdiffsr.imresize import imresize
from samdiffsr.masks.spe import spe_label_map


@dataclass(frozen=True)
class TileSpec:
    """Scale and tiling rule. ``step`` None means ``tile`` (no overlap, as the reference)."""

    scale: int = 4
    tile: int = 320
    step: int | None = None
    thresh: int = 160

    def __post_init__(self):
        s, step = self.scale, self.stride
        if s < 1:
            raise ValueError(f"scale must be >= 1, got {s}")
        for name, value in (("tile", self.tile), ("step", step)):
            if value < s or value % s:
                raise ValueError(f"{name} must be a positive multiple of the scale {s}, got {value}")
        if not 0 <= self.thresh < self.tile:
            raise ValueError(f"thresh must be in [0, tile={self.tile}), got {self.thresh}")

    @property
    def stride(self) -> int:
        return self.tile if self.step is None else self.step


@dataclass
class Tile:
    """One aligned tile: HR position ``(y, x)``; ``labels`` is None when the image has no mask data."""

    y: int
    x: int
    hr: np.ndarray
    lr: np.ndarray
    labels: np.ndarray | None


@dataclass
class PreparedImage:
    """The mod-cropped HR image, its whole-image LR, and the SPE label map (or None) with its value table."""

    hr: np.ndarray
    lr: np.ndarray
    labels: np.ndarray | None
    values: np.ndarray | None
    scale: int

    @property
    def num_masks(self) -> int:
        return 0 if self.values is None else int(self.values.size - 1)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``scale``."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def prepare_image(image: np.ndarray, masks: np.ndarray | None, scale: int) -> PreparedImage:
    """Mod-crop ``image`` (uint8 H x W x 3), make its whole-image LR and the SPE labels of ``masks``.

    ``masks`` is bool K x H x W at the image's original size (or None: no mask data). Raises ValueError if
    the cropped image is empty.
    """
    hr = np.ascontiguousarray(mod_crop(image, scale))
    if hr.shape[0] == 0 or hr.shape[1] == 0:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is smaller than the scale {scale}")
    lr = imresize(hr, output_shape=(hr.shape[0] // scale, hr.shape[1] // scale))
    labels = values = None
    if masks is not None:
        if masks.shape[1:] != image.shape[:2]:
            raise ValueError(f"masks {masks.shape[1:]} do not match the image {image.shape[:2]}")
        labels, values = spe_label_map(masks[:, : hr.shape[0], : hr.shape[1]])
    return PreparedImage(hr=hr, lr=lr, labels=labels, values=values, scale=scale)


def tile_starts(length: int, step: int, thresh: int) -> list[int]:
    """Tile starts along one side: ``0, step, ...`` while ``start < length - thresh``."""
    return list(range(0, max(length - thresh, 0), step))


def tile_positions(height: int, width: int, spec: TileSpec) -> list[tuple[int, int]]:
    """HR ``(y, x)`` of every tile of a cropped HR image, row by row."""
    ys = tile_starts(height, spec.stride, spec.thresh)
    xs = tile_starts(width, spec.stride, spec.thresh)
    return [(y, x) for y in ys for x in xs]


def cut_tile(image: PreparedImage, y: int, x: int, tile: int) -> Tile:
    """The tile at HR ``(y, x)``: HR, LR (at ``(y/s, x/s)``) and labels (at HR ``(y, x)``)."""
    s = image.scale
    if y % s or x % s or tile % s:
        raise ValueError(f"tile position ({y}, {x}) and size {tile} must be multiples of the scale {s}")
    hr = image.hr[y : y + tile, x : x + tile]
    lr = image.lr[y // s : (y + tile) // s, x // s : (x + tile) // s]
    labels = None if image.labels is None else image.labels[y : y + tile, x : x + tile]
    return Tile(y=y, x=x, hr=hr, lr=lr, labels=labels)


def iter_tiles(image: PreparedImage, spec: TileSpec) -> Iterator[Tile]:
    """All tiles of a prepared image in :func:`tile_positions` order."""
    if image.scale != spec.scale:
        raise ValueError(f"image prepared at scale {image.scale}, spec says {spec.scale}")
    for y, x in tile_positions(image.hr.shape[0], image.hr.shape[1], spec):
        yield cut_tile(image, y, x, spec.tile)
