"""Evaluation metrics for attribution maps: one import point.

Definitions, parameters, edge cases and deviations from the papers: docs/metrics.md.

- alignment with a ground-truth map (GLIMPSE): `nss`, `spearman`
- localisation against an evidence mask (DEX-AR): `best_iou`, `iou_curve`, `soft_iou`,
  `energy_pointing_game`, `snr`; token-level `token_snr` (content vs filler tokens)
- faithfulness by perturbation: `deletion_insertion` (iGOS++ protocol), `perplexity_auc` (DEX-AR)
- utilities: `upsample_to`, `minmax_normalize`, `mean_ci95`, `median_ci95`, baseline maps
  `uniform_map`, `random_map`, `centre_prior`, `dataset_mean_colour`, `probability_score_fn`;
  the blurred baseline image is the engine's `lvlm_attribution.perturbation.blur_baseline`
"""

from __future__ import annotations

from lvlm_attribution.evaluation.alignment import gt_locations, nss, spearman, zscore
from lvlm_attribution.evaluation.localization import (
    best_iou,
    energy,
    energy_pointing_game,
    iou_curve,
    iou_thresholds,
    snr,
    soft_iou,
    token_snr,
)
from lvlm_attribution.evaluation.maps import (
    centre_prior,
    minmax_normalize,
    random_map,
    rank_average,
    uniform_map,
    upsample_to,
)
from lvlm_attribution.evaluation.perturbation import (
    cell_ranks,
    cell_schedule,
    dataset_mean_colour,
    deletion_insertion,
    mean_token_probability,
    perplexity_auc,
    probability_score_fn,
    trapezoid_auc,
)
from lvlm_attribution.evaluation.stats import mean_ci95, median_ci95

__all__ = [
    "best_iou",
    "cell_ranks",
    "cell_schedule",
    "centre_prior",
    "dataset_mean_colour",
    "deletion_insertion",
    "energy",
    "energy_pointing_game",
    "gt_locations",
    "iou_curve",
    "iou_thresholds",
    "mean_ci95",
    "median_ci95",
    "mean_token_probability",
    "minmax_normalize",
    "nss",
    "perplexity_auc",
    "probability_score_fn",
    "random_map",
    "rank_average",
    "snr",
    "soft_iou",
    "spearman",
    "token_snr",
    "trapezoid_auc",
    "uniform_map",
    "upsample_to",
    "zscore",
]
