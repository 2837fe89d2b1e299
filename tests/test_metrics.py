"""PSNR-Y / SSIM-Y, standard (BasicSR) and paper (pyiqa) protocols, on real photos vs hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from samdiffsr.evaluation.metrics import (
    PIXEL_METRICS,
    pixel_metrics,
    psnr_y,
    psnr_y_paper,
    rgb_to_y,
    ssim_y,
    ssim_y_paper,
)

C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2
PHOTOS = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee}


def exact_y(img: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr luma written straight from its documented coefficients, float64."""
    rgb = img.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def psnr_255(y_a: np.ndarray, y_b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / np.mean((y_a - y_b) ** 2))


def skimage_ssim(y_a: np.ndarray, y_b: np.ndarray) -> float:
    """Wang et al. SSIM by scikit-image: same Gaussian (11 taps, sigma 1.5), same 5-pixel valid crop."""
    return structural_similarity(
        y_a, y_b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )


def noisy(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape).round()
    return np.clip(img.astype(np.int64) + noise.astype(np.int64), 0, 255).astype(np.uint8)


def flat(value: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


# --------------------------------------------------------------------------- Y conversion


@pytest.mark.parametrize(
    ("rgb", "expected"),
    [
        ((255, 0, 0), 81.481),
        ((0, 255, 0), 144.553),
        ((0, 0, 255), 40.966),
        ((255, 255, 255), 235.0),
        ((0, 0, 0), 16.0),
        ((128, 128, 128), 16.0 + 219.0 * 128 / 255),
        ((12, 200, 77), 16.0 + (65.481 * 12 + 128.553 * 200 + 24.966 * 77) / 255),
    ],
)
def test_rgb_to_y_matlab_coefficients(rgb, expected):
    y = rgb_to_y(np.array(rgb, dtype=np.uint8).reshape(1, 1, 3))
    assert y.dtype == np.float64 and y.shape == (1, 1)
    assert y[0, 0] == pytest.approx(expected, abs=5e-5)  # float32 intermediates, as BasicSR


def test_rgb_to_y_whole_photo_not_rounded():
    img = data.astronaut()
    y = rgb_to_y(img)
    assert np.max(np.abs(y - exact_y(img))) < 5e-5
    assert np.any(np.abs(y - np.round(y)) > 0.1)  # Y is not quantised
    assert 16.0 - 1e-4 <= y.min() and y.max() <= 235.0 + 1e-4


def test_rgb_to_y_rejects_non_uint8():
    with pytest.raises(TypeError):
        rgb_to_y(data.astronaut().astype(np.float32) / 255)


# --------------------------------------------------------------------------- identical images


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_identical_images(name):
    img = PHOTOS[name]()
    assert psnr_y(img, img, crop_border=4) == float("inf")
    assert ssim_y(img, img, crop_border=4) == pytest.approx(1.0, abs=1e-12)
    assert psnr_y_paper(img, img) == pytest.approx(80.0, abs=1e-4)  # 10 log10(1 / 1e-8): pyiqa's eps
    assert ssim_y_paper(img, img) == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------- hand-computed values


def test_plus_one_on_every_channel_psnr_by_hand():
    hr = np.minimum(data.coffee(), 254)
    sr = hr + 1
    # Every pixel's Y moves by (65.481 + 128.553 + 24.966) / 255 = 219 / 255.
    expected = 20 * math.log10(255.0 * 255.0 / 219.0)
    assert expected == pytest.approx(49.45272, abs=1e-5)
    assert psnr_y(sr, hr, crop_border=4) == pytest.approx(expected, abs=1e-4)
    assert psnr_y(sr, hr, crop_border=0) == pytest.approx(expected, abs=1e-4)
    # pyiqa: Y in [0, 1] so the step is 219 / 255^2, and the eps 1e-8 enters the denominator.
    step = 219.0 / 255.0**2
    assert psnr_y_paper(sr, hr) == pytest.approx(10 * math.log10(1 / (step**2 + 1e-8)), abs=2e-3)


@pytest.mark.parametrize(("value", "rounded_hr", "rounded_sr"), [(100, 102, 103), (24, 37, 37)])
def test_flat_images_ssim_by_hand(value, rounded_hr, rounded_sr):
    hr, sr = flat(value), flat(value + 1)
    y_hr, y_sr = exact_y(hr)[0, 0], exact_y(sr)[0, 0]
    # Flat images: all variances are 0, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    expected = (2 * y_hr * y_sr + C1) / (y_hr**2 + y_sr**2 + C1)
    assert ssim_y(sr, hr, crop_border=4) == pytest.approx(expected, abs=1e-8)  # float32 Y, as BasicSR
    assert expected < 1.0
    # The paper protocol rounds Y first (101.88 -> 102, 102.74 -> 103; 36.61 and 37.47 both -> 37).
    assert (round(y_hr), round(y_sr)) == (rounded_hr, rounded_sr)
    a, b = float(rounded_hr), float(rounded_sr)
    assert ssim_y_paper(sr, hr) == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), abs=1e-9)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_known_additive_noise(name):
    hr = PHOTOS[name]()
    sr = noisy(hr, sigma=6.0, seed=1)
    crop = 4
    y_sr, y_hr = exact_y(sr[crop:-crop, crop:-crop]), exact_y(hr[crop:-crop, crop:-crop])
    by_hand = psnr_255(y_sr, y_hr)
    assert psnr_y(sr, hr, crop_border=crop) == pytest.approx(by_hand, abs=1e-4)
    independent = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    assert psnr_y(sr, hr, crop_border=crop) == pytest.approx(independent, abs=1e-4)
    assert 25 < by_hand < 45
    assert ssim_y(sr, hr, crop_border=crop) == pytest.approx(skimage_ssim(y_sr, y_hr), abs=1e-6)


def test_one_pixel_shift():
    hr = data.astronaut()
    sr = np.empty_like(hr)
    sr[:, 1:] = hr[:, :-1]  # content moves one pixel right
    sr[:, 0] = hr[:, 0]
    crop = 4
    y = exact_y(hr)
    # Inside the crop every SR pixel is its left neighbour in HR.
    diff = y[crop:-crop, crop - 1 : -crop - 1] - y[crop:-crop, crop:-crop]
    expected = 10 * math.log10(255.0**2 / np.mean(diff**2))
    assert psnr_y(sr, hr, crop_border=crop) == pytest.approx(expected, abs=1e-4)
    s = ssim_y(sr, hr, crop_border=crop)
    inner = (slice(crop, -crop), slice(crop, -crop))
    assert s == pytest.approx(skimage_ssim(exact_y(sr)[inner], y[inner]), abs=1e-6)
    # A one-pixel shift is a strong degradation for both metrics compared with mild noise.
    mild = noisy(hr, sigma=2.0, seed=3)
    assert psnr_y(sr, hr, crop) < psnr_y(mild, hr, crop)
    assert s < ssim_y(mild, hr, crop)


# --------------------------------------------------------------------------- the two protocols


def test_border_only_damage_separates_the_protocols():
    hr = data.chelsea()
    sr = hr.copy()
    sr[:2] = 0  # damage the 2 top rows only: inside the standard protocol's 4-pixel crop
    assert psnr_y(sr, hr, crop_border=4) == float("inf")
    assert ssim_y(sr, hr, crop_border=4) == pytest.approx(1.0, abs=1e-12)
    assert psnr_y(sr, hr, crop_border=0) < 35
    assert psnr_y_paper(sr, hr) == pytest.approx(psnr_y(sr, hr, crop_border=0), abs=1e-3)
    assert ssim_y_paper(sr, hr) < 0.999  # only windows reaching the 2 damaged rows drop


def test_paper_protocol_matches_its_definition_on_noise():
    hr = data.coffee()
    sr = noisy(hr, sigma=5.0, seed=7)
    # Same MSE up to the 255 scale: PSNR agrees with the uncropped standard one (eps, float32 aside).
    assert psnr_y_paper(sr, hr) == pytest.approx(psnr_y(sr, hr, crop_border=0), abs=2e-3)
    # SSIM on ROUNDED Y, no crop; the relu on the cs term is inactive for mild noise.
    rounded = skimage_ssim(np.round(exact_y(sr)), np.round(exact_y(hr)))
    assert ssim_y_paper(sr, hr) == pytest.approx(rounded, abs=1e-6)
    assert ssim_y_paper(sr, hr) != pytest.approx(ssim_y(sr, hr, crop_border=0), abs=1e-4)
    assert ssim_y_paper(sr, hr) == pytest.approx(ssim_y(sr, hr, crop_border=0), abs=2e-2)


def test_paper_protocol_accepts_unit_floats():
    hr = data.astronaut()[:96, :128]
    sr = noisy(hr, sigma=4.0, seed=2)
    as_float = sr.astype(np.float32) / 255, hr.astype(np.float32) / 255
    assert psnr_y_paper(*as_float) == psnr_y_paper(sr, hr)
    assert ssim_y_paper(*as_float) == ssim_y_paper(sr, hr)


def test_pixel_metrics_keys_and_values():
    hr = data.chelsea()
    sr = noisy(hr, sigma=3.0, seed=5)
    out = pixel_metrics(sr, hr, crop_border=4)
    assert tuple(out) == PIXEL_METRICS == ("psnr_y", "ssim_y", "psnr_y_paper", "ssim_y_paper")
    assert out["psnr_y"] == psnr_y(sr, hr, 4) and out["ssim_y_paper"] == ssim_y_paper(sr, hr)


def test_input_errors():
    img = data.astronaut()[:64, :64]
    with pytest.raises(ValueError):
        psnr_y(img, img[:, :32], crop_border=0)
    with pytest.raises(ValueError):
        ssim_y(img, img, crop_border=32)
    with pytest.raises(TypeError):
        psnr_y(img.astype(np.float64), img.astype(np.float64), crop_border=0)
    with pytest.raises(ValueError):
        ssim_y(img[:14, :14], img[:14, :14], crop_border=2)  # 10x10 left: smaller than the window
