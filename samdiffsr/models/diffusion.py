"""Gaussian diffusion on the SR residual, with the paper's structure-modulated forward process.

Residual mode: the diffusion runs on x0 = (HR - bicubic_up(LR)) * res_rescale, clipped to [-1, 1].
Training (SAM-DiffSR): the SPE mask map m is added to the Gaussian noise, scaled per timestep,
    eps' = eps + m * sqrt(1 - abar_t) * beta_t,      x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps',
and the UNet learns to predict eps'. Sampling (`samplers.py`) uses no mask: the plain reverse process.
Training-only levers (`TrainingLevers`: Min-SNR-gamma weighting, low-noise timestep sampling) change only
`training_loss`; their formulas are in docs/training.md, "Convergence levers".

Buffer names follow the authors' code so their checkpoints load key for key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samdiffsr.config import ModelConfig
from samdiffsr.models.rrdb import RRDBNet
from samdiffsr.models.samplers import gaussian_like, sample_loop
from samdiffsr.models.unet import Unet


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, computed as the authors do (float64 numpy)."""
    steps = timesteps + 1
    x = np.linspace(0, steps, steps)
    alphas_cumprod = np.cos(((x / steps) + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return np.clip(betas, a_min=0, a_max=0.999)


def linear_beta_schedule(timesteps: int, beta_end: float = 0.02, beta_start: float = 1e-4) -> np.ndarray:
    betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    betas[-1] = 0.999  # residual mode: make x_T pure noise, as the authors do
    return betas


def low_noise_timestep_probabilities(timesteps: int, power: float) -> np.ndarray:
    """p(t) = (T - t)^k / sum_s (T - s)^k over t = 0..T-1 (t = 0 the least noise); k = 0 is uniform."""
    weights = np.arange(timesteps, 0, -1, dtype=np.float64) ** power
    return weights / weights.sum()


@dataclass(frozen=True)
class TrainingLevers:
    """Training-only changes to the loss (the train.* keys of the same names); the defaults are the paper's."""

    snr_gamma: float = 0.0  # Min-SNR-gamma weighting of each sample's loss; 0: unweighted
    timestep_power: float = 0.0  # k of p(t) ~ (T - t)^k, toward the low-noise end; 0: uniform


def _extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast over a batch of images."""
    return values.gather(-1, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """SRDiff / SAM-DiffSR: RRDB encoder + UNet denoiser + diffusion schedule."""

    def __init__(self, denoise_fn: Unet, rrdb: RRDBNet, cfg: ModelConfig):
        super().__init__()
        self.denoise_fn = denoise_fn
        self.rrdb = rrdb
        self.cfg = cfg
        self.num_timesteps = cfg.timesteps
        if cfg.beta_schedule == "cosine":
            betas = cosine_beta_schedule(cfg.timesteps, s=cfg.beta_s)
        else:
            betas = linear_beta_schedule(cfg.timesteps, beta_end=cfg.beta_end)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)

        def buf(name: str, value: np.ndarray, persistent: bool = True) -> None:
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=persistent)

        buf("betas", betas)
        buf("alphas_cumprod", abar)
        buf("alphas_cumprod_prev", abar_prev)
        buf("sqrt_alphas_cumprod", np.sqrt(abar))
        buf("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - abar))
        buf("log_one_minus_alphas_cumprod", np.log(1.0 - abar))
        buf("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / abar))
        buf("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / abar - 1))
        buf("posterior_variance", posterior_variance)
        buf("posterior_log_variance_clipped", np.log(np.maximum(posterior_variance, 1e-20)))
        buf("posterior_mean_coef1", betas * np.sqrt(abar_prev) / (1.0 - abar))
        buf("posterior_mean_coef2", (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))
        # Not in the authors' state dict: derived, so kept out of checkpoints.
        buf("mask_coefficient", np.sqrt(1.0 - abar) * betas, persistent=False)
        self._timestep_probs: dict[tuple[float, str], torch.Tensor] = {}  # draw_timesteps' densities, per device

    # --- residual <-> image -------------------------------------------------------------------
    def img2res(self, img_hr: torch.Tensor, img_lr_up: torch.Tensor) -> torch.Tensor:
        x = (img_hr - img_lr_up) * self.cfg.res_rescale
        return x.clamp(-1, 1) if self.cfg.clip_input else x

    def res2img(self, res: torch.Tensor, img_lr_up: torch.Tensor) -> torch.Tensor:
        if self.cfg.clip_input:
            res = res.clamp(-1, 1)
        return res / self.cfg.res_rescale + img_lr_up

    # --- forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def modulated_noise(self, noise: torch.Tensor, mask: torch.Tensor | None,
                        t: torch.Tensor) -> torch.Tensor:
        """eps' = eps + m * sqrt(1 - abar_t) * beta_t, as a NEW tensor (the caller's noise is untouched).

        ``mask`` is B x 1 x h x w (any size: bilinearly resized to the noise size, as the authors do)
        and is added to all channels. Without a mask or with modulation off, returns ``noise``.
        """
        if mask is None or not self.cfg.sam_modulation:
            return noise
        mask = mask.to(noise.dtype)
        if mask.shape[-2:] != noise.shape[-2:]:
            mask = F.interpolate(mask, noise.shape[-2:], mode="bilinear", align_corners=False)
        if self.cfg.mask_coefficient:
            mask = mask * _extract(self.mask_coefficient.to(noise.dtype), t, noise.ndim)
        return noise + mask

    def encode_lr(self, img_lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """RRDB output and trunk features; without gradients when the RRDB is frozen."""
        frozen = not any(p.requires_grad for p in self.rrdb.parameters())
        if frozen:
            with torch.no_grad():
                return self.rrdb(img_lr, True)
        return self.rrdb(img_lr, True)

    def training_loss(self, img_hr: torch.Tensor, img_lr: torch.Tensor, img_lr_up: torch.Tensor,
                      mask: torch.Tensor | None = None, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      levers: TrainingLevers | None = None) -> torch.Tensor:
        """The diffusion loss |eps' - eps_theta(x_t, t, LR)| (L1, or L2) averaged over the batch.

        Images are B x 3 x H x W in [-1, 1] (LR at H/s); ``t`` (B,) and ``noise`` (like HR) may be
        given for reproducible tests, otherwise drawn from ``generator``. ``levers``: how ``t`` is drawn
        and each sample's loss weighted (None: the paper's uniform draw and plain mean).
        """
        levers = levers or TrainingLevers()
        if t is None:
            t = self.draw_timesteps(img_hr.shape[0], generator, img_hr.device, levers.timestep_power)
        if noise is None:
            noise = torch.randn(img_hr.shape, generator=generator, dtype=img_hr.dtype,
                                device=generator.device if generator else img_hr.device).to(img_hr.device)
        _, cond = self.encode_lr(img_lr)
        x0 = self.img2res(img_hr, img_lr_up)
        target = self.modulated_noise(noise, mask, t)
        x_t = self.q_sample(x0, t, target)
        pred = self.denoise_fn(x_t, t, cond)
        if not levers.snr_gamma:  # the paper's loss, computed exactly as before
            if self.cfg.loss_type == "l1":
                return (target - pred).abs().mean()
            return F.mse_loss(pred, target)
        error = (target - pred).abs() if self.cfg.loss_type == "l1" else (target - pred) ** 2
        per_sample = error.flatten(1).mean(1)
        return (self.min_snr_weights(t, levers.snr_gamma).to(per_sample.dtype) * per_sample).mean()

    def draw_timesteps(self, batch: int, generator: torch.Generator | None, device: torch.device,
                       power: float = 0.0) -> torch.Tensor:
        """``batch`` timesteps: uniform (``power`` 0, the paper's draw) or p(t) ~ (T - t)^power.

        Drawn on the generator's device, then moved, so that a CPU generator gives the same draws anywhere.
        """
        source = generator.device if generator else device
        if not power:
            return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=source).to(device)
        key = (power, str(source))  # cached: a host-to-device copy every step would wait for the device
        if key not in self._timestep_probs:
            self._timestep_probs[key] = torch.tensor(low_noise_timestep_probabilities(self.num_timesteps, power),
                                                     device=source)
        return torch.multinomial(self._timestep_probs[key], batch, replacement=True, generator=generator).to(device)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights at timesteps ``t``: min(SNR_t, gamma) / SNR_t for L2, its square root for L1.

        SNR_t = abar_t / (1 - abar_t) = 1 / sqrt_recipm1_alphas_cumprod[t]^2; that buffer was computed in float64,
        so small 1 - abar_t (the low-noise end, where the weights are < 1) keeps its precision in float32.
        L1: an L1 on the noise is sqrt(SNR_t) times an L1 on x0 (x0 - x0_hat = (eps' - eps_hat) / sqrt(SNR_t)),
        so clamping the x0 weight at sqrt(gamma) gives min(sqrt(SNR_t), sqrt(gamma)) / sqrt(SNR_t).
        """
        inv_sqrt_snr = self.sqrt_recipm1_alphas_cumprod[t]
        if self.cfg.loss_type == "l1":
            return (gamma**0.5 * inv_sqrt_snr).clamp(max=1.0)
        return (gamma * inv_sqrt_snr**2).clamp(max=1.0)

    # --- reverse process: what `samplers.Diffusion` names, used by the samplers ----------------
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The clean residual x0 implied by x_t and a noise prediction at timesteps ``t`` (B,), clipped to [-1, 1].

        x0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps: the estimate every update rule starts from.
        """
        x0 = (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
              - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)
        return x0.clamp(-1.0, 1.0)

    def ddpm_update(self, x: torch.Tensor, eps: torch.Tensor, t: int, noise: torch.Tensor | None) -> torch.Tensor:
        """One ancestral DDPM step x_t -> x_{t-1} given the predicted noise (posterior mean + variance)."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = self.predict_x0(x, tt, eps)
        mean = (_extract(self.posterior_mean_coef1, tt, x.ndim) * x0
                + _extract(self.posterior_mean_coef2, tt, x.ndim) * x)
        if t == 0 or noise is None:
            return mean
        return mean + (0.5 * _extract(self.posterior_log_variance_clipped, tt, x.ndim)).exp() * noise

    def ddim_update(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
                    noise: torch.Tensor | None, eta: float) -> torch.Tensor:
        """One respaced DDIM step x_t -> x_{t_prev} (t_prev = -1: the final clean estimate)."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = self.predict_x0(x, tt, eps)
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(abar)
        # Recompute eps from the clipped x0 so that the step stays consistent with the clipping.
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        out = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp_min(0).sqrt() * eps
        return out + sigma * noise if noise is not None else out

    def predict_noise(self, x: torch.Tensor, t: int, cond: list[torch.Tensor]) -> torch.Tensor:
        """The UNet's noise prediction for the batch ``x`` at timestep ``t``, given the RRDB features ``cond``."""
        return self.denoise_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), cond)

    def timestep_schedule(self, steps: int | None) -> list[int]:
        """Timesteps visited by the sampler, descending: all T, or ``steps`` evenly spaced ones."""
        if steps is None or steps >= self.num_timesteps:
            return list(range(self.num_timesteps - 1, -1, -1))
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        picked = np.round(np.linspace(0, self.num_timesteps - 1, steps)).astype(int)
        return sorted(set(picked.tolist()), reverse=True)

    @torch.no_grad()
    def sample(self, img_lr: torch.Tensor, img_lr_up: torch.Tensor, *,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               steps: int | None = None, eta: float = 0.0, sampler: str | None = None,
               progress: bool = False) -> torch.Tensor:
        """Super-resolve a batch: returns SR images in [-1, 1] shaped like ``img_lr_up``.

        ``sampler`` is one of `samplers.SAMPLERS`; by default the full T-step ancestral DDPM chain, or
        respaced DDIM when ``steps`` < T (``eta`` = 0 deterministic, 1 ancestral). Randomness comes only
        from ``generator`` (noise is drawn on the generator's device then moved, so a CPU generator
        reproduces the same result on any device) or from ``noise``, the initial x_T.
        """
        x = (noise.to(img_lr_up.device, img_lr_up.dtype).clone() if noise is not None
             else gaussian_like(img_lr_up, generator))
        _, cond = self.encode_lr(img_lr)  # once per batch, not per step
        [sr] = sample_loop(self, [x], [img_lr_up], [generator], lambda xs, t: [self.predict_noise(xs[0], t, cond)],
                           sampler=sampler, steps=steps, eta=eta, progress=progress)
        return sr


def build_model(cfg: ModelConfig) -> GaussianDiffusion:
    """The full SAM-DiffSR network for a model config (random weights)."""
    rrdb = RRDBNet(3, 3, cfg.rrdb_num_feat, cfg.rrdb_num_block, cfg.rrdb_growth, sr_scale=cfg.sr_scale)
    unet = Unet(cfg.hidden_size, out_dim=3, dim_mults=tuple(cfg.dim_mults), cond_dim=cfg.rrdb_num_feat,
                rrdb_num_block=cfg.rrdb_num_block, sr_scale=cfg.sr_scale, use_attn=cfg.use_attn)
    return GaussianDiffusion(unet, rrdb, cfg)
