"""The samplers of `models/samplers.py`: the default is today's chain bit for bit, DPM-Solver++(2M) follows
its written-out formula and converges to the exact probability-flow ODE solution of a model whose optimal
noise prediction is known in closed form (Gaussian data)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from samdiffsr.config import ModelConfig
from samdiffsr.evaluation.tiling import sample_tiled
from samdiffsr.models import build_model
from samdiffsr.models.samplers import Sampler, resolve_sampler


def tiny_model(T: int = 10, seed: int = 0):
    cfg = ModelConfig(hidden_size=8, dim_mults=(1, 2), rrdb_num_block=2, rrdb_num_feat=8, rrdb_growth=4,
                      timesteps=T)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def inputs(seed: int = 1, hw: int = 8):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(2, 3, hw, hw, generator=g) * 2 - 1
    return lr, torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(-1, 1)


@torch.no_grad()
def reference_chain(model, lr, lr_up, seed, steps=None, eta=0.0):
    """The sampler loop as it was before `Sampler` existed: DDPM over all T, respaced DDIM for fewer steps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(lr_up.shape, generator=gen)
    _, cond = model.encode_lr(lr)
    schedule = model.timestep_schedule(steps)
    for i, t in enumerate(schedule):
        eps = model.predict_noise(x, t, cond)
        if len(schedule) == model.num_timesteps:
            x = model.ddpm_update(x, eps, t, torch.randn(x.shape, generator=gen) if t > 0 else None)
        else:
            t_prev = schedule[i + 1] if i + 1 < len(schedule) else -1
            noise = torch.randn(x.shape, generator=gen) if eta > 0 and t_prev >= 0 else None
            x = model.ddim_update(x, eps, t, t_prev, noise, eta)
    return model.res2img(x, lr_up)


@pytest.mark.parametrize("steps, eta", [(None, 0.0), (4, 0.0), (4, 1.0)])
def test_default_sampler_is_bit_identical_to_the_plain_chain(steps, eta):
    model = tiny_model()
    lr, lr_up = inputs()
    got = model.sample(lr, lr_up, generator=torch.Generator().manual_seed(7), steps=steps, eta=eta)
    assert torch.equal(got, reference_chain(model, lr, lr_up, 7, steps, eta))
    named = "ddpm" if steps is None else "ddim"
    again = model.sample(lr, lr_up, generator=torch.Generator().manual_seed(7), steps=steps, eta=eta, sampler=named)
    assert torch.equal(got, again)


def test_sampler_names_and_step_counts_are_checked():
    assert resolve_sampler(None, None, 100) == "ddpm" and resolve_sampler(None, 20, 100) == "ddim"
    assert resolve_sampler("dpmpp_2m", 10, 100) == "dpmpp_2m"
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        resolve_sampler("heun", 10, 100)
    with pytest.raises(ValueError, match="the ddpm sampler runs all 100 steps"):
        resolve_sampler("ddpm", 10, 100)
    model = tiny_model(T=10)
    assert len(Sampler(model, "dpmpp_2m", 4)) == 4 and len(Sampler(model)) == 10
    assert not any(Sampler(model, "dpmpp_2m", 4).needs_noise(i) for i in range(4))  # an ODE solver: no noise


def test_dpmpp_2m_steps_equal_their_written_out_formula():
    """Step 0 is the DDIM step; step 1 extrapolates the x0 estimates: x' = (s'/s) x - a' (e^-h - 1) D."""
    model = tiny_model(T=10)
    sampler = Sampler(model, "dpmpp_2m", steps=4)
    ts = sampler.timesteps
    assert ts == [9, 6, 3, 0]
    abar = [float(a) for a in model.alphas_cumprod.double()]
    alpha = [math.sqrt(a) for a in abar]
    sigma = [math.sqrt(1 - a) for a in abar]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma, strict=True)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = [torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64) * 0.3 for _ in ts]

    def x0_of(x, t, e):
        return ((x - sigma[t] * e) / alpha[t]).clamp(-1, 1)

    # Step 0, first order: the DDIM (eta 0) step with eps recomputed from the clipped x0.
    t, n = ts[0], ts[1]
    d0 = x0_of(x, t, eps[0])
    expected1 = sigma[n] / sigma[t] * x - alpha[n] * math.expm1(-(lam[n] - lam[t])) * d0
    x1 = sampler.step(x, eps[0], 0)
    torch.testing.assert_close(x1, expected1, rtol=0, atol=1e-6)
    torch.testing.assert_close(x1, model.ddim_update(x, eps[0], t, n, None, 0.0), rtol=0, atol=1e-6)
    # Step 1, second order: D = (1 + 1/2r) x0_1 - (1/2r) x0_0, r = h_0 / h_1.
    t, n, p = ts[1], ts[2], ts[0]
    d1 = x0_of(x1, t, eps[1])
    h, h_prev = lam[n] - lam[t], lam[t] - lam[p]
    r = h_prev / h
    d = (1 + 1 / (2 * r)) * d1 - (1 / (2 * r)) * d0
    expected2 = sigma[n] / sigma[t] * x1 - alpha[n] * math.expm1(-h) * d
    x2 = sampler.step(x1, eps[1], 1)
    torch.testing.assert_close(x2, expected2, rtol=0, atol=1e-6)
    # The last step (to sigma = 0) returns the clipped x0 estimate.
    x3 = sampler.step(x2, eps[2], 2)
    torch.testing.assert_close(sampler.step(x3, eps[3], 3), x0_of(x3, ts[3], eps[3]), rtol=0, atol=1e-6)


class GaussianDataDenoiser(nn.Module):
    """The exact noise prediction for data x0 ~ N(mu, s^2) per pixel.

    E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2), with a^2 = abar_t and sigma^2 = 1 - abar_t.
    """

    def __init__(self, abar: torch.Tensor, mu: float, s: float) -> None:
        super().__init__()
        self.register_buffer("abar", abar.double())
        self.mu, self.s = mu, s

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        a = self.abar[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1)
        return sigma * (x - a * self.mu) / (a**2 * self.s**2 + sigma**2)


def ode_solution(x_T, abar, mu, s):
    """The exact flow: z = (x_t - a mu) / sqrt(a^2 s^2 + sigma^2) is constant along the probability-flow ODE;
    the samplers end with the x0 estimate at t = 0, E[x0 | x_0] = mu + a s^2 (x_0 - a mu) / (a^2 s^2 + sigma^2)."""
    a_T, a_0 = abar[-1].sqrt(), abar[0].sqrt()
    z = (x_T - a_T * mu) / (a_T**2 * s**2 + 1 - abar[-1]).sqrt()
    x_0 = a_0 * mu + z * (a_0**2 * s**2 + 1 - abar[0]).sqrt()
    return mu + a_0 * s**2 * (x_0 - a_0 * mu) / (a_0**2 * s**2 + 1 - abar[0])


@torch.no_grad()
def solve(model, name, steps, x_T):
    sampler = Sampler(model, name, steps)
    x = x_T.clone()
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(x, model.predict_noise(x, t, None), i)
    return x


def test_dpmpp_2m_converges_to_the_exact_ode_solution():
    """Gaussian data (mu 0.2, s 0.3) through the paper's T=100 cosine schedule: the exact solution is known.

    Tolerance: with 100 steps DPM-Solver++(2M) is within 3e-3 (max abs, on data of std 0.3; measured 2.2e-3:
    the first step, from abar = 2.4e-7 at t = 99, is the coarsest of the integer grid), doubling the steps
    from 50 to 100 cuts the error more than 3x (second order: 4x), and at every step count it is closer
    than DDIM (first order, the same timesteps).
    """
    model = tiny_model(T=100).double()
    mu, s = 0.2, 0.3
    model.denoise_fn = GaussianDataDenoiser(model.alphas_cumprod, mu, s)
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(-2, 2)
    exact = ode_solution(x_T, model.alphas_cumprod.double(), mu, s)
    errors = {}
    for steps in (10, 20, 50, 100):
        dpm = (solve(model, "dpmpp_2m", steps, x_T) - exact).abs().max().item()
        ddim = (solve(model, "ddim", steps, x_T) - exact).abs().max().item()
        errors[steps] = dpm
        assert dpm < ddim, (steps, dpm, ddim)
    assert errors[100] < 3e-3, errors
    assert errors[10] > errors[20] > errors[50] > errors[100], errors
    assert errors[50] / errors[100] > 3, errors


def test_tiled_sampler_runs_the_named_sampler():
    model = tiny_model()
    lr, lr_up = inputs()
    direct = model.sample(lr[:1], lr_up[:1], generator=torch.Generator().manual_seed(5), steps=4, sampler="dpmpp_2m")
    tiled = sample_tiled(model, [lr[:1]], [lr_up[:1]], [torch.Generator().manual_seed(5)], steps=4,
                         sampler="dpmpp_2m")[0]
    torch.testing.assert_close(tiled, direct, rtol=0, atol=1e-5)
    ddim = model.sample(lr[:1], lr_up[:1], generator=torch.Generator().manual_seed(5), steps=4, sampler="ddim")
    assert not torch.allclose(tiled, ddim, atol=1e-4)  # the solver really differs from DDIM
