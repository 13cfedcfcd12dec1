"""Localisation of a saliency map against a binary evidence mask: IoU, soft-IoU, EPG, SNR.

Source: DEX-AR (paper 004): section 4.1 "Segmentation-based Evaluation" (IoU at the best of
equally spaced thresholds, soft-IoU, Energy Pointing Game), section 4.5 (SNR inside vs outside
the mask; SNR of content vs filler tokens). The paper's formulas were lost in the seed text; the
definitions below are reconstructed from its prose and documented in docs/metrics.md.

Resolution: the saliency map is resampled to the mask's shape (`upsample_to`, default bilinear).
Degenerate inputs: an empty mask gives NaN (absent-object questions have no evidence, the sample
is excluded); a constant saliency map is evaluated as the uniform map (chance level).
"""

from __future__ import annotations

import numpy as np

from lvlm_attribution.evaluation.maps import (
    UpsampleMode,
    as_map,
    as_mask,
    minmax_normalize,
    upsample_to,
)


def _iou(pred: np.ndarray, mask: np.ndarray) -> float:
    union = np.logical_or(pred, mask).sum()
    return float(np.logical_and(pred, mask).sum() / union) if union else float("nan")


def iou_thresholds(n_thresholds: int = 10) -> np.ndarray:
    """The K equally spaced thresholds t_k = k / K, k = 0..K-1, on the min-max normalised map."""
    if n_thresholds < 1:
        raise ValueError("n_thresholds must be >= 1")
    return np.arange(n_thresholds) / n_thresholds


def iou_curve(
    saliency: np.ndarray,
    mask: np.ndarray,
    *,
    n_thresholds: int = 10,
    mode: UpsampleMode = "bilinear",
) -> np.ndarray:
    """IoU_k = |B_k & M| / |B_k | M| with B_k = {S~ > t_k} for each threshold of `iou_thresholds`.

    S~ = min-max normalised resampled saliency (constant -> all ones, so B_k = every pixel).
    Returns an array of K NaNs when the mask is empty.
    """
    binary = as_mask(mask)
    if not binary.any():
        return np.full(n_thresholds, np.nan)
    norm = minmax_normalize(upsample_to(saliency, binary.shape, mode))
    return np.array([_iou(norm > t, binary) for t in iou_thresholds(n_thresholds)])


def best_iou(
    saliency: np.ndarray,
    mask: np.ndarray,
    *,
    n_thresholds: int = 10,
    mode: UpsampleMode = "bilinear",
) -> float:
    """IoU = max_k IoU_k over `iou_curve` (DEX-AR sec. 4.1: best of equally spaced thresholds)."""
    curve = iou_curve(saliency, mask, n_thresholds=n_thresholds, mode=mode)
    return float("nan") if np.isnan(curve).all() else float(np.nanmax(curve))


def soft_iou(saliency: np.ndarray, mask: np.ndarray, *, mode: UpsampleMode = "bilinear") -> float:
    """Soft-IoU = sum_i min(S~_i, M_i) / sum_i max(S~_i, M_i) (fuzzy Jaccard).

    S~ = min-max normalised resampled saliency in [0, 1]; M is the mask as 0/1, or a soft
    ground-truth map with values in [0, 1]. For a binary M this equals
    sum(S~ M) / sum(S~ + M - S~ M) (the product form). NaN when M sums to 0.
    """
    gt = np.asarray(mask)
    gt = as_mask(gt).astype(np.float64) if gt.dtype == bool else as_map(gt, "mask")
    if gt.min() < 0 or gt.max() > 1:
        raise ValueError("mask values must lie in [0, 1]")
    if gt.sum() == 0:
        return float("nan")
    norm = minmax_normalize(upsample_to(saliency, gt.shape, mode))
    return float(np.minimum(norm, gt).sum() / np.maximum(norm, gt).sum())


def energy(
    saliency: np.ndarray, size: tuple[int, int], mode: UpsampleMode = "bilinear"
) -> np.ndarray:
    """E = upsample_to(max(S, 0), size); if E sums to 0 (no positive saliency) E = uniform ones."""
    positive = np.maximum(as_map(saliency), 0.0)
    up = upsample_to(positive, size, mode)
    return up if up.sum() > 0 else np.ones(size)


def energy_pointing_game(
    saliency: np.ndarray, mask: np.ndarray, *, mode: UpsampleMode = "bilinear"
) -> float:
    """EPG = sum(E * M) / sum(E): share of the non-negative saliency energy inside the mask.

    DEX-AR sec. 4.1 (after Score-CAM's energy-based pointing game). NaN for an empty mask.
    """
    binary = as_mask(mask)
    if not binary.any():
        return float("nan")
    e = energy(saliency, binary.shape, mode)
    return float(e[binary].sum() / e.sum())


def snr(saliency: np.ndarray, mask: np.ndarray, *, mode: UpsampleMode = "bilinear") -> float:
    """Spatial SNR = ||E * M||_1 / ||E * (1 - M)||_1 (DEX-AR sec. 4.5), E as in `energy`.

    Equals EPG / (1 - EPG). NaN when the mask is empty or covers every pixel; inf when all the
    energy lies inside the mask.
    """
    binary = as_mask(mask)
    if not binary.any() or binary.all():
        return float("nan")
    e = energy(saliency, binary.shape, mode)
    inside, outside = e[binary].sum(), e[~binary].sum()
    return float(inside / outside) if outside > 0 else float("inf")


def token_snr(weights: np.ndarray, content: np.ndarray) -> float:
    """Token SNR = mean_{t content} w_t / mean_{t filler} w_t (DEX-AR sec. 4.5, Table 4).

    `weights`: non-negative per-answer-token weights (DEX-AR delta_t, GLIMPSE beta_t, ...);
    `content`: bool flag per token, True for content tokens, False for filler tokens.
    Means, not sums, so the ratio does not depend on how many tokens each class has.
    NaN when either class is empty or both means are 0; inf when only the filler mean is 0.
    """
    w = np.asarray(weights, dtype=np.float64).ravel()
    flags = np.asarray(content, dtype=bool).ravel()
    if w.shape != flags.shape:
        raise ValueError(f"weights {w.shape} and content {flags.shape} differ in length")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("token weights must be finite and non-negative")
    if flags.all() or not flags.any():
        return float("nan")
    signal, noise = w[flags].mean(), w[~flags].mean()
    if noise == 0:
        return float("inf") if signal > 0 else float("nan")
    return float(signal / noise)
