"""The conditional UNet denoiser of SRDiff / SAM-DiffSR.

It predicts the (modulated) noise of the residual image x_t, conditioned on the timestep and on
every third RRDB trunk feature, projected to HR resolution by a transposed convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from samdiffsr.models.blocks import (
    Block,
    Downsample,
    LinearAttention,
    Mish,
    Residual,
    ResnetBlock,
    Rezero,
    SinusoidalPosEmb,
    Upsample,
)


class Unet(nn.Module):
    def __init__(self, dim: int = 64, out_dim: int = 3, dim_mults: tuple[int, ...] = (1, 2, 3, 4),
                 cond_dim: int = 64, rrdb_num_block: int = 17, sr_scale: int = 4, use_attn: bool = False):
        super().__init__()
        dims = [3, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))
        # The UNet sees RRDB features 2, 5, 8, ...: (nb + 1) // 3 maps of cond_dim channels.
        cond_in = cond_dim * ((rrdb_num_block + 1) // 3)
        self.cond_proj = nn.ConvTranspose2d(cond_in, dim, sr_scale * 2, sr_scale, sr_scale // 2)
        self.time_pos_emb = SinusoidalPosEmb(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), Mish(), nn.Linear(dim * 4, dim))

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(d_in, d_out, time_emb_dim=dim),
                ResnetBlock(d_out, d_out, time_emb_dim=dim),
                nn.Identity() if last else Downsample(d_out),
            ]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, time_emb_dim=dim)
        self.use_attn = use_attn
        if use_attn:
            self.mid_attn = Residual(Rezero(LinearAttention(mid)))
        self.mid_block2 = ResnetBlock(mid, mid, time_emb_dim=dim)

        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(in_out[1:])):
            # As in the authors' code: `i >= len(in_out) - 1` never holds here, so every up level
            # ends with an Upsample (the skip pops keep the resolutions consistent).
            self.ups.append(nn.ModuleList([
                ResnetBlock(d_out * 2, d_in, time_emb_dim=dim),
                ResnetBlock(d_in, d_in, time_emb_dim=dim),
                nn.Identity() if i >= len(in_out) - 1 else Upsample(d_in),
            ]))
        self.final_conv = nn.Sequential(Block(dim, dim), nn.Conv2d(dim, out_dim, 1))

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: list[torch.Tensor]) -> torch.Tensor:
        t = self.mlp(self.time_pos_emb(time))
        cond_hr = self.cond_proj(torch.cat(cond[2::3], 1))
        skips = []
        for i, (resnet, resnet2, downsample) in enumerate(self.downs):
            x = resnet2(resnet(x, t), t)
            if i == 0:
                x = x + cond_hr
            skips.append(x)
            x = downsample(x)
        x = self.mid_block1(x, t)
        if self.use_attn:
            x = self.mid_attn(x)
        x = self.mid_block2(x, t)
        for resnet, resnet2, upsample in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = upsample(resnet2(resnet(x, t), t))
        return self.final_conv(x)
