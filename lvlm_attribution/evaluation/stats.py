"""Summary statistics for metric tables: mean with a 95% confidence interval, and the median with
a percentile-bootstrap 95% interval for heavy-tailed metrics."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..29 (standard tables, 3 decimals).
# fmt: off
T_975: dict[int, float] = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045,
}
# fmt: on
Z_975 = 1.96


def ci95_quantile(n: int) -> float:
    """Critical value: t_{0.975, n-1} from `T_975` for 2 <= n < 30, else the normal 1.96."""
    if n < 2:
        raise ValueError("a confidence interval needs at least 2 values")
    return T_975[n - 1] if n < 30 else Z_975


def mean_ci95(values: Iterable[float], *, omit_nan: bool = True) -> tuple[float, float, float]:
    """(mean, low, high) with half-width q * s / sqrt(n), s the sample std (ddof=1).

    q = `ci95_quantile(n)`. NaN values (metrics undefined for a sample, e.g. an empty evidence
    mask) are dropped when `omit_nan`, else they propagate. n = 0 -> (nan, nan, nan);
    n = 1 -> (x, nan, nan).
    """
    arr = np.asarray(list(values), dtype=np.float64).ravel()
    if omit_nan:
        arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, float("nan"), float("nan")
    half = ci95_quantile(arr.size) * float(arr.std(ddof=1)) / np.sqrt(arr.size)
    return mean, mean - half, mean + half


def median_ci95(values: Iterable[float], *, resamples: int = 2000,
                seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the 2.5th and 97.5th percentiles of the medians of `resamples`
    bootstrap resamples (with replacement, seeded, so a report is reproducible). NaN dropped.

    For ratio-normalised metrics (deletion/insertion AUC divide by s_orig - s_blur, which can be
    ~0 for a scene), the mean is dominated by a few exploding scenes; the median is not.
    n = 0 -> (nan, nan, nan); n = 1 -> (x, nan, nan).
    """
    arr = np.asarray(list(values), dtype=np.float64).ravel()
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    median = float(np.median(arr))
    if arr.size == 1:
        return median, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    medians = np.median(arr[rng.integers(0, arr.size, size=(resamples, arr.size))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return median, float(low), float(high)
