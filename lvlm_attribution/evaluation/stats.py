"""Summary statistics for metric tables: mean with a 95% confidence interval."""

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
