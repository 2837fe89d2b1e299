"""MATLAB-compatible bicubic ``imresize``: numpy for data preparation, batched torch for the device.

Follows MATLAB's ``imresize(A, scale)`` / ``imresize(A, [rows cols])`` with the default ``'bicubic'``
method and antialiasing:

- Keys cubic kernel (a = -0.5), width 4; when downscaling (scale < 1) the kernel is stretched by
  ``1/scale`` and its height scaled by ``scale`` (antialiasing).
- Output pixel ``x`` (1-based) maps to input coordinate ``u = x/scale + 0.5*(1 - 1/scale)``; the taps are
  ``floor(u - width/2) + 0 .. ceil(width) + 1``, their weights normalised to sum 1; indices past the border
  are mirrored with the edge pixel repeated (``1..n, n..1``, periodic).
- Output size ``ceil(scale * size)``; with an explicit output shape the per-dimension scale is
  ``out / in``.
- The image is resized one dimension at a time, the dimension with the smaller scale first (row first on
  ties).
- uint8 images are rounded and saturated after *each* dimension, as MATLAB does (its resize kernel
  returns the input's class). Rounding is MATLAB's: half away from zero, so an exact ``x.5`` goes up.
  Such exact ties are common, because for scales like 1/4 or 2 all weights are dyadic fractions and the
  arithmetic is exact. (The authors' numpy port rounds half to even, which differs on those ties only.)
- Floating-point images are not clipped and keep their dtype.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

KERNEL_WIDTH = 4.0


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


@lru_cache(maxsize=128)
def contributions(in_length: int, out_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's ``contributions``: per output pixel, the taps' weights and 0-based input indices.

    Returns read-only ``(weights, indices)`` of shape ``(out_length, P)``, float64 and int64; taps whose
    weight is zero for every output pixel are dropped, as MATLAB does.
    """
    if scale < 1:
        width = KERNEL_WIDTH / scale

        def kernel(x: np.ndarray) -> np.ndarray:
            return scale * _cubic(scale * x)
    else:
        width = KERNEL_WIDTH
        kernel = _cubic
    u = np.arange(1, out_length + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps)  # 1-based, as in MATLAB
    weights = kernel(u[:, None] - idx)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirror[np.mod(idx.astype(np.int64) - 1, mirror.size)]
    keep = np.any(weights != 0, axis=0)
    weights, indices = weights[:, keep], indices[:, keep]
    weights.setflags(write=False)
    indices.setflags(write=False)
    return weights, indices


@lru_cache(maxsize=128)
def weight_matrix(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """Dense ``(out_length, in_length)`` float64 resampling matrix (mirrored taps accumulated); read-only."""
    weights, indices = contributions(in_length, out_length, scale)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], indices.shape)
    np.add.at(matrix, (rows, indices), weights)
    matrix.setflags(write=False)
    return matrix


def resize_plan(
    in_size: tuple[int, int], scale: float | None, output_shape: tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[float, float], tuple[int, int]]:
    """Output size, per-dimension scales and MATLAB's dimension order for an ``(H, W)`` input."""
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape")
    if any(n < 1 for n in in_size):
        raise ValueError(f"cannot resize an empty image of size {in_size}")
    if scale is not None:
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale}")
        scales = (scale, scale)
        out = (math.ceil(scale * in_size[0]), math.ceil(scale * in_size[1]))
    else:
        if len(output_shape) != 2 or any(int(n) != n or n < 1 for n in output_shape):
            raise ValueError(f"output_shape must be two positive integers, got {output_shape}")
        out = (int(output_shape[0]), int(output_shape[1]))
        scales = (out[0] / in_size[0], out[1] / in_size[1])
    # MATLAB sorts the scales (stably): the stronger reduction is applied first.
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    return out, scales, order


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """Saturate to [0, 255] and round half away from zero (exact; ``floor(x + 0.5)`` is not)."""
    x = np.clip(x, 0.0, 255.0)
    low = np.floor(x)
    return (low + (x - low >= 0.5)).astype(np.uint8)


def _resize_axis(img: np.ndarray, axis: int, in_len: int, out_len: int, scale: float) -> np.ndarray:
    """One MATLAB pass along ``axis`` (0 or 1) in float64, accumulating the taps in order."""
    weights, indices = contributions(in_len, out_len, scale)
    src = np.moveaxis(img, axis, 0)
    shape = (out_len,) + (1,) * (src.ndim - 1)
    out = np.zeros((out_len,) + src.shape[1:], dtype=np.float64)
    for p in range(weights.shape[1]):
        out += weights[:, p].reshape(shape) * src[indices[:, p]]
    return np.moveaxis(out, 0, axis)


def imresize(
    img: np.ndarray, scale: float | None = None, output_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize an ``H x W`` or ``H x W x C`` image like MATLAB's bicubic ``imresize``.

    Give either ``scale`` (output size ``ceil(scale * size)``) or ``output_shape=(rows, cols)``. uint8
    in -> uint8 out (MATLAB rounding after each dimension); float in -> the same float dtype out,
    computed in float64, not clipped.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an H x W or H x W x C image, got shape {img.shape}")
    is_uint8 = img.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(img.dtype, np.floating)):
        raise TypeError(f"imresize supports uint8 and floating-point images, got {img.dtype}")
    out_size, scales, order = resize_plan(img.shape[:2], scale, output_shape)
    result = img
    for axis in order:
        result = _resize_axis(result, axis, result.shape[axis], out_size[axis], scales[axis])
        if is_uint8:
            result = _round_half_away(result)
    return result if is_uint8 else result.astype(img.dtype, copy=False)


@lru_cache(maxsize=64)
def _torch_weight_matrix(
    in_length: int, out_length: int, scale: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return torch.tensor(weight_matrix(in_length, out_length, scale), dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _torch_taps(
    in_length: int, out_length: int, scale: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    weights, indices = contributions(in_length, out_length, scale)
    return (
        torch.tensor(weights, dtype=torch.float64, device=device),
        torch.tensor(indices, dtype=torch.int64, device=device),
    )


def _round_half_away_torch(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 255.0)
    low = torch.floor(x)
    return low + (x - low >= 0.5).to(x.dtype)


def _resize_axis_uint8_torch(y: torch.Tensor, dim: int, out_len: int, scale: float) -> torch.Tensor:
    """One rounded float64 pass that sums the taps in the same order as :func:`imresize`.

    A matrix product would sum in another order; on pixels that sit on an exact .5 tie in exact
    arithmetic (common: symmetric taps midway between two pixels) that flips the rounding.
    """
    weights, indices = _torch_taps(y.shape[dim], out_len, scale, y.device)
    shape = [out_len, 1] if dim == -2 else [out_len]
    out = torch.zeros(*y.shape[:dim], out_len, *y.shape[dim:][1:], dtype=y.dtype, device=y.device)
    for p in range(weights.shape[1]):
        out += weights[:, p].reshape(shape) * y.index_select(dim, indices[:, p])
    return _round_half_away_torch(out)


def imresize_torch(
    x: torch.Tensor, scale: float | None = None, output_shape: tuple[int, int] | None = None
) -> torch.Tensor:
    """Batched MATLAB bicubic resize of the last two dimensions of ``(..., H, W)`` tensors.

    Floating inputs: two matrix products with dense weight matrices cached per (size, scale, device,
    dtype); the dtype is kept (float16/bfloat16 are computed in float32); differentiable. uint8 inputs
    (data preparation, not the training hot path) are computed in float64 with MATLAB's per-dimension
    rounding, tap by tap, and equal :func:`imresize` exactly.
    """
    if x.ndim < 2:
        raise ValueError(f"expected a (..., H, W) tensor, got shape {tuple(x.shape)}")
    is_uint8 = x.dtype == torch.uint8
    if not (is_uint8 or x.is_floating_point()):
        raise TypeError(f"imresize_torch supports uint8 and floating-point tensors, got {x.dtype}")
    out_size, scales, order = resize_plan(tuple(x.shape[-2:]), scale, output_shape)
    if is_uint8:
        y = x.to(torch.float64)
        for axis in order:
            y = _resize_axis_uint8_torch(y, axis - 2, out_size[axis], scales[axis])
        return y.to(torch.uint8)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute)
    for axis in order:
        matrix = _torch_weight_matrix(y.shape[axis - 2], out_size[axis], scales[axis], y.device, compute)
        y = torch.matmul(matrix, y) if axis == 0 else torch.matmul(y, matrix.T)
    return y.to(x.dtype)
