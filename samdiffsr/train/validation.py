"""Validation during training: SR of a few held-out images with a fixed generator, PSNR-Y / SSIM-Y.

The diffusion task samples with ``model.sample`` (the full DDPM sampler) from a generator seeded the same
way at every validation, so the curves move only because the weights do. The RRDB task evaluates
``rrdb(lr)``. Bicubic figures are reported alongside, so a curve says whether training helps at all.
Metrics follow the standard SR protocol (MATLAB Y, border = scale) of `samdiffsr.evaluation.metrics`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samdiffsr.data.pairs import centre_box
from samdiffsr.evaluation.metrics import psnr_y, ssim_y
from samdiffsr.models.inputs import to_model_inputs, to_uint8

IMAGES_LOGGED = 2  # held-out images whose LR / bicubic / SR / HR go to TensorBoard


def center_crop(batch: dict[str, Any], size: int, scale: int) -> dict[str, Any]:
    """The central ``size`` x ``size`` HR region (at most; on the scale grid) of a validation batch."""
    y, x, ch, cw = centre_box(*batch["hr"].shape[-2:], size, scale)
    out = dict(batch)
    for key in ("hr", "mask"):
        out[key] = batch[key][..., y:y + ch, x:x + cw]
    out["lr"] = batch["lr"][..., y // scale:(y + ch) // scale, x // scale:(x + cw) // scale]
    return out


@torch.no_grad()
def validate(model: nn.Module, task: str, batches: list[dict[str, Any]], *, device: torch.device, scale: int,
             lr_up_divisor: float, seed: int, crop: int = 0, steps: int = 0,
             autocast_dtype: torch.dtype | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Mean metrics over ``batches`` (from `samdiffsr.data.pairs.load_val_images`) and a few images.

    ``crop`` > 0 validates the central crop of each image; ``steps`` > 0 samples with that many respaced
    DDIM steps instead of the full DDPM chain (both keep validation cheap on small machines).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device).manual_seed(seed)
    sums: dict[str, float] = {"psnr_y": 0.0, "ssim_y": 0.0, "bicubic_psnr_y": 0.0, "bicubic_ssim_y": 0.0}
    images: dict[str, torch.Tensor] = {}
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for i, batch in enumerate(batches):
            if crop > 0:
                batch = center_crop(batch, crop, scale)
            inputs = to_model_inputs(batch, device, scale, lr_up_divisor)
            with autocast:
                if task == "rrdb":
                    sr = model(inputs["img_lr"])
                else:
                    sr = model.sample(inputs["img_lr"], inputs["img_lr_up"], generator=generator,
                                      steps=steps or None)
            hr = batch["hr"][0].permute(1, 2, 0).numpy()
            sr8, bic8 = to_uint8(sr[0]), to_uint8(inputs["img_lr_up"][0])
            sums["psnr_y"] += psnr_y(sr8, hr, scale)
            sums["ssim_y"] += ssim_y(sr8, hr, scale)
            sums["bicubic_psnr_y"] += psnr_y(bic8, hr, scale)
            sums["bicubic_ssim_y"] += ssim_y(bic8, hr, scale)
            if i < IMAGES_LOGGED:
                lr_nearest = F.interpolate(batch["lr"].float(), scale_factor=scale, mode="nearest")
                for name, img in (("lr", lr_nearest[0].to(torch.uint8)), ("bicubic", bic8), ("sr", sr8),
                                  ("hr", hr)):
                    images[f"{i}/{name}"] = (img if isinstance(img, torch.Tensor)
                                             else torch.from_numpy(np.array(img)).permute(2, 0, 1))
    finally:
        model.train(was_training)
    n = max(len(batches), 1)
    return {k: v / n for k, v in sums.items()}, images
