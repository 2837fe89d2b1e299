"""The paired bootstrap against values worked out by hand on fixed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from samdiffsr.evaluation.stats import PairedDifference, bootstrap_mean, format_difference, images_needed, verdict


def test_two_images_one_seed_give_the_hand_computed_interval():
    # Resampling two images [1, 3] gives means 1, 2, 3 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles of that distribution are exactly 1 and 3.
    diff = bootstrap_mean(np.array([[1.0, 3.0]]), resamples=4000)
    assert (diff.mean, diff.low, diff.high) == (2.0, 1.0, 3.0)
    assert diff.excludes_zero and (diff.seeds, diff.images) == (1, 2)


def test_seeds_are_resampled_too():
    # The two seeds disagree (0 vs 2) while images agree within a seed: only seed resampling can widen the
    # interval, to [0, 2] by the same 1/4, 1/2, 1/4 argument.
    diff = bootstrap_mean(np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]), resamples=4000)
    assert (diff.mean, diff.low, diff.high) == (1.0, 0.0, 2.0)
    assert not diff.excludes_zero


def test_a_constant_difference_has_a_zero_width_interval():
    diff = bootstrap_mean(np.full((2, 5), -0.25))
    assert (diff.mean, diff.low, diff.high) == (-0.25, -0.25, -0.25)


def test_the_interval_matches_the_normal_approximation_for_many_images():
    # 400 i.i.d. differences with sd 1: the 95% interval of the mean is about +-1.96/sqrt(400) = +-0.098.
    d = np.random.default_rng(3).normal(0.5, 1.0, size=(1, 400))
    diff = bootstrap_mean(d, resamples=20000)
    half = (diff.high - diff.low) / 2
    assert half == pytest.approx(1.96 * d.std() / 20, rel=0.05)
    assert diff.low < diff.mean < diff.high


def test_deterministic_for_a_seed():
    d = np.random.default_rng(0).normal(size=(2, 7))
    assert bootstrap_mean(d, seed=5) == bootstrap_mean(d, seed=5)
    assert bootstrap_mean(d, seed=5) != bootstrap_mean(d, seed=6)


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.zeros(3), np.array([[1.0, np.nan]])])
def test_bad_input_is_refused(bad):
    with pytest.raises(ValueError):
        bootstrap_mean(bad)


def test_verdict_follows_the_metrics_direction():
    up = PairedDifference(0.2, 0.1, 0.3, 2, 10)
    down = PairedDifference(-0.2, -0.3, -0.1, 2, 10)
    noise = PairedDifference(0.05, -0.1, 0.2, 2, 10)
    assert (verdict("psnr_y", up), verdict("psnr_y", down), verdict("psnr_y", noise)) == \
        ("better", "worse", "within noise")
    assert (verdict("lpips_alex", up), verdict("lpips_alex", down)) == ("worse", "better")


def test_images_needed_scales_with_the_square_of_the_width_ratio():
    # Half-width 0.2 against a mean of 0.05: 4x too wide, so 16x the images.
    assert images_needed(PairedDifference(0.05, -0.15, 0.25, 2, 10)) == 160
    assert images_needed(PairedDifference(0.3, 0.1, 0.5, 2, 10)) == 10  # already resolved
    assert images_needed(PairedDifference(0.0, -0.1, 0.1, 2, 10)) is None


def test_differences_are_printed_with_fixed_decimals_per_unit():
    d = PairedDifference(0.00712, -0.00791, 0.03948, 2, 26)
    assert format_difference("psnr_y", d) == "+0.007 dB [-0.008, +0.039]"
    assert format_difference("ssim_y", PairedDifference(0.00123, -0.0004, 0.00314, 1, 26)) == \
        "+0.0012 [-0.0004, +0.0031]"
    assert format_difference("lpips", PairedDifference(-0.02, -0.031, -0.009, 1, 26)) == "-0.0200 [-0.0310, -0.0090]"
    assert format_difference("fid", PairedDifference(1.234, -0.5, 3.0, 1, 26)) == "+1.23 [-0.50, +3.00]"
