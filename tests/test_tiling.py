"""Tiled sampling with several overlapping, odd-sized tiles: each tile's LR input and HR region must agree.

The network is replaced by a small real module whose noise prediction at an HR pixel depends only on that
pixel's state x_t, on t and on a 3x3 neighbourhood of the LR image around it. Inside a tile's interior
(one LR pixel away from its inner edges) such a tile sees exactly what the whole image sees, so the tiled
sampler must reproduce the model's own untiled sampler there, through every DDPM / DDIM step. A tile
sampled with the LR of another place (or another image) gives a different prediction and fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samdiffsr.config import ModelConfig
from samdiffsr.evaluation.tiling import TileGrid, lr_multiple, sample_tiled
from samdiffsr.models.diffusion import GaussianDiffusion

SCALE = 4
RADIUS = 1  # LR pixels the stand-in encoder looks around (3x3 convolution)


class LocalEncoder(nn.Module):
    """Stands in for the RRDB: a fixed 3x3 convolution of the LR image, as ``rrdb(lr, True)`` returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=RADIUS)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.5)
            self.conv.bias.copy_(torch.randn(4, generator=g) * 0.1)
        self.requires_grad_(False)

    def forward(self, lr: torch.Tensor, get_features: bool = True):
        f = torch.tanh(self.conv(lr))
        return lr, [f, f, f]  # the UNet reads cond[2::3]


class PointwiseDenoiser(nn.Module):
    """Stands in for the UNet: eps(x, t, cond) at an HR pixel from x there and the LR features of its pixel."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: list[torch.Tensor]) -> torch.Tensor:
        c = F.interpolate(cond[2], scale_factor=SCALE, mode="nearest")
        tt = t.to(x.dtype).view(-1, 1, 1, 1)
        return 0.6 * x + c[:, :3] * (1 + 0.1 * tt) + 0.3 * c[:, 3:4] * x


def stand_in_model(T: int = 6) -> GaussianDiffusion:
    cfg = ModelConfig(dim_mults=(1, 2), sr_scale=SCALE, timesteps=T)
    assert lr_multiple(cfg) == 1  # any LR size, odd ones included
    return GaussianDiffusion(PointwiseDenoiser(), LocalEncoder(), cfg).eval()


def interior_mask(grid: TileGrid) -> torch.Tensor:
    """HR pixels where EVERY tile covering them sees the whole-image LR neighbourhood (bool, H x W)."""
    (h, w), (th, tw) = grid.lr_hw, grid.tile_lr
    good = torch.ones(h, w, dtype=torch.bool)
    for y, x in grid.boxes:
        inner = torch.zeros(h, w, dtype=torch.bool)
        y0 = y + (RADIUS if y > 0 else 0)
        y1 = y + th - (RADIUS if y + th < h else 0)
        x0 = x + (RADIUS if x > 0 else 0)
        x1 = x + tw - (RADIUS if x + tw < w else 0)
        inner[y0:y1, x0:x1] = True
        covered = torch.zeros(h, w, dtype=torch.bool)
        covered[y:y + th, x:x + tw] = True
        good &= ~covered | inner
    return good.repeat_interleave(SCALE, 0).repeat_interleave(SCALE, 1)


def images(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    lrs = [torch.rand(1, 3, h, w, generator=g) * 2 - 1 for h, w in shapes]
    ups = [F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False).clamp(-1, 1) for lr in lrs]
    return lrs, ups


def test_lr_and_hr_crops_of_every_tile_are_the_same_image_area():
    grid = TileGrid((13, 19), tile=7, overlap=3, scale=SCALE)
    assert grid.tile_lr == (7, 7) and len(grid) == 3 * 4
    lr = torch.randn(1, 3, 13, 19)
    hr = lr.repeat_interleave(SCALE, -2).repeat_interleave(SCALE, -1)  # HR pixel (i, j) <- LR (i // 4, j // 4)
    for k in range(len(grid)):
        assert torch.equal(grid.hr_crop(hr, k), grid.lr_crop(lr, k).repeat_interleave(SCALE, -2)
                           .repeat_interleave(SCALE, -1)), f"tile {k} at {grid.boxes[k]}"


@pytest.mark.parametrize("steps, eta", [(None, 0.0), (3, 0.0), (3, 0.8)])
def test_tiled_sampling_equals_untiled_inside_every_tile(steps, eta):
    model = stand_in_model()
    # Two images of odd sizes: 3 x 4 and 2 x 3 tiles of 7 x 7 LR pixels overlapping by >= 3, stacked
    # together into UNet batches of 5 tiles (so batches mix tiles of both images).
    shapes = [(13, 19), (9, 15)]
    lrs, ups = images(shapes)
    tile, overlap = 7, 3
    got = sample_tiled(model, lrs, ups, [torch.Generator().manual_seed(10 + i) for i in range(2)],
                       steps=steps, eta=eta, tile=tile, overlap=overlap, batch=5)
    for i, (lr, up) in enumerate(zip(lrs, ups, strict=True)):
        grid = TileGrid(tuple(lr.shape[-2:]), tile, overlap, SCALE)
        assert len(grid) == {0: 12, 1: 6}[i]
        want = model.sample(lr, up, generator=torch.Generator().manual_seed(10 + i), steps=steps, eta=eta)
        good = interior_mask(grid)
        # every tile contributes interior pixels, and together they are most of the image
        for k in range(len(grid)):
            assert grid.hr_crop(good, k).any(), f"image {i} tile {k} has no interior"
        assert good.float().mean() > 0.5
        diff = (got[i] - want).abs()[0].amax(0)
        assert float(diff[good].max()) < 1e-4, f"image {i}: tiled != untiled inside tiles ({diff[good].max()})"
        # Near the inner tile edges the stand-in's zero padding differs, so the comparison can fail.
        assert float(diff[~good].max()) > 1e-3
