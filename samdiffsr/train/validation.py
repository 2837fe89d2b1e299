"""Validation during training, shared by the ranks: each super-resolves its share of the held-out images
(positions ``i % world == rank``, `samdiffsr.data.pairs.load_val_images`) and the per-image PSNR-Y / SSIM-Y
are gathered, so no rank idles through a whole validation while another works.

The diffusion task samples with the sampler of ``train.val_sampler`` / ``val_steps`` / ``val_eta`` (by
default respaced ancestral sampling, 10 steps, eta 1: the fast sampler of bench/RESULTS.md "Samplers"). Each
image's noise comes from its own generator, seeded from (``train.seed``, the image's position) alone: the
same at every validation, so the curves move only because the weights do, and the same on any number of
ranks. The means are summed in image order from the gathered per-image values, so 1 and N ranks give the
same figures to the bit. The RRDB task evaluates ``rrdb(lr)``. Bicubic figures are reported alongside, so a
curve says whether training helps at all. Metrics follow the standard SR protocol (MATLAB Y, border = scale)
of `samdiffsr.evaluation.metrics`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from samdiffsr.data.pairs import centre_box
from samdiffsr.distributed import derive_seed
from samdiffsr.evaluation.metrics import psnr_y, ssim_y
from samdiffsr.models.inputs import to_model_inputs, to_uint8
from samdiffsr.train.collective import failure_code, gather, settle

IMAGES_LOGGED = 2  # held-out images (the first ones) whose LR / bicubic / SR / HR go to TensorBoard
METRICS = ("psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y")
_VAL_NOISE = 3  # derive_seed(seed, _VAL_NOISE, position): a held-out image's sampler noise, on every rank


@dataclass(frozen=True)
class ValSampler:
    """How the diffusion task samples at validation (`GaussianDiffusion.sample`'s arguments)."""

    name: str | None = "ddim"  # one of models.samplers.SAMPLERS
    steps: int = 10  # 0: all T steps
    eta: float = 1.0  # ddim: 0 deterministic, 1 ancestral


@dataclass
class Validation:
    """The outcome of one validation, on every rank."""

    metrics: dict[str, float]  # means over every held-out image
    images: dict[str, torch.Tensor]  # ``{position}/{lr,bicubic,sr,hr}`` of the first images (on rank 0)
    per_rank: list[int]  # how many images each rank validated


def center_crop(batch: dict[str, Any], size: int, scale: int) -> dict[str, Any]:
    """The central ``size`` x ``size`` HR region (at most; on the scale grid) of a validation batch."""
    y, x, ch, cw = centre_box(*batch["hr"].shape[-2:], size, scale)
    out = dict(batch)
    for key in ("hr", "mask"):
        out[key] = batch[key][..., y:y + ch, x:x + cw]
    out["lr"] = batch["lr"][..., y // scale:(y + ch) // scale, x // scale:(x + cw) // scale]
    return out


def image_generator(device: torch.device, seed: int, position: int) -> torch.Generator:
    """The generator of held-out image ``position``: a function of (seed, position) only."""
    return torch.Generator(device).manual_seed(derive_seed(seed, _VAL_NOISE, position) >> 1)


def super_resolve(model: nn.Module, task: str, inputs: dict[str, torch.Tensor], generator: torch.Generator,
                  sampler: ValSampler) -> torch.Tensor:
    if task == "rrdb":
        return model(inputs["img_lr"])
    return model.sample(inputs["img_lr"], inputs["img_lr_up"], generator=generator, steps=sampler.steps or None,
                        eta=sampler.eta, sampler=sampler.name)


def tensorboard_images(batch: dict[str, Any], scale: int, bic8: np.ndarray, sr8: np.ndarray,
                       hr: np.ndarray) -> dict[str, torch.Tensor]:
    """LR (nearest-upscaled) / bicubic / SR / HR of one image, uint8 3 x H x W, keyed ``{position}/{name}``."""
    lr_nearest = F.interpolate(batch["lr"].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)
    out = {"lr": lr_nearest}
    out.update({name: torch.from_numpy(np.array(img)).permute(2, 0, 1)
                for name, img in (("bicubic", bic8), ("sr", sr8), ("hr", hr))})
    return {f"{batch['index']}/{name}": img for name, img in out.items()}


@torch.no_grad()
def validate_share(model: nn.Module, task: str, batches: list[dict[str, Any]], *, device: torch.device,
                   scale: int, lr_up_divisor: float, seed: int, crop: int = 0, sampler: ValSampler = ValSampler(),
                   autocast_dtype: torch.dtype | None = None) -> tuple[dict[int, list[float]], dict]:
    """Per-image metrics ``{position: [METRICS...]}`` of this rank's ``batches``, and their TensorBoard images.

    ``crop`` > 0 validates the central crop of each image (cheap validation on small machines).
    """
    was_training = model.training
    model.eval()
    rows: dict[int, list[float]] = {}
    images: dict[str, torch.Tensor] = {}
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for batch in batches:
            if crop > 0:
                batch = center_crop(batch, crop, scale)
            inputs = to_model_inputs(batch, device, scale, lr_up_divisor)
            with autocast:
                sr = super_resolve(model, task, inputs, image_generator(device, seed, batch["index"]), sampler)
            hr = batch["hr"][0].permute(1, 2, 0).numpy()
            sr8, bic8 = to_uint8(sr[0]), to_uint8(inputs["img_lr_up"][0])
            rows[batch["index"]] = [psnr_y(sr8, hr, scale), ssim_y(sr8, hr, scale), psnr_y(bic8, hr, scale),
                                    ssim_y(bic8, hr, scale)]
            if batch["index"] < IMAGES_LOGGED:
                images.update(tensorboard_images(batch, scale, bic8, sr8, hr))
    finally:
        model.train(was_training)
    return rows, images


def validate(model: nn.Module, task: str, batches: list[dict[str, Any]], **settings: Any) -> Validation:
    """Validate this rank's ``batches`` (`validate_share`'s arguments), then gather: collective.

    When validation fails on some rank (a corrupt image, out of memory), every rank raises (that rank its
    error, the others `samdiffsr.cli.PeerFailure`) instead of waiting for it (`collective.settle`).
    """
    error: BaseException | None = None
    rows: dict[int, list[float]] = {}
    images: dict[str, torch.Tensor] = {}
    try:
        rows, images = validate_share(model, task, batches, **settings)
    except Exception as exc:  # noqa: BLE001 - re-raised by settle once every rank knows
        error = exc
    shares = gather((failure_code(error), rows, images if dist.get_rank() else {}))
    settle(error, [code for code, _, _ in shares])
    every = {position: row for _, share, _ in shares for position, row in share.items()}
    for _, _, more in shares:
        images.update(more)
    n = max(len(every), 1)
    # Summed in image order: the same float operations on any number of ranks.
    metrics = {name: sum(every[p][k] for p in sorted(every)) / n for k, name in enumerate(METRICS)}
    return Validation(metrics, images, [len(share) for _, share, _ in shares])
