"""Structural position encoding (SPE): SAM masks -> one float map, the paper's RoPE variant in closed form.

For an ``H x W`` image, the authors rotate an all-ones ``(seq=H, dim=W)`` tensor with
``rotary_embedding_torch.RotaryEmbedding(dim=W)``. Written out, the rotated table is

    R[r, 2i]   = cos(r * f_i) - sin(r * f_i)
    R[r, 2i+1] = cos(r * f_i) + sin(r * f_i),     f_i = 10000 ** (-2i / W),

rows ``r`` being positions and columns features. For an odd ``W`` the library (0.5.x) rotates only the
first ``W - 1`` columns and passes the last one through, so ``R[:, W-1] = 1``; we do the same so that the
authors' data is reproduced (0.9.x of the library refuses odd dimensions).

Mask ``k`` (in file order) gets the scalar ``v_k = sum(R * mask_k) / (H * W)``: a mean over the whole
image, not over the mask. The map starts at 0 and each mask in order writes ``v_k`` on its pixels, later
masks overwriting earlier ones; ``v_k`` always uses the full mask, overwritten pixels included. No masks
give an all-zero map.

We compute in float64 and return float32; the library works in float32, so our values differ from the
authors' files by float32 rounding only.

Masks are ``(K, H, W)`` arrays, bool or numeric (any nonzero value counts as inside). Each mask is only
visited inside its bounding box, so SAM's many small masks cost little even on 2K images.
"""

from __future__ import annotations

import numpy as np

THETA = 10000.0
MAX_MASKS = int(np.iinfo(np.uint16).max)  # labels are uint16 and 0 means "no mask"


def spe_table(height: int, width: int) -> np.ndarray:
    """The rotated all-ones table ``R`` (float64, ``height x width``)."""
    if height < 1 or width < 1:
        raise ValueError(f"table size must be positive, got {height} x {width}")
    half = width // 2
    freqs = THETA ** (-2.0 * np.arange(half) / width)
    angles = np.arange(height, dtype=np.float64)[:, None] * freqs[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    table = np.empty((height, width), dtype=np.float64)
    pairs = table[:, : 2 * half].reshape(height, half, 2)
    np.subtract(cos, sin, out=pairs[:, :, 0])
    np.add(cos, sin, out=pairs[:, :, 1])
    if width % 2:
        table[:, -1] = 1.0  # the unrotated pass-through column of an odd width
    return table


def _check_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be a (K, H, W) array, got shape {masks.shape}")
    if masks.shape[1] < 1 or masks.shape[2] < 1:
        raise ValueError(f"masks have an empty image size {masks.shape[1:]}")
    if not (masks.dtype == np.bool_ or np.issubdtype(masks.dtype, np.number)):
        raise TypeError(f"masks must be bool or numeric, got {masks.dtype}")
    if masks.shape[0] > MAX_MASKS:
        raise ValueError(f"at most {MAX_MASKS} masks per image are supported, got {masks.shape[0]}")
    return masks


def _crop(mask: np.ndarray) -> tuple[slice, slice, np.ndarray] | None:
    """Bounding box of a 2-D mask as slices plus the boolean crop; None for an empty mask."""
    mask = mask if mask.dtype == np.bool_ else mask != 0
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    band = mask[rows[0] : rows[-1] + 1]
    cols = np.flatnonzero(band.any(axis=0))
    rs, cs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    return rs, cs, band[:, cs]


def _encode(masks: np.ndarray, with_labels: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Shared pass over the masks: (labels or None, float64 per-mask values)."""
    masks = _check_masks(masks)
    count, height, width = masks.shape
    values = np.zeros(count, dtype=np.float64)
    labels = np.zeros((height, width), dtype=np.uint16) if with_labels else None
    if count == 0:
        return labels, values
    table = spe_table(height, width)
    for k in range(count):
        crop = _crop(masks[k])
        if crop is None:
            continue
        rs, cs, inside = crop
        values[k] = table[rs, cs][inside].sum() / (height * width)
        if labels is not None:
            labels[rs, cs][inside] = k + 1
    return labels, values


def spe_values(masks: np.ndarray) -> np.ndarray:
    """Per-mask SPE values ``v_k`` (float32, shape ``(K,)``) for ``(K, H, W)`` masks."""
    return _encode(masks, with_labels=False)[1].astype(np.float32)


def spe_label_map(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SPE map in compact form: ``(labels, values)`` with ``values[labels]`` the map.

    ``labels`` is uint16 ``H x W``: 1 + the index of the last mask covering the pixel, 0 where none does.
    ``values`` is float32 of length ``K + 1``: ``values[0] = 0`` and ``values[k + 1] = v_k``.
    """
    labels, values = _encode(masks, with_labels=True)
    return labels, np.concatenate([[0.0], values]).astype(np.float32)


def spe_map(masks: np.ndarray) -> np.ndarray:
    """The SPE mask map, float32 ``H x W`` (all zeros without masks)."""
    labels, values = spe_label_map(masks)
    return values[labels]
