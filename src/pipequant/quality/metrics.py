"""PSNR and SSIM of an image against a reference, in numpy (scikit-image is not a dependency).

SSIM is Wang et al. (2004): an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population
(co)variances, averaged over the windows that lie inside the image and then over channels. That is
what ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=..., channel_axis=-1)`` computes.
"""

from __future__ import annotations

import math

import numpy as np

SIGMA = 1.5
#: window radius: the Gaussian is cut at 3.5 sigma, as scipy's gaussian_filter (which scikit-image uses) cuts it
RADIUS = int(3.5 * SIGMA + 0.5)
K1, K2 = 0.01, 0.03


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; infinite for identical images."""
    mse = np.mean((_float(reference) - _float(image)) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(reference: np.ndarray, image: np.ndarray, data_range: float = 255.0) -> float:
    """Mean structural similarity, 1 for identical images. Arrays are (H, W) or (H, W, channels)."""
    if reference.shape != image.shape:
        raise ValueError(f"images differ in shape: {reference.shape} and {image.shape}")
    if min(reference.shape[:2]) < 2 * RADIUS + 1:
        raise ValueError(
            f"SSIM needs images of at least {2 * RADIUS + 1} x {2 * RADIUS + 1} pixels, got {reference.shape[:2]}"
        )
    x, y = _float(reference), _float(image)
    if x.ndim == 2:
        return _ssim_channel(x, y, data_range)
    return float(np.mean([_ssim_channel(x[..., c], y[..., c], data_range) for c in range(x.shape[-1])]))


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_x, mu_y = _window_mean(x), _window_mean(y)
    var_x = _window_mean(x * x) - mu_x**2
    var_y = _window_mean(y * y) - mu_y**2
    cov = _window_mean(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


def _window_mean(a: np.ndarray) -> np.ndarray:
    """Gaussian-weighted mean over every full window: separable, 'valid' positions only."""
    offsets = np.arange(-RADIUS, RADIUS + 1)
    kernel = np.exp(-0.5 * (offsets / SIGMA) ** 2)
    kernel /= kernel.sum()
    windows = np.lib.stride_tricks.sliding_window_view(a, kernel.size, axis=0) @ kernel
    return np.lib.stride_tricks.sliding_window_view(windows, kernel.size, axis=1) @ kernel


def _float(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)
