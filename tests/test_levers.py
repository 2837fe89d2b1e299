"""The convergence levers (docs/training.md, "Convergence levers"), each against a hand computation.

The engine side (the paper configs training exactly as before, each lever changing the training, the EMA
warm-up in real runs) is tests/test_levers_engine.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from train_helpers import REPO

from samdiffsr.config import ConfigError, ModelConfig, load_config
from samdiffsr.models import build_model
from samdiffsr.models.diffusion import TrainingLevers, low_noise_timestep_probabilities
from samdiffsr.train.ema import EMA


# --- 1. EMA warm-up -----------------------------------------------------------------------------------
def warm_decay(t: int, power: float, cap: float) -> float:
    return min(cap, 1.0 - (1.0 + t) ** -power)


def test_ema_warmup_decay_at_steps_0_10_1000_by_hand():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.999, warmup_power=2 / 3)
    # By hand: 11^(2/3) = e^(2/3 ln 11) = 4.94609 and 1001^(2/3) = 100.0667; beyond 10^6 updates the cap.
    for t, expected in ((0, 0.0), (10, 1 - 1 / 4.94609), (1000, 1 - 1 / 100.0667), (10**6, 0.999)):
        ema.updates.fill_(t)
        assert ema.current_decay().item() == pytest.approx(expected, abs=2e-6), f"t = {t}"
        assert ema.current_decay().item() == pytest.approx(warm_decay(t, 2 / 3, 0.999), rel=1e-12)
    assert EMA(torch.nn.Linear(2, 2), decay=0.999).current_decay().item() == pytest.approx(0.999, rel=1e-12)


def test_ema_with_warmup_equals_its_formula_skips_do_not_count_and_the_counter_survives_a_state_dict():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9, warmup_power=0.75)
    expected = [p.detach().double().clone() for p in net.parameters()]
    t = 0
    for step, applied in enumerate([True, True, False, True, True]):
        if step == 3:  # a resume: the state dict carries the counter
            saved = ema.state_dict()
            ema = EMA(net, decay=0.9, warmup_power=0.75)
            ema.load_state_dict(saved)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.step(torch.tensor(applied))
        if applied:
            d = warm_decay(t, 0.75, 0.9)
            expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, net.parameters(), strict=True)]
            t += 1
        for shadow, e in zip(ema.shadow, expected, strict=True):
            torch.testing.assert_close(shadow.double(), e, rtol=1e-6, atol=1e-7)
    assert int(ema.updates) == t == 4
    # The first update copied the weights (decay 0): a constant-decay EMA would still be far from them.
    old = {k: v for k, v in ema.state_dict().items() if k != EMA.UPDATES_KEY}  # a checkpoint from before the counter
    ema.load_state_dict(old, updates_if_absent=7)
    assert int(ema.updates) == 7


# --- 2. Min-SNR-gamma ---------------------------------------------------------------------------------
PAPER_T = 100


def tiny_model(loss_type: str = "l1", timesteps: int = PAPER_T) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden_size=8, dim_mults=(1, 2), rrdb_num_block=2, rrdb_num_feat=8,
                                   rrdb_growth=4, timesteps=timesteps, loss_type=loss_type)).eval()


def cosine_snr(t: int, T: int = PAPER_T, s: float = 0.008) -> float:
    """SNR of timestep t (0-based) by hand: abar_t = f((t + 1) / T) / f(0), f(u) = cos((u + s) / (1 + s) pi/2)^2.

    (The schedule's clip of beta at 0.999 changes only the last timestep, not asked for here.)
    """
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = f((t + 1) / T) / f(0)
    return abar / (1 - abar)


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_min_snr_weights_at_a_few_timesteps_by_hand(loss_type):
    model, gamma = tiny_model(loss_type), 5.0
    ts = [0, 5, 10, 20, 30, 50, 98]
    got = model.min_snr_weights(torch.tensor(ts), gamma).double()
    expected = [min(cosine_snr(t), gamma) / cosine_snr(t) for t in ts]  # Hang et al.: eps prediction, MSE
    if loss_type == "l1":
        expected = [math.sqrt(w) for w in expected]  # the L1 adaptation (docs/training.md)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert got[0] < 0.1 and got[-1] == 1.0  # the low-noise end weighted down, the noisy end untouched


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_min_snr_weighted_loss_on_a_tiny_input_by_hand(loss_type):
    model, gamma = tiny_model(loss_type), 5.0
    g = torch.Generator().manual_seed(3)
    hr = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    lr = F.avg_pool2d(hr, 4)
    lr_up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    mask = torch.rand(3, 1, 16, 16, generator=g)
    noise, t = torch.randn(hr.shape, generator=g), torch.tensor([0, 12, 70])
    got = model.training_loss(hr, lr, lr_up, mask, t=t, noise=noise, levers=TrainingLevers(snr_gamma=gamma))
    # By hand: the modulated target eps' = eps + m sqrt(1 - abar_t) beta_t, x_t, the UNet's prediction, then
    # each sample's mean error times its weight, averaged over the batch.
    abar = torch.tensor([1 / (1 + 1 / cosine_snr(int(i))) for i in t], dtype=torch.float64)
    beta = model.betas.double()[t]
    target = noise.double() + mask.double() * (torch.sqrt(1 - abar) * beta).view(-1, 1, 1, 1)
    x0 = ((hr - lr_up) * 2).clamp(-1, 1).double()
    x_t = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * target
    with torch.no_grad():
        pred = model.denoise_fn(x_t.float(), t, model.rrdb(lr, True)[1]).double()
    err = (target - pred).abs() if loss_type == "l1" else (target - pred) ** 2
    snr = torch.tensor([cosine_snr(int(i)) for i in t], dtype=torch.float64)
    w = torch.minimum(snr, torch.tensor(gamma)) / snr
    w = w.sqrt() if loss_type == "l1" else w
    expected = (w * err.flatten(1).mean(1)).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = model.training_loss(hr, lr, lr_up, mask, t=t, noise=noise)
    assert plain.item() == pytest.approx(err.mean().item(), rel=1e-5) and plain.item() > got.item() * 1.2
    # gamma 0 is the paper's loss, bit for bit.
    assert torch.equal(model.training_loss(hr, lr, lr_up, mask, t=t, noise=noise, levers=TrainingLevers()), plain)


# --- 3. low-noise timestep sampling -------------------------------------------------------------------
def test_low_noise_timestep_probabilities_and_draws_follow_the_formula():
    # By hand for T = 10, k = 2: p(t) = (10 - t)^2 / (1 + 4 + ... + 100) = (10 - t)^2 / 385.
    probs = low_noise_timestep_probabilities(10, 2.0)
    assert probs == pytest.approx([(10 - t) ** 2 / 385 for t in range(10)], rel=1e-12)
    assert low_noise_timestep_probabilities(10, 0.0) == pytest.approx([0.1] * 10, rel=1e-12)
    model, n = tiny_model(timesteps=10), 100_000
    for power in (1.0, 2.0):
        drawn = model.draw_timesteps(n, torch.Generator().manual_seed(5), torch.device("cpu"), power)
        counts = np.bincount(drawn.numpy(), minlength=10)
        expected = n * low_noise_timestep_probabilities(10, power)
        assert chisquare(counts, expected).pvalue > 1e-3, (power, counts)
        assert chisquare(counts, np.full(10, n / 10)).pvalue < 1e-12  # the test can tell it from uniform
    # Power 0 is the paper's draw: torch.randint on the same generator.
    uniform = model.draw_timesteps(64, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(uniform, torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(5)))


# --- the keys -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, named", [
    ("train.timestep_sampling=late", "'train.timestep_sampling'"), ("train.timestep_power=0", "'train.timestep_power'"),
    ("train.snr_gamma=-1", "'train.snr_gamma'"), ("train.ema_warmup_power=-0.5", "'train.ema_warmup_power'"),
    ("train.ema_warmup_power=0.75", "'train.ema_warmup_power' and 'train.ema_decay'"),  # no EMA to warm up
])
def test_lever_keys_are_validated_in_one_line(override, named):
    with pytest.raises(ConfigError, match=named) as caught:
        load_config(REPO / "configs" / "samdiffsr_df2k4x.yaml", [override])
    assert "\n" not in str(caught.value)


def test_the_levers_are_off_in_the_paper_configs_and_parse_when_given():
    for name in ("samdiffsr_df2k4x.yaml", "authors_samdiffsr_df2k4x.yaml", "authors_rrdb_samdiffsr_df2k4x.yaml"):
        t = load_config(REPO / "configs" / name).train
        assert (t.ema_warmup_power, t.snr_gamma, t.timestep_sampling) == (0.0, 0.0, "uniform"), name
    t = load_config(REPO / "configs" / "demo.yaml", ["train.snr_gamma=5", "train.timestep_sampling=low_noise",
                                                     "train.timestep_power=2", "train.ema_warmup_power=0.75"]).train
    assert (t.snr_gamma, t.timestep_sampling, t.timestep_power, t.ema_warmup_power) == (5.0, "low_noise", 2.0, 0.75)
