"""RRDBNet: the LR encoder. Its intermediate features condition the UNet; its output is the
RRDB-only SR image (trained alone in the pretraining task)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualDenseBlock_5C(nn.Module):  # noqa: N801 - name fixed by the authors' checkpoints
    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in Residual Dense Block."""

    def __init__(self, nf: int, gc: int = 32):
        super().__init__()
        self.RDB1 = ResidualDenseBlock_5C(nf, gc)
        self.RDB2 = ResidualDenseBlock_5C(nf, gc)
        self.RDB3 = ResidualDenseBlock_5C(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN-style RRDB network. Input and output images are in [-1, 1]."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 17, gc: int = 32,
                 sr_scale: int = 4):
        super().__init__()
        if sr_scale not in (2, 4, 8):
            raise ValueError(f"RRDBNet supports sr_scale 2, 4 or 8, got {sr_scale}")
        self.sr_scale = sr_scale
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.RRDB_trunk = nn.ModuleList(RRDB(nf, gc) for _ in range(nb))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        # The authors always build two x2 stages (and a third for x8); keep that so their
        # checkpoints load, and only run as many as the scale needs.
        self.upconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        if sr_scale == 8:
            self.upconv3 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: torch.Tensor, get_fea: bool = False):
        """Return the SR image, and with ``get_fea`` also the list of trunk features (nb + 1 maps)."""
        feas = []
        fea_first = fea = self.conv_first((x + 1) / 2)
        for block in self.RRDB_trunk:
            fea = block(fea)
            feas.append(fea)
        fea = fea_first + self.trunk_conv(fea)
        feas.append(fea)
        ups = [self.upconv1, self.upconv2, getattr(self, "upconv3", None)]
        for conv in ups[: {2: 1, 4: 2, 8: 3}[self.sr_scale]]:
            fea = self.lrelu(conv(F.interpolate(fea, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.HRconv(fea)))
        out = out.clamp(0, 1) * 2 - 1
        return (out, feas) if get_fea else out
