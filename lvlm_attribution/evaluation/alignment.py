"""Alignment of a saliency map with a ground-truth map: NSS and Spearman's rho.

Source: GLIMPSE (paper 000, section 4.2, eq. 24) evaluates against VQA-HAT human-attention maps
with NSS over the locations above a percentile (90th) and Spearman rank correlation.
The saliency map is first resampled to the ground truth's resolution (`upsample_to`).
Degenerate inputs: a constant saliency map scores chance level (0); a ground truth with no
locations (empty mask, constant map) gives NaN, so the sample can be excluded, not scored.
"""

from __future__ import annotations

import numpy as np

from lvlm_attribution.evaluation.maps import (
    UpsampleMode,
    as_map,
    is_constant,
    rank_average,
    upsample_to,
)


def gt_locations(ground_truth: np.ndarray, percentile: float = 90.0) -> np.ndarray:
    """Ground-truth locations L as a bool array.

    bool input: the mask itself. Numeric input: thr = np.percentile(G, percentile) (linear
    interpolation) and L = {G > thr}; when that is empty because the top values tie at thr,
    L = {G >= thr} unless thr is the minimum of G (a constant map has no locations).
    """
    arr = np.asarray(ground_truth)
    if arr.dtype == bool:
        return arr
    values = as_map(arr, "ground_truth")
    thr = np.percentile(values, percentile)
    above = values > thr
    if not above.any() and thr > values.min():
        above = values >= thr
    return above


def zscore(saliency: np.ndarray) -> np.ndarray:
    """(S - mean S) / std S with the population std (ddof=0); a constant map gives zeros."""
    arr = as_map(saliency)
    if is_constant(arr):
        return np.zeros_like(arr)
    return (arr - arr.mean()) / arr.std()


def nss(
    saliency: np.ndarray,
    ground_truth: np.ndarray,
    *,
    percentile: float = 90.0,
    mode: UpsampleMode = "bilinear",
) -> float:
    """Normalized Scanpath Saliency: NSS = (1/|L|) sum_{i in L} (S_i - mu_S) / sigma_S.

    GLIMPSE eq. 24. S is the saliency map resampled to the ground truth's shape with `mode`,
    z-scored over all pixels (population std); L = `gt_locations(ground_truth, percentile)`.
    Returns NaN when L is empty, 0.0 when S is constant.
    """
    gt = np.asarray(ground_truth)
    locations = gt_locations(gt, percentile)
    if not locations.any():
        return float("nan")
    resampled = upsample_to(saliency, locations.shape, mode)
    return float(zscore(resampled)[locations].mean())


def spearman(
    saliency: np.ndarray, ground_truth: np.ndarray, *, mode: UpsampleMode = "bilinear"
) -> float:
    """Spearman's rho = Pearson correlation of the average ranks of S and G over all pixels.

    S is resampled to G's shape with `mode`; ties get average ranks (as scipy.stats.spearmanr).
    G may be a continuous map or a bool mask. Returns NaN when G is constant (e.g. an empty
    mask), 0.0 when S is constant.
    """
    gt = as_map(np.asarray(ground_truth, dtype=np.float64), "ground_truth")
    if is_constant(gt):
        return float("nan")
    resampled = upsample_to(saliency, gt.shape, mode)
    if is_constant(resampled):
        return 0.0
    rank_s = rank_average(resampled)
    rank_g = rank_average(gt)
    rank_s -= rank_s.mean()
    rank_g -= rank_g.mean()
    return float((rank_s @ rank_g) / np.sqrt((rank_s @ rank_s) * (rank_g @ rank_g)))
