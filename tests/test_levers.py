"""The convergence levers (docs/training.md, "Convergence levers"), each against a hand computation, and the
paper configs training exactly as before with the levers absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from train_helpers import REPO, TINY, write_rrdb_weights, write_shards

from samdiffsr.config import ModelConfig, load_config
from samdiffsr.models import build_model
from samdiffsr.models.diffusion import TrainingLevers, low_noise_timestep_probabilities
from samdiffsr.train.ema import EMA
from samdiffsr.train.engine import main


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

# --- the paper configs train exactly as before --------------------------------------------------------
# Per-step losses (losses.jsonl) and the sum of the final EMA weights (float64) of the runs below, recorded
# with this file's `engine_run` on the ORIGINAL code (commit e7b3cca, before the levers existed):
#   cd /work/base && PYTHONPATH=/work/base python -m pytest -q tests/test_levers.py -k record -s
# on torch 2.14.1, CPU capability AVX512, 2 threads. Float results of the convolutions depend on the kernels the
# CPU selects and on the thread count; elsewhere the comparison is to 1e-5 (see `assert_same`).
RECORDED_ON = ("2.14.1", "AVX512", 2)
PAPER_LOSSES = [0.8175837397575378, 0.8172285556793213, 0.8098910450935364]
AUTHORS_LOSSES = [0.8175838589668274, 0.8172280788421631, 0.8098906874656677, 0.8137955069541931]
AUTHORS_EMA_SUM = 414.6281066693118
PAPER_STEPS, AUTHORS_STEPS = 3, 4


def environment() -> tuple[str, str, int]:
    return torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("levers")
    return {"good": write_shards(root / "good"), "rrdb": write_rrdb_weights(root / "rrdb.pt"),
            # Every mask value so large that the modulated noise overflows float32: each step is skipped.
            "inf": write_shards(root / "inf", sizes=(4,), mask_values=(3e38, 3e38, 3e38))}


def engine_run(data: dict[str, str], run_dir: Path, config: str, *extra: str, shards: str = "good") -> dict:
    """A real engine run of ``configs/<config>`` with the TINY model; returns its per-step losses and final EMA."""
    main(["--config", str(REPO / "configs" / config), *TINY, f"data.train_shards={data[shards]}", "data.val_shards=",
          f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}", "train.log_every=1", *extra])
    records = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    final = sorted((run_dir / "weights").glob("step*.pt"))[-1]
    ema = torch.load(final, map_location="cpu", weights_only=True)["ema"]
    return {"losses": [r["loss"] for r in records], "skipped": [r["skipped"] for r in records], "ema": ema,
            "ema_sum": sum(v.double().sum().item() for v in ema.values()) if ema else 0.0}


def paper_run(data, tmp_path: Path, *extra: str) -> dict:
    return engine_run(data, tmp_path / "paper", "samdiffsr_df2k4x.yaml", f"train.max_steps={PAPER_STEPS}", *extra)


def authors_run(data, tmp_path: Path, name: str, *extra: str, shards: str = "good") -> dict:
    """The authors' config, with an EMA (the paper trains without one) so that the EMA's path is covered too."""
    return engine_run(data, tmp_path / name, "authors_samdiffsr_df2k4x.yaml", "train.ema_decay=0.9",
                      f"train.max_steps={AUTHORS_STEPS}", *extra, shards=shards)


def test_record(data, tmp_path):
    """Prints the reference values (run on the original code to record them; see the comment above)."""
    paper, authors = paper_run(data, tmp_path), authors_run(data, tmp_path, "authors")
    print(f"\nRECORDED_ON = {environment()}")
    print(f"PAPER_LOSSES = {paper['losses']}\nAUTHORS_LOSSES = {authors['losses']}\n"
          f"AUTHORS_EMA_SUM = {authors['ema_sum']!r}")


def assert_same(got: list[float] | float, recorded: list[float] | float) -> None:
    """Exactly equal where the reference was recorded (same torch, CPU kernels, threads); to 1e-5 elsewhere."""
    if environment() == RECORDED_ON:
        assert got == recorded
    else:
        assert got == pytest.approx(recorded, rel=1e-5), f"recorded on {RECORDED_ON}, running on {environment()}"


def test_the_paper_configs_train_exactly_as_before_with_the_levers_absent(data, tmp_path):
    paper = paper_run(data, tmp_path)
    assert len(paper["losses"]) == PAPER_STEPS and not any(paper["skipped"])
    assert_same(paper["losses"], PAPER_LOSSES)
    authors = authors_run(data, tmp_path, "authors")
    assert_same(authors["losses"], AUTHORS_LOSSES)
    assert_same(authors["ema_sum"], AUTHORS_EMA_SUM)


@pytest.mark.parametrize("lever", ["train.snr_gamma=5", "train.timestep_sampling=low_noise"])
def test_each_loss_lever_changes_the_training(data, tmp_path, lever):
    on = authors_run(data, tmp_path, "on", lever)
    assert not any(on["skipped"]) and len(on["losses"]) == AUTHORS_STEPS
    assert all(a != b for a, b in zip(on["losses"], AUTHORS_LOSSES, strict=True))  # from the first step on
    assert on["ema_sum"] != AUTHORS_EMA_SUM


def test_ema_warmup_in_training_equals_its_formula_across_a_skipped_step_and_a_resume(data, tmp_path):
    """Per-step weights of a run split into parts (steps 1-2 | 3, every update skipped | 4-5): the EMA of each
    step recomputed with the warm-up decay of its applied-update count (the skipped step 3 does not count)."""
    warm = ("train.ema_warmup_power=0.75", "train.ckpt_every=1", "train.keep_last=20")
    first = authors_run(data, tmp_path, "warm", *warm, "train.max_steps=2")
    assert_same(first["losses"], AUTHORS_LOSSES[:2])  # the warm-up changes only the average, not the training
    assert authors_run(data, tmp_path, "warm", *warm, "train.max_steps=3", shards="inf")["skipped"][2]
    record = authors_run(data, tmp_path, "warm", *warm, "train.max_steps=5")
    assert record["skipped"] == [False, False, True, False, False]

    cfg = load_config(REPO / "configs" / "authors_samdiffsr_df2k4x.yaml", TINY)
    torch.manual_seed(cfg.train.seed)  # the weights the engine starts from (see test_train_numerics.py)
    trained = [f"denoise_fn.{n}" for n, _ in build_model(cfg.model).denoise_fn.named_parameters()]
    ema, applied = None, 0
    for step in range(1, 6):
        w = torch.load(tmp_path / "warm" / "weights" / f"step{step:08d}.pt", map_location="cpu", weights_only=True)
        now = {k: w["model"][k].double() for k in trained}
        if not record["skipped"][step - 1]:
            d = warm_decay(applied, 0.75, 0.9)  # t = 0: decay 0, the EMA becomes the weights
            ema = {k: d * ema[k] + (1 - d) * now[k] if ema else now[k] for k in trained}
            applied += 1
        for k in trained:
            torch.testing.assert_close(w["ema"][k].double(), ema[k], rtol=1e-6, atol=1e-7, msg=f"step {step} {k}")
    # Had the resume restarted the warm-up at t = 0 (decay 0), the EMA at step 5 would be the weights themselves.
    assert any(not torch.allclose(ema[k], now[k]) for k in trained)
