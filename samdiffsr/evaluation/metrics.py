"""Full-reference image metrics for 4x SR under two named protocols; every function takes ``sr`` first,
``hr`` (the reference) second.

- ``psnr_y`` / ``ssim_y``: BasicSR's (MATLAB Y in 16..235 NOT rounded, ``crop_border`` pixels cropped
  from every edge; identical images give ``psnr_y == inf``).
- ``psnr_y_paper`` / ``ssim_y_paper``: the SAM-DiffSR authors' pyiqa settings (no border crop; PSNR on Y
  in [0, 1] with 80 dB for identical images; SSIM on Y ROUNDED to integers, contrast-structure clamped at 0).

The exact definitions: docs/evaluation.md, "Metric definitions".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PSNR_Y = "psnr_y"
SSIM_Y = "ssim_y"
PSNR_Y_PAPER = "psnr_y_paper"
SSIM_Y_PAPER = "ssim_y_paper"
PIXEL_METRICS = (PSNR_Y, SSIM_Y, PSNR_Y_PAPER, SSIM_Y_PAPER)

# MATLAB rgb2ycbcr, first row: Y = 16 + (65.481 R + 128.553 G + 24.966 B) with R, G, B in [0, 1].
_Y_COEFFS = (65.481, 128.553, 24.966)
# Full matrix as pyiqa multiplies it (only its first column reaches the result).
_YCBCR_MATRIX = (
    (65.481, -37.797, 112.0),
    (128.553, -74.203, -93.786),
    (24.966, 112.0, -18.214),
)
_YCBCR_BIAS = (16.0, 128.0, 128.0)
_WIN = 11
_SIGMA = 1.5
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2
_PAPER_PSNR_EPS = 1e-8


def _check_pair(sr: np.ndarray, hr: np.ndarray, *, uint8: bool) -> None:
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr shapes differ: {sr.shape} vs {hr.shape}")
    if sr.ndim != 3 or sr.shape[2] != 3:
        raise ValueError(f"expected HxWx3 RGB images, got shape {sr.shape}")
    if uint8 and (sr.dtype != np.uint8 or hr.dtype != np.uint8):
        raise TypeError(f"expected uint8 images, got {sr.dtype} and {hr.dtype}")


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return img
    if 2 * border >= min(img.shape[:2]):
        raise ValueError(f"crop_border {border} leaves nothing of a {img.shape[:2]} image")
    return img[border:-border, border:-border]


# ----------------------------------------------------------------------------- standard (BasicSR)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2ycbcr`` luma of a uint8 HxWx3 RGB image, float64 HxW in 16..235, not rounded.

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with R, G, B in 0..255 (pure red 81.481, white
    235, black 16). The arithmetic follows BasicSR's ``to_y_channel`` step by step, including its
    float32 intermediates, so values agree with the exact formula to ~1e-5 and with BasicSR exactly.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise TypeError(f"expected a uint8 HxWx3 RGB image, got {img.dtype} {img.shape}")
    x = img.astype(np.float32) / np.float32(255.0)
    y = np.dot(x, np.asarray(_Y_COEFFS, dtype=np.float64)) + 16.0
    y = (y / 255.0).astype(np.float32) * np.float32(255.0)
    return y.astype(np.float64)


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """PSNR (dB) on MATLAB Y after cropping ``crop_border`` pixels per edge; ``inf`` if identical.

    Equals BasicSR ``calculate_psnr(sr, hr, crop_border, test_y_channel=True)`` on uint8 HxWx3 RGB.
    """
    _check_pair(sr, hr, uint8=True)
    y_sr = rgb_to_y(_crop(sr, crop_border))
    y_hr = rgb_to_y(_crop(hr, crop_border))
    mse = float(np.mean((y_sr - y_hr) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(255.0 * 255.0 / mse)


def gaussian_window_1d(size: int = _WIN, sigma: float = _SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps, as OpenCV's ``getGaussianKernel(size, sigma)`` builds them."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def _valid_filter(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D float64 array with outer(k, k)."""
    n = k.size
    rows = np.lib.stride_tricks.sliding_window_view(img, n, axis=0) @ k
    return np.lib.stride_tricks.sliding_window_view(rows, n, axis=1) @ k


def _ssim_basicsr(a: np.ndarray, b: np.ndarray) -> float:
    if min(a.shape) < _WIN:
        raise ValueError(f"SSIM needs at least {_WIN}x{_WIN} pixels after cropping, got {a.shape}")
    k = gaussian_window_1d()
    mu1, mu2 = _valid_filter(a, k), _valid_filter(b, k)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = _valid_filter(a * a, k) - mu1_sq
    s2 = _valid_filter(b * b, k) - mu2_sq
    s12 = _valid_filter(a * b, k) - mu1_mu2
    num = (2 * mu1_mu2 + _C1) * (2 * s12 + _C2)
    den = (mu1_sq + mu2_sq + _C1) * (s1 + s2 + _C2)
    return float(np.mean(num / den))


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """SSIM on MATLAB Y (0..255, float64) after cropping ``crop_border`` pixels per edge.

    Equals BasicSR ``calculate_ssim(sr, hr, crop_border, test_y_channel=True)`` on uint8 HxWx3 RGB
    (BasicSR filters with ``cv2.filter2D`` then crops 5 pixels: the same as 'valid' filtering here).
    """
    _check_pair(sr, hr, uint8=True)
    return _ssim_basicsr(rgb_to_y(_crop(sr, crop_border)), rgb_to_y(_crop(hr, crop_border)))


# ----------------------------------------------------------------------------- paper (pyiqa)


def _to_unit_float32(img: np.ndarray) -> torch.Tensor:
    """uint8 -> /255 (as ``caculate_iqa.load_img``); float arrays in [0, 1] are taken as they are."""
    if img.dtype == np.uint8:
        arr = img.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(img.dtype, np.floating):
        arr = img.astype(np.float32)
    else:
        raise TypeError(f"expected uint8 or float images, got {img.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _pyiqa_y(img: np.ndarray) -> torch.Tensor:
    """pyiqa ``rgb2ycbcr(x)[:, 0]``: Y in [0, 1] as a float32 HxW tensor (16/255..235/255)."""
    x = _to_unit_float32(img)
    w = torch.tensor(_YCBCR_MATRIX, dtype=torch.float32)
    bias = torch.tensor(_YCBCR_BIAS, dtype=torch.float32)
    return ((torch.matmul(x, w) + bias) / 255.0)[..., 0]


def psnr_y_paper(sr: np.ndarray, hr: np.ndarray) -> float:
    """Paper protocol PSNR-Y (pyiqa ``psnr``, ``test_y_channel=True, color_space='ycbcr'``), no crop.

    Inputs: uint8 HxWx3 RGB (divided by 255) or float HxWx3 RGB in [0, 1]. Identical images -> 80 dB.
    """
    _check_pair(sr, hr, uint8=False)
    diff = _pyiqa_y(sr) - _pyiqa_y(hr)
    mse = torch.mean(diff**2)
    return float(10 * torch.log10(1.0 / (mse + _PAPER_PSNR_EPS)))


def _pyiqa_window() -> torch.Tensor:
    """MATLAB ``fspecial('gaussian', 11, 1.5)`` as pyiqa stores it: float32 values, used in float64."""
    k = gaussian_window_1d()
    return torch.from_numpy(np.outer(k, k)).float().double().view(1, 1, _WIN, _WIN)


def ssim_y_paper(sr: np.ndarray, hr: np.ndarray) -> float:
    """Paper protocol SSIM (pyiqa ``ssim``, ``color_space='ycbcr'``): rounded Y in 0..255, no crop.

    Inputs as for :func:`psnr_y_paper`. Identical images -> 1.0.
    """
    _check_pair(sr, hr, uint8=False)
    if min(sr.shape[:2]) < _WIN:
        raise ValueError(f"SSIM needs at least {_WIN}x{_WIN} pixels, got {sr.shape[:2]}")
    x = torch.round(_pyiqa_y(sr) * 255.0).double()[None, None]
    y = torch.round(_pyiqa_y(hr) * 255.0).double()[None, None]
    win = _pyiqa_window()
    mu1, mu2 = F.conv2d(x, win), F.conv2d(y, win)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    s1 = F.conv2d(x * x, win) - mu1_sq
    s2 = F.conv2d(y * y, win) - mu2_sq
    s12 = F.conv2d(x * y, win) - mu1_mu2
    cs = F.relu((2 * s12 + _C2) / (s1 + s2 + _C2))
    ssim_map = ((2 * mu1_mu2 + _C1) / (mu1_sq + mu2_sq + _C1)) * cs
    return float(ssim_map.mean())


# ----------------------------------------------------------------------------- all at once


def pixel_metrics(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> dict[str, float]:
    """All four pixel metrics of one uint8 RGB pair, keyed by :data:`PIXEL_METRICS`.

    ``crop_border`` applies to the standard protocol only; the paper protocol never crops.
    """
    return {
        PSNR_Y: psnr_y(sr, hr, crop_border),
        SSIM_Y: ssim_y(sr, hr, crop_border),
        PSNR_Y_PAPER: psnr_y_paper(sr, hr),
        SSIM_Y_PAPER: ssim_y_paper(sr, hr),
    }
