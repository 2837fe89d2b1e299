"""The paper-protocol SSIM's clamp: pyiqa takes ``relu`` of the contrast-structure term, which only matters
where the two images are anti-correlated. Checked on such pairs against an independent float64 numpy SSIM.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from skimage import data as skdata

from samdiffsr.evaluation.metrics import ssim_y_paper


def reference_ssim(sr: np.ndarray, hr: np.ndarray, clamp: bool) -> float:
    """Wang et al.'s SSIM on pyiqa's rounded Y (0..255): 11x11 Gaussian (sigma 1.5), valid windows, float64."""

    def y(img: np.ndarray) -> np.ndarray:
        rgb = img.astype(np.float64) / 255.0
        val = 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]
        # Rounding is only well defined away from .5 (the metric computes Y in float32).
        assert np.abs(val - np.floor(val) - 0.5).min() > 5e-5  # float32 Y is off by < 2e-5
        return np.round(val)

    x, z = y(sr), y(hr)
    g = np.array([math.exp(-(i * i) / (2 * 1.5**2)) for i in range(-5, 6)])
    g /= g.sum()
    win = np.outer(g, g)

    def filt(a: np.ndarray) -> np.ndarray:
        return np.einsum("ijkl,kl->ij", sliding_window_view(a, (11, 11)), win)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, mz = filt(x), filt(z)
    vx, vz, cov = filt(x * x) - mx**2, filt(z * z) - mz**2, filt(x * z) - mx * mz
    cs = (2 * cov + c2) / (vx + vz + c2)
    if clamp:
        cs = np.maximum(cs, 0.0)
    return float((((2 * mx * mz + c1) / (mx**2 + mz**2 + c1)) * cs).mean())


def photo() -> np.ndarray:
    return np.ascontiguousarray(skdata.astronaut()[120:168, 180:236])  # 48 x 56, textured


@pytest.mark.parametrize("pair", ["inverse", "half_inverted"])
def test_paper_ssim_clamps_anticorrelated_windows_at_zero(pair):
    hr = photo()
    sr = 255 - hr
    if pair == "half_inverted":  # left half identical, right half the negative: only some windows clamp
        sr[:, :28] = hr[:, :28]
    clamped, signed = reference_ssim(sr, hr, clamp=True), reference_ssim(sr, hr, clamp=False)
    assert clamped - signed > 0.1  # the clamp is active on this pair (so a missing one fails below)
    assert signed < 0 if pair == "inverse" else signed < clamped
    assert ssim_y_paper(sr, hr) == pytest.approx(clamped, abs=1e-6)  # the metric stores its window in float32


def test_paper_ssim_equals_the_reference_where_the_clamp_is_inactive():
    hr = photo()
    rng = np.random.default_rng(0)
    sr = np.clip(hr.astype(np.int16) + rng.integers(-12, 13, hr.shape), 0, 255).astype(np.uint8)
    assert reference_ssim(sr, hr, clamp=True) == reference_ssim(sr, hr, clamp=False)
    assert ssim_y_paper(sr, hr) == pytest.approx(reference_ssim(sr, hr, clamp=True), abs=1e-6)
