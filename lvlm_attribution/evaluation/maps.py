"""Map utilities shared by the metrics: validation, resampling, normalisation, baseline maps.

Conventions (docs/metrics.md, "Conventions"):
- a saliency map is a 2-D float array where HIGH means important (methods whose raw output is
  low-is-important, such as the iGOS++ mask M, are converted to 1 - M before evaluation);
- a saliency map that is constant (peak-to-peak 0) carries no information and is evaluated as the
  uniform map (chance level); see `is_constant`;
- everything is numpy in, numpy out, float64, deterministic.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

UpsampleMode = Literal["nearest", "bilinear"]


def as_map(values: np.ndarray, name: str = "saliency") -> np.ndarray:
    """Return `values` as a finite 2-D float64 array, or raise ValueError."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Return a binary mask as a 2-D bool array; accepts bool or numbers that are all 0 or 1."""
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be boolean or contain only 0 and 1")
    return arr.astype(bool)


def is_constant(saliency: np.ndarray) -> bool:
    """True when the map has a single value (peak-to-peak exactly 0)."""
    return bool(np.ptp(saliency) == 0)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index floor(dst * n_in / n_out), in exact integer arithmetic."""
    return (np.arange(n_out) * n_in) // n_out


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation matrix of torch's bilinear, align_corners=False, no antialias.

    src = max(0, (dst + 0.5) * n_in / n_out - 0.5); i0 = floor(src); i1 = min(i0 + 1, n_in - 1);
    out = (1 - (src - i0)) * in[i0] + (src - i0) * in[i1].
    """
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(weights, (rows, i0), 1.0 - frac)
    np.add.at(weights, (rows, i1), frac)
    return weights


def upsample_to(
    saliency: np.ndarray, size: tuple[int, int], mode: UpsampleMode = "nearest"
) -> np.ndarray:
    """Resample a (h, w) map to `size` = (H, W).

    nearest: out[y, x] = in[floor(y*h/H), floor(x*w/W)] (exact integers; for integer ratios each
        grid cell becomes an (H/h) x (W/w) block, identical to torch's "nearest").
    bilinear: torch.nn.functional.interpolate(mode="bilinear", align_corners=False) semantics,
        applied separably (rows, then columns). Values stay within [min, max] of the input.
    A constant map stays exactly constant in both modes.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"unknown mode {mode!r}; use 'nearest' or 'bilinear'")
    arr = as_map(saliency)
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if arr.shape == (height, width):
        return arr.copy()
    if is_constant(arr):
        return np.full((height, width), arr.flat[0])
    if mode == "nearest":
        return arr[np.ix_(nearest_index(arr.shape[0], height), nearest_index(arr.shape[1], width))]
    return _bilinear_matrix(arr.shape[0], height) @ arr @ _bilinear_matrix(arr.shape[1], width).T


def minmax_normalize(saliency: np.ndarray) -> np.ndarray:
    """(S - min S) / (max S - min S); a constant map becomes all ones (the uniform map)."""
    arr = as_map(saliency)
    if is_constant(arr):
        return np.ones_like(arr)
    low = arr.min()
    return (arr - low) / (arr.max() - low)


def rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a flattened array; tied values get the mean of their ranks."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], flat.size]  # exclusive
    mean_rank = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(flat.size)
    ranks[order] = mean_rank[group]
    return ranks


def uniform_map(height: int, width: int) -> np.ndarray:
    """Baseline map with every cell equal to 1 / (height * width)."""
    return np.full((height, width), 1.0 / (height * width))


def random_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Baseline map of i.i.d. U[0, 1) values from numpy's PCG64 generator seeded with `seed`."""
    return np.random.default_rng(seed).random((height, width))


def centre_prior(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """Baseline centre-bias map: exp(-((y - cy)^2 / (sigma*h)^2 + (x - cx)^2 / (sigma*w)^2) / 2).

    Cell centres y = 0..h-1, x = 0..w-1; cy = (h - 1)/2, cx = (w - 1)/2; `sigma` is a fraction of
    each side (so the prior is the same on any grid of the same aspect); peak value 1.
    """
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    dy = (np.arange(height) - (height - 1) / 2.0) / (sigma * height)
    dx = (np.arange(width) - (width - 1) / 2.0) / (sigma * width)
    return np.exp(-0.5 * (dy[:, None] ** 2 + dx[None, :] ** 2))
