"""The diffusion schedule and the sampler's update steps against closed forms written out here.

Every reference value is computed in this file with plain ``math`` in float64 from the textbook formulas
(Nichol & Dhariwal's cosine schedule; Ho et al.'s DDPM posterior; Song et al.'s DDIM step), never from
the model's own buffers, so a wrong buffer or a wrong step in ``models/diffusion.py`` shows up here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from samdiffsr.config import ModelConfig
from samdiffsr.models import build_model
from samdiffsr.models.diffusion import cosine_beta_schedule

S = 0.008  # the cosine schedule's offset (the authors' and Nichol & Dhariwal's)


def cosine_betas(T: int, s: float = S) -> list[float]:
    """abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2); beta_t = 1 - abar_t / abar_{t-1}, <= 0.999."""
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    return [min(1 - f[t] / f[t - 1], 0.999) for t in range(1, T + 1)]


def cumprod(betas: list[float]) -> list[float]:
    out, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        out.append(acc)
    return out


# T = 4, worked out with plain math.cos (see cosine_betas): abar = 0.84701216, 0.49384359, 0.14427210, ~0
# (f(T) = cos^2(pi/2) = 0, so the last beta is the 0.999 clip).
BETAS_T4 = [0.1529878386730953, 0.41695808751199426, 0.7078587123971634, 0.999]


def test_cosine_betas_for_small_t_equal_the_hand_values():
    assert cosine_betas(4) == pytest.approx(BETAS_T4, abs=1e-15)
    assert cumprod(BETAS_T4)[:3] == pytest.approx([0.8470121613269047, 0.49384359044063775, 0.1442721023857358],
                                                  abs=1e-15)
    np.testing.assert_allclose(cosine_beta_schedule(4), BETAS_T4, rtol=0, atol=1e-12)
    for T in (2, 7, 10, 100):  # 100: the paper's schedule
        np.testing.assert_allclose(cosine_beta_schedule(T), cosine_betas(T), rtol=0, atol=1e-12, err_msg=f"T={T}")


def model(T: int):
    cfg = ModelConfig(hidden_size=8, dim_mults=(1, 2), rrdb_num_block=2, rrdb_num_feat=8, rrdb_growth=4,
                      timesteps=T)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_model_schedule_buffers_follow_the_cosine_closed_form():
    m = model(10)
    betas = cosine_betas(10)
    abar = cumprod(betas)
    abar_prev = [1.0, *abar[:-1]]
    expected = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": [math.sqrt(a) for a in abar],
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(1 - a) for a in abar],
        "posterior_variance": [b * (1 - ap) / (1 - a) for b, a, ap in zip(betas, abar, abar_prev, strict=True)],
        "posterior_mean_coef1": [b * math.sqrt(ap) / (1 - a) for b, a, ap in zip(betas, abar, abar_prev, strict=True)],
        "posterior_mean_coef2": [(1 - ap) * math.sqrt(1 - b) / (1 - a)
                                 for b, a, ap in zip(betas, abar, abar_prev, strict=True)],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(getattr(m, name).double().numpy(), values, rtol=1e-6, atol=1e-7, err_msg=name)


def _states(T: int, seed: int, shape=(4, 3, 8, 8)):
    """x_t, eps and noise for each t: the first half of the batch is a consistent q_sample of an x0 inside
    [-0.9, 0.9] (so the x0 prediction is not clipped), the second half is arbitrary (x0 gets clipped)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 1.8 - 0.9
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    free_x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0, eps, free_x, noise


def _x0_hat(x: torch.Tensor, eps: torch.Tensor, abar_t: float) -> torch.Tensor:
    return ((x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1, 1)


@pytest.mark.parametrize("T", [10, 100])
def test_ddpm_update_is_the_posterior_mean_plus_its_standard_deviation(T):
    m = model(T)
    betas = cosine_betas(T)
    abar = cumprod(betas)
    x0, eps, free_x, noise = _states(T, seed=T)
    half = x0.shape[0] // 2
    for t in range(T):
        a_t, a_prev, beta = abar[t], (abar[t - 1] if t > 0 else 1.0), betas[t]
        x = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
        x[half:] = free_x[half:]
        x0_hat = _x0_hat(x, eps, a_t)
        # q(x_{t-1} | x_t, x0): mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
        #                             + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0_hat + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        var = beta * (1 - a_prev) / (1 - a_t)
        with_noise = m.ddpm_update(x.float(), eps.float(), t, noise.float() if t > 0 else None).double()
        expected = mean + math.sqrt(var) * noise if t > 0 else mean
        torch.testing.assert_close(with_noise, expected, rtol=0, atol=2e-5, msg=f"t={t}")
        # Without noise: the posterior mean alone.
        torch.testing.assert_close(m.ddpm_update(x.float(), eps.float(), t, None).double(), mean, rtol=0,
                                   atol=2e-5, msg=f"t={t} mean")
    # The consistent half of the batch really was unclipped (so both posterior terms were exercised).
    assert float((x0_hat[:half].abs() < 1).double().mean()) > 0.99


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("T, pairs", [(10, [(9, 6), (6, 3), (3, 0), (0, -1)]),
                                      (100, [(99, 66), (66, 33), (33, 0), (0, -1), (50, 49)])])
def test_ddim_step_equals_its_written_out_formula(T, pairs, eta):
    m = model(T)
    abar = cumprod(cosine_betas(T))
    x0, eps, free_x, noise = _states(T, seed=T + 1)
    half = x0.shape[0] // 2
    for t, t_prev in pairs:
        a_t = abar[t]
        a_p = abar[t_prev] if t_prev >= 0 else 1.0
        x = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
        x[half:] = free_x[half:]
        x0_hat = _x0_hat(x, eps, a_t)
        eps_hat = (x - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)  # eps consistent with the clipped x0
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        expected = math.sqrt(a_p) * x0_hat + math.sqrt(max(1 - a_p - sigma**2, 0.0)) * eps_hat
        step_noise = noise if eta > 0 and t_prev >= 0 else None
        if step_noise is not None:
            expected = expected + sigma * noise
            assert sigma > 0.01  # the eta > 0 term is really there
        got = m.ddim_update(x.float(), eps.float(), t, t_prev, None if step_noise is None else step_noise.float(),
                            eta).double()
        # float32 x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) cancels: its rounding grows as 1/sqrt(abar_t)
        atol = 2e-5 + 1e-6 / math.sqrt(a_t)
        torch.testing.assert_close(got, expected, rtol=0, atol=atol, msg=f"t={t} -> {t_prev}, eta={eta}")
        if eta == 0.0:
            # At eta 0 and an unclipped x0, the step lands exactly on q_sample(x0, t_prev) with the same eps.
            torch.testing.assert_close(got[:half], (math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps)[:half],
                                       rtol=0, atol=atol)
