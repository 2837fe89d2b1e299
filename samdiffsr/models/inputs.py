"""What goes into the model and what comes out: LR pixels -> ``(img_lr, img_lr_up)``, training batches ->
model inputs, SR -> uint8, and the precision names.

Training, validation, inference and the demo all use :func:`lr_inputs`. The one non-obvious rule: the
LR (and HR) map ``x / 255`` to [-1, 1], while ``img_lr_up`` is MATLAB bicubic of ``lr / lr_up_divisor``,
and the divisor belongs to the weights (the authors trained with 256; see
:func:`samdiffsr.models.loading.lr_up_divisor_for`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samdiffsr.imresize import imresize_torch

# config's train.precision and the CLIs' --precision; fp32 means no autocast.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 (uint8, or float) -> [-1, 1]: x / 255 as torchvision's ToTensor + Normalize(0.5, 0.5)."""
    return pixels.float().div(255).sub(0.5).div(0.5)


def lr_inputs(lr: torch.Tensor, scale: int, lr_up_divisor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """B x 3 x h x w LR pixel values (uint8, or float 0..255) -> ``(img_lr, img_lr_up)`` in [-1, 1].

    ``img_lr_up`` is MATLAB bicubic x``scale`` of ``lr / lr_up_divisor``, mapped to [-1, 1] the same way.
    """
    lr = lr.float()
    return to_unit(lr), imresize_torch(lr / lr_up_divisor, scale=scale).sub(0.5).div(0.5)


def to_model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str, scale: int,
                    lr_up_divisor: float = 255.0, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Move a uint8 training batch (``hr``, ``lr``, ``mask``) to ``device`` and build the model inputs there:
    ``img_hr``, ``img_lr``, ``img_lr_up`` (:func:`lr_inputs`) and ``mask`` as stored."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    hr, lr, mask = (batch[k].to(device, non_blocking=True) for k in ("hr", "lr", "mask"))
    img_lr, img_lr_up = lr_inputs(lr, scale, lr_up_divisor)
    out = {"img_hr": to_unit(hr), "img_lr": img_lr, "img_lr_up": img_lr_up, "mask": mask.float()}
    return {k: v.contiguous(memory_format=fmt) for k, v in out.items()}


def prepare_lr(lr: np.ndarray, scale: int, lr_up_divisor: float, multiple: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One uint8 H x W x 3 LR image -> 1 x 3 model inputs (:func:`lr_inputs`), the LR padded (edge
    replicate) to a multiple of ``multiple`` first."""
    if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 LR image, got {lr.dtype} {lr.shape}")
    t = torch.from_numpy(np.array(lr)).permute(2, 0, 1)[None].to(device).float()  # a copy: PIL arrays are read-only
    pad_h, pad_w = -t.shape[2] % multiple, -t.shape[3] % multiple
    if pad_h or pad_w:
        t = F.pad(t, (0, pad_w, 0, pad_h), mode="replicate")
    return lr_inputs(t, scale, lr_up_divisor)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """A 3 x H x W image in [-1, 1] -> H x W x 3 uint8, rounded as the authors' ``tensor2img`` (and every SR paper)."""
    x = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(1, 2, 0).numpy()
