"""A no-weights fallback masker: Felzenszwalb's graph segmentation (scikit-image) in SAM's record format.

It is not SAM: its regions partition the whole image (SAM's masks overlap and leave gaps) and it has no
quality scores. Records therefore carry ``predicted_iou: null`` and ``stability_score: null``;
``point_coords`` is the region's pixel nearest its centroid (the counterpart of SAM's prompt point) and
``crop_box`` the whole image. Records are sorted by area, largest first (ties by position), like SAM's
output tends to be.
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb

from samdiffsr.masks.rle import masks_to_records


class FelzenszwalbMasker:
    """Callable image -> amg-format records from ``skimage.segmentation.felzenszwalb``.

    ``min_size`` None means max(20, H*W // 1000) pixels, which bounds an image to 1000 regions (typical photos
    give 40-150, a count like SAM's).
    """

    name = "felzenszwalb"

    def __init__(self, scale: float = 300.0, sigma: float = 0.8, min_size: int | None = None):
        self.scale, self.sigma, self.min_size = scale, sigma, min_size
        self.settings = {"scale": scale, "sigma": sigma, "min_size": min_size}

    def __call__(self, image: np.ndarray) -> list[dict]:
        """Regions of an RGB uint8 H x W x 3 image as amg records, largest first."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 image H x W x 3, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        min_size = self.min_size if self.min_size is not None else max(20, h * w // 1000)
        labels = felzenszwalb(image, scale=self.scale, sigma=self.sigma, min_size=min_size)
        _, labels = np.unique(labels, return_inverse=True)  # consecutive ids 0..K-1
        labels = labels.reshape(h, w)
        areas = np.bincount(labels.ravel())
        points = _points_nearest_centroids(labels, areas)
        order = sorted(range(len(areas)), key=lambda k: (-areas[k], points[k][1], points[k][0]))
        records = []
        for start in range(0, len(order), 32):  # chunks keep memory at 32 masks, not K
            ids = order[start : start + 32]
            records += masks_to_records(
                labels[None] == np.asarray(ids)[:, None, None],
                predicted_iou=[None] * len(ids),
                point_coords=[[points[k]] for k in ids],
                stability_score=[None] * len(ids),
                crop_box=[[0, 0, w, h]] * len(ids),
            )
        return records


def _points_nearest_centroids(labels: np.ndarray, areas: np.ndarray) -> list[list[float]]:
    """For each label, the [x, y] of its pixel nearest its centroid (the first in raster order on ties)."""
    ys, xs = np.indices(labels.shape).reshape(2, -1)
    flat = labels.ravel()
    cy = np.bincount(flat, weights=ys) / areas
    cx = np.bincount(flat, weights=xs) / areas
    dist = (ys - cy[flat]) ** 2 + (xs - cx[flat]) ** 2
    order = np.lexsort((dist, flat))  # by label, then distance; stable keeps raster order on ties
    first = order[np.searchsorted(flat[order], np.arange(len(areas)))]
    return [[float(xs[i]), float(ys[i])] for i in first]
