"""Tiled, batched diffusion sampling: the model's sampler loop over many images and tiles at once.

The non-obvious rule: tiles are blended at EVERY step, not at the end. Each image keeps its full-size
state x_t; per step the UNet predicts the noise of every tile, the predictions are blended with a smooth
window into one full-size prediction, and the model's own update (`models.samplers.sample_loop`) runs on
the whole image, so overlapping tiles share one trajectory. With a single tile an image's result equals
``model.sample`` on it exactly. Design notes: docs/models.md.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from samdiffsr.config import ModelConfig
from samdiffsr.models.diffusion import GaussianDiffusion
from samdiffsr.models.samplers import NoisePredictor, gaussian_like, sample_loop

# The UNet reads every third RRDB trunk feature (cond[2::3]); only those are cached (see _keep_used).
_USED_FEATURE_START, _USED_FEATURE_STEP = 2, 3


def lr_multiple(cfg: ModelConfig) -> int:
    """LR sizes the UNet accepts are multiples of this (its HR input must halve evenly at each level)."""
    hr_multiple = 2 ** (len(cfg.dim_mults) - 1)
    return hr_multiple // math.gcd(hr_multiple, cfg.sr_scale)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` overlap.

    The last tile is aligned to the end, so every tile has the same size. ``tile >= length``: one tile.
    """
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} tile={tile}")
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def _axis_window(start: int, size: int, length: int, ramp: int) -> torch.Tensor:
    """1-D blend weights of one tile along one axis: ramps of ``ramp`` pixels towards neighbours, else 1."""
    w = torch.ones(size, dtype=torch.float32)
    ramp = min(ramp, size)
    if ramp > 0:
        up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp  # strictly positive, < 1
        if start > 0:
            w[:ramp] = torch.minimum(w[:ramp], up)
        if start + size < length:
            w[size - ramp:] = torch.minimum(w[size - ramp:], up.flip(0))
    return w


class TileGrid:
    """How one image (LR size ``lr_hw``, already a multiple of the UNet's) is cut into tiles.

    ``tile`` <= 0 means no tiling. Tile sizes are rounded down to a multiple of ``multiple``.
    """

    def __init__(self, lr_hw: tuple[int, int], tile: int, overlap: int, scale: int, multiple: int = 1):
        h, w = lr_hw
        if h % multiple or w % multiple:
            raise ValueError(f"LR size {lr_hw} is not a multiple of {multiple}; pad it first")
        if tile > 0:
            tile = max(multiple, tile // multiple * multiple)
        th = h if tile <= 0 or tile >= h else tile
        tw = w if tile <= 0 or tile >= w else tile
        self.lr_hw, self.scale, self.tile_lr = (h, w), scale, (th, tw)
        self.ys = tile_starts(h, th, overlap)
        self.xs = tile_starts(w, tw, overlap)
        self.boxes = [(y, x) for y in self.ys for x in self.xs]
        ramp = overlap * scale
        self._wy = [_axis_window(y * scale, th * scale, h * scale, ramp) for y in self.ys]
        self._wx = [_axis_window(x * scale, tw * scale, w * scale, ramp) for x in self.xs]
        self._weight_sum: torch.Tensor | None = None
        self._windows: dict[int, torch.Tensor] = {}  # on the sampling device, built on first use

    def __len__(self) -> int:
        return len(self.boxes)

    def lr_crop(self, t: torch.Tensor, k: int) -> torch.Tensor:
        y, x = self.boxes[k]
        return t[..., y:y + self.tile_lr[0], x:x + self.tile_lr[1]]

    def _hr_slices(self, k: int) -> tuple[slice, slice]:
        y, x = self.boxes[k]
        s, (th, tw) = self.scale, self.tile_lr
        return slice(y * s, (y + th) * s), slice(x * s, (x + tw) * s)

    def hr_crop(self, t: torch.Tensor, k: int) -> torch.Tensor:
        ys, xs = self._hr_slices(k)
        return t[..., ys, xs]

    def window(self, k: int) -> torch.Tensor:
        """HR blend weights of tile ``k``, shape (1, 1, th*s, tw*s)."""
        iy, ix = divmod(k, len(self.xs))
        return (self._wy[iy][:, None] * self._wx[ix][None, :])[None, None]

    def weight_sum(self) -> torch.Tensor:
        """Sum of all tiles' windows over the HR image (positive everywhere), shape (1, 1, H, W)."""
        if self._weight_sum is None:
            s = self.scale
            total = torch.zeros(1, 1, self.lr_hw[0] * s, self.lr_hw[1] * s)
            for k in range(len(self)):
                ys, xs = self._hr_slices(k)
                total[..., ys, xs] += self.window(k)
            self._weight_sum = total
        return self._weight_sum

    def accumulate(self, acc: torch.Tensor | None, k: int, tile: torch.Tensor) -> torch.Tensor:
        """Add tile ``k``'s prediction (1, C, th*s, tw*s) into the running full-size sum ``acc``."""
        if len(self) == 1:
            return tile  # a lone tile is the whole image: no arithmetic, so results stay exact
        if acc is None:
            s = self.scale
            acc = torch.zeros(1, tile.shape[1], self.lr_hw[0] * s, self.lr_hw[1] * s,
                              dtype=tile.dtype, device=tile.device)
        ys, xs = self._hr_slices(k)
        if k not in self._windows:
            self._windows[k] = self.window(k).to(tile.device, tile.dtype)
        acc[..., ys, xs] += tile * self._windows[k]
        return acc

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """The blended full-size prediction from the sum of :meth:`accumulate`."""
        if len(self) == 1:
            return acc
        if self._weight_sum is None or self._weight_sum.device != acc.device:
            self._weight_sum = self.weight_sum().to(acc.device, acc.dtype)
        return acc / self._weight_sum


def _keep_used(feats: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Drop the RRDB features the UNet never reads (keeps list positions, so cond[2::3] still works)."""
    return [f if i >= _USED_FEATURE_START and (i - _USED_FEATURE_START) % _USED_FEATURE_STEP == 0 else None
            for i, f in enumerate(feats)]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


TileBatch = tuple[list[tuple[int, int]], list[torch.Tensor | None]]  # (image, tile)s, their RRDB features


def _encode_tile_batches(model: GaussianDiffusion, grids: Sequence[TileGrid], lrs: Sequence[torch.Tensor],
                         batch: int, device: torch.device, dtype: torch.dtype | None) -> list[TileBatch]:
    """Stack tiles of equal shape (from any image) into batches of ``batch``, and encode their LR once."""
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for i, grid in enumerate(grids):
        by_shape[grid.tile_lr].extend((i, k) for k in range(len(grid)))
    tile_batches = []
    for entries in by_shape.values():
        for start in range(0, len(entries), batch):
            part = entries[start:start + batch]
            lr_tiles = torch.cat([grids[i].lr_crop(lrs[i], k) for i, k in part])
            with _autocast(device, dtype):
                _, feats = model.encode_lr(lr_tiles)
            tile_batches.append((part, _keep_used(feats)))
    return tile_batches


def _blended_noise(model: GaussianDiffusion, grids: Sequence[TileGrid], tile_batches: list[TileBatch],
                   device: torch.device, dtype: torch.dtype | None) -> NoisePredictor:
    """The noise predictor for `sample_loop`: every tile through the UNet, blended into full-size images."""

    def predict_eps(xs: list[torch.Tensor], t: int) -> list[torch.Tensor]:
        accs: list[torch.Tensor | None] = [None] * len(xs)
        for part, cond in tile_batches:
            x_in = torch.cat([grids[i].hr_crop(xs[i], k) for i, k in part])
            with _autocast(device, dtype):
                eps = model.predict_noise(x_in, t, cond)
            eps = eps.to(x_in.dtype)
            for j, (i, k) in enumerate(part):
                accs[i] = grids[i].accumulate(accs[i], k, eps[j:j + 1])
        return [grid.finish(acc) for grid, acc in zip(grids, accs, strict=True)]

    return predict_eps


@torch.no_grad()
def sample_tiled(model: GaussianDiffusion, lrs: Sequence[torch.Tensor], lr_ups: Sequence[torch.Tensor],
                 generators: Sequence[torch.Generator], *, steps: int | None = None, eta: float = 0.0,
                 sampler: str | None = None,
                 tile: int = 0, overlap: int = 16, batch: int = 4, dtype: torch.dtype | None = None,
                 progress: bool = False) -> list[torch.Tensor]:
    """Super-resolve several images together; returns SR images (1, 3, H, W) in [-1, 1], in order.

    ``lrs[i]`` (1, 3, h, w) and ``lr_ups[i]`` (1, 3, h*s, w*s) are in [-1, 1] on the model's device,
    ``h`` and ``w`` multiples of :func:`lr_multiple`. ``tile``/``overlap`` are in LR pixels (``tile`` <= 0:
    whole images); ``batch`` is the number of tiles per UNet call; ``dtype`` (bf16/fp16) runs the networks
    under autocast while the sampler state stays fp32. ``sampler``/``steps``/``eta`` as in
    `GaussianDiffusion.sample` (default: the full DDPM chain; ``steps`` < T alone: respaced DDIM).
    Each image's x_T and step noise come from its own generator, so its result does not depend on the batch.
    """
    if not (len(lrs) == len(lr_ups) == len(generators)):
        raise ValueError("lrs, lr_ups and generators must have the same length")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    scale, multiple = model.cfg.sr_scale, lr_multiple(model.cfg)
    device = lr_ups[0].device if lr_ups else torch.device("cpu")
    grids = [TileGrid(tuple(lr.shape[-2:]), tile, overlap, scale, multiple) for lr in lrs]
    tile_batches = _encode_tile_batches(model, grids, lrs, batch, device, dtype)
    x_T = [gaussian_like(up, gen) for up, gen in zip(lr_ups, generators, strict=True)]
    predict_eps = _blended_noise(model, grids, tile_batches, device, dtype)
    return sample_loop(model, x_T, lr_ups, generators, predict_eps, sampler=sampler, steps=steps, eta=eta,
                       progress=progress)
