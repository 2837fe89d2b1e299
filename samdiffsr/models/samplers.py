"""The reverse process: the one sampler loop, its three update rules and its noise draws.

    ddpm      the paper's ancestral chain over all T steps (the default; bit-identical to the authors')
    ddim      respaced DDIM on ``steps`` evenly spaced timesteps (eta 0: deterministic, 1: ancestral)
    dpmpp_2m  DPM-Solver++(2M), second order, on the same timesteps and x0 clipping as DDIM

`sample_loop` is the only loop: ``GaussianDiffusion.sample`` drives it with one network call per step,
tiled sampling with blended tile predictions. The rule that keeps the random stream fixed: fresh noise is
drawn (by `gaussian_like`) only when ``Sampler.needs_noise`` says so. See docs/models.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


class Diffusion(Protocol):
    """What the samplers use of a model (`models.diffusion.GaussianDiffusion` implements it)."""

    num_timesteps: int
    alphas_cumprod: torch.Tensor  # abar_t, float32, (T,)

    def timestep_schedule(self, steps: int | None) -> list[int]: ...

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor: ...

    def ddpm_update(self, x: torch.Tensor, eps: torch.Tensor, t: int,
                    noise: torch.Tensor | None) -> torch.Tensor: ...

    def ddim_update(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
                    noise: torch.Tensor | None, eta: float) -> torch.Tensor: ...

    def res2img(self, res: torch.Tensor, img_lr_up: torch.Tensor) -> torch.Tensor: ...


# predict_eps(xs, t): the network's noise prediction at timestep t for every state in xs, in order.
NoisePredictor = Callable[[list[torch.Tensor], int], list[torch.Tensor]]


def resolve_sampler(name: str | None, steps: int | None, num_timesteps: int) -> str:
    """The sampler to run: ``name``, or (None) the full DDPM chain, or DDIM when ``steps`` < T."""
    if name is None:
        return "ddpm" if steps is None or steps >= num_timesteps else "ddim"
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if name == "ddpm" and steps is not None and steps < num_timesteps:
        raise ValueError(f"the ddpm sampler runs all {num_timesteps} steps; use ddim or dpmpp_2m for {steps}")
    return name


def gaussian_like(ref: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``ref``, on its device and dtype.

    Drawn on the generator's device then moved, so a CPU generator gives the same numbers on any device.
    """
    gen_device = generator.device if generator is not None else ref.device
    return torch.randn(ref.shape, generator=generator, device=gen_device).to(ref.device, ref.dtype)


class Sampler:
    """The reverse process of one image (or one batch sampled in lockstep) for ``model``.

    It holds that process's state (a multistep solver remembers its last x0 estimate); the caller owns
    the network call: for each timestep, predict the noise, then ``step``.
    """

    def __init__(self, model: Diffusion, name: str | None = None, steps: int | None = None,
                 eta: float = 0.0) -> None:
        self.model = model
        self.name = resolve_sampler(name, steps, model.num_timesteps)
        self.timesteps = model.timestep_schedule(None if self.name == "ddpm" else steps)
        self.eta = eta if self.name == "ddim" else 0.0
        self._previous_x0: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.timesteps)

    def _prev(self, i: int) -> int:
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def needs_noise(self, i: int) -> bool:
        """Whether step ``i`` takes fresh Gaussian noise (drawn by the caller, shaped like x)."""
        if self.name == "ddpm":
            return self.timesteps[i] > 0
        return self.name == "ddim" and self.eta > 0 and self._prev(i) >= 0

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x at ``timesteps[i]`` and the network's noise prediction there -> x at the next timestep."""
        t = self.timesteps[i]
        if self.name == "ddpm":
            return self.model.ddpm_update(x, eps, t, noise)
        if self.name == "ddim":
            return self.model.ddim_update(x, eps, t, self._prev(i), noise, self.eta)
        return self._dpmpp_2m(x, eps, i)

    def _dpmpp_2m(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """DPM-Solver++(2M) in log-SNR time ``lambda = log(alpha / sigma)``, alpha^2 = abar, sigma^2 = 1 - abar.

        x_next = (sigma_next / sigma) x - alpha_next * expm1(-h) * D, with h = lambda_next - lambda and D the
        clipped x0 estimate, extrapolated with the previous one as (1 + 1/2r) x0_i - (1/2r) x0_{i-1},
        r = h_{i-1} / h. The first step, and the last one (to sigma = 0, where the update is D itself), are
        first order: exactly the DDIM step (eta 0).
        """
        t, t_next = self.timesteps[i], self._prev(i)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = self.model.predict_x0(x, tt, eps)
        previous, self._previous_x0 = self._previous_x0, x0
        if t_next < 0:
            return x0
        lam, lam_next = self._log_snr(t), self._log_snr(t_next)
        h = lam_next - lam
        d = x0
        if previous is not None:
            r = (lam - self._log_snr(self.timesteps[i - 1])) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
        sigma, sigma_next = self._sigma(t), self._sigma(t_next)
        alpha_next = math.sqrt(float(self.model.alphas_cumprod[t_next]))
        return (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d

    def _sigma(self, t: int) -> float:
        return math.sqrt(1.0 - float(self.model.alphas_cumprod[t]))

    def _log_snr(self, t: int) -> float:
        abar = float(self.model.alphas_cumprod[t])
        return 0.5 * math.log(abar / (1.0 - abar))


def sample_loop(model: Diffusion, x_T: Sequence[torch.Tensor], lr_ups: Sequence[torch.Tensor],
                generators: Sequence[torch.Generator | None], predict_eps: NoisePredictor, *,
                sampler: str | None = None, steps: int | None = None, eta: float = 0.0,
                progress: bool = False) -> list[torch.Tensor]:
    """Run one reverse process per state ``x_T[i]`` (the residual of ``lr_ups[i]``), all in lockstep.

    Each step calls ``predict_eps`` once for all states, then updates each with its own `Sampler`; a
    state's fresh noise is drawn from ``generators[i]`` like ``lr_ups[i]``. Returns the SR images
    ``model.res2img(x_0[i], lr_ups[i])``.
    """
    xs = list(x_T)
    reverses = [Sampler(model, sampler, steps, eta) for _ in xs]
    timesteps = reverses[0].timesteps if reverses else []
    iterator: Iterable[tuple[int, int]] = enumerate(timesteps)
    if progress:
        from samdiffsr.progress import progress_bar

        iterator = progress_bar(iterator, total=len(timesteps), desc="sampling", leave=False)
    for i, t in iterator:
        eps = predict_eps(xs, t)
        xs = [reverse.step(x, e, i, gaussian_like(up, gen) if reverse.needs_noise(i) else None)
              for reverse, x, e, up, gen in zip(reverses, xs, eps, lr_ups, generators, strict=True)]
    return [model.res2img(x, up) for x, up in zip(xs, lr_ups, strict=True)]
