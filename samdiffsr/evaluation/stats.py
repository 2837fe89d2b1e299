"""Paired differences between ablation arms, with bootstrap confidence intervals over images and seeds.

Every arm is scored on the same images with the same sampler noise, and arm k with seed s starts from the same
weights and sees the same batches as every other arm with seed s: the difference ``d[s, i] = arm(s, i) -
baseline(s, i)`` is paired. The interval resamples seeds and images independently (a crossed design), so it
widens both with image-to-image spread and with run-to-run (seed) spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Metrics where a lower value is better; every other metric is higher-is-better.
LOWER_IS_BETTER = ("lpips", "fid", "niqe")


def lower_is_better(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER)


@dataclass(frozen=True)
class PairedDifference:
    """A mean over seeds x images (of ``arm - baseline``, or of one arm) and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int
    images: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_mean(grid: np.ndarray, resamples: int = 10000, confidence: float = 0.95,
                   seed: int = 0) -> PairedDifference:
    """Bootstrap the mean of a ``seeds x images`` array (paired differences, or one arm's own scores).

    Each resample draws ``seeds`` rows and ``images`` columns with replacement, independently, and takes the
    mean of the selected grid; the interval is the central ``confidence`` share of those means (numpy's
    linear-interpolation quantiles). Deterministic for a given ``seed``.
    """
    d = np.asarray(grid, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"expected a non-empty seeds x images array, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("the values to bootstrap hold NaN or Inf")
    n_seeds, n_images = d.shape
    rng = np.random.default_rng(seed)
    # Counts of each seed / image in every resample: the grid mean is then one weighted contraction.
    seed_counts = _draw_counts(rng, resamples, n_seeds)
    image_counts = _draw_counts(rng, resamples, n_images)
    means = np.einsum("bs,si,bi->b", seed_counts, d, image_counts) / (n_seeds * n_images)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(d.mean()), float(low), float(high), n_seeds, n_images)


def _draw_counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    picks = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(counts, (np.arange(resamples)[:, None], picks), 1.0)
    return counts


def format_difference(metric: str, diff: PairedDifference) -> str:
    """``+0.007 dB [-0.008, +0.039]`` for a PSNR, ``+0.0012 [-0.0004, +0.0031]`` for SSIM, LPIPS and the rest.

    A fixed number of decimals per unit (never significant figures): the eye compares a mean with its bounds.
    """
    if metric.startswith("psnr"):
        return f"{diff.mean:+.3f} dB [{diff.low:+.3f}, {diff.high:+.3f}]"
    if metric.startswith("fid"):
        return f"{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]"
    return f"{diff.mean:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]"


def verdict(metric: str, diff: PairedDifference) -> str:
    """``better`` / ``worse`` when the interval excludes zero (the metric's direction decides which),
    else ``within noise``."""
    if not diff.excludes_zero:
        return "within noise"
    gain = diff.mean < 0 if lower_is_better(metric) else diff.mean > 0
    return "better" if gain else "worse"


def images_needed(diff: PairedDifference) -> int | None:
    """How many images (at the same seed count) would shrink the interval's half-width below ``|mean|``.

    The half-width falls as 1/sqrt(images); None when the mean is exactly zero (no budget resolves it).
    """
    half_width = (diff.high - diff.low) / 2
    if diff.mean == 0:
        return None
    if half_width < abs(diff.mean):
        return diff.images
    return int(np.ceil(diff.images * (half_width / abs(diff.mean)) ** 2))
