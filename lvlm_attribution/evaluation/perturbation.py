"""Perturbation metrics: deletion/insertion AUC (iGOS++ protocol) and DEX-AR perplexity AUC.

Model-agnostic: the model enters only through a batched callable on uint8 images,
`score_fn(images (B, H, W, 3) uint8) -> (B,)` or `logprob_fn(images) -> (B, T)` answer-token log
probabilities (teacher-forced on a fixed answer). Every image a curve needs is built here, scored
once, in batches of `batch_size`; the callables must be deterministic (no dropout, no sampling).
The blurred baseline image of the iGOS++ protocol is the engine's one blur,
`lvlm_attribution.perturbation.blur_baseline` (the caller passes it in; this module stays
numpy-only).

Sources: "Where do LVLMs look..." (papers 002/003, sec. 5 "Evaluation Metric") and its official
code `methods_helper.metric` (research notes section 3); DEX-AR (paper 004, sec. 4.1
"Perturbation-based Evaluation"). Choices and deviations: docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lvlm_attribution.evaluation.maps import UpsampleMode, as_map, nearest_index, upsample_to

ScoreFn = Callable[[np.ndarray], np.ndarray]
LogprobFn = Callable[[np.ndarray], np.ndarray]
Job = tuple[str, int]


def as_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate an (H, W, 3) image; float input is rounded and clipped to uint8."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    return np.clip(np.rint(arr.astype(np.float64)), 0, 255).astype(np.uint8)


def trapezoid_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area sum_i (x_{i+1} - x_i) (y_i + y_{i+1}) / 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def cell_ranks(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) int map: rank of each pixel's grid cell, 0 = most salient cell.

    Cells are sorted by descending saliency; ties keep raster order (stable sort). Pixels map to
    cells by nearest upsampling (`upsample_to(..., "nearest")`), so each cell is a pixel block.
    """
    grid = as_map(saliency)
    if grid.shape[0] > size[0] or grid.shape[1] > size[1]:
        raise ValueError(f"saliency grid {grid.shape} is larger than the image {size}")
    rank = np.empty(grid.size, dtype=np.int64)
    rank[np.argsort(-grid.ravel(), kind="stable")] = np.arange(grid.size)
    rows = nearest_index(grid.shape[0], size[0])
    cols = nearest_index(grid.shape[1], size[1])
    return rank.reshape(grid.shape)[np.ix_(rows, cols)]


def cell_schedule(n_cells: int, steps: int) -> np.ndarray:
    """Cumulative number of cells switched after step i: k_i = floor(i * n_cells / steps).

    i = 0..steps, so k_0 = 0 and k_steps = n_cells; each step switches floor or ceil of
    n_cells / steps cells (64 cells, 50 steps: 14 steps of 2 cells, 36 of 1).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return (np.arange(steps + 1) * n_cells) // steps


def _run_batched(
    fn: Callable[[np.ndarray], np.ndarray],
    jobs: Sequence[Job],
    make_image: Callable[[Job], np.ndarray],
    batch_size: int,
) -> list[np.ndarray]:
    """Call fn on the images of `jobs` in order, batch_size images per call; one row per job."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rows: list[np.ndarray] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        out = np.asarray(fn(np.stack([make_image(job) for job in chunk])), dtype=np.float64)
        if out.shape[0] != len(chunk) or not np.all(np.isfinite(out)):
            raise ValueError(f"callable returned shape {out.shape} or non-finite values")
        rows.extend(out)
    return rows


def deletion_insertion(
    saliency: np.ndarray,
    image: np.ndarray,
    baseline: np.ndarray,
    score_fn: ScoreFn,
    *,
    steps: int = 50,
    batch_size: int = 32,
) -> dict[str, float | np.ndarray]:
    """Normalised deletion and insertion AUC of a (h, w) saliency grid.

    Cells are ranked by descending saliency (`cell_ranks`); after step i the top k_i cells
    (`cell_schedule`) are switched: deletion shows `baseline` there and `image` elsewhere;
    insertion shows `image` there and `baseline` elsewhere. Score s = score_fn(composite), e.g.
    the mean probability of the selected answer tokens (`probability_score_fn`). Curves are
    normalised y = (s - s_blur) / (s_orig - s_blur), with s_orig = s(image) and
    s_blur = s(baseline); the AUC is the trapezoid over x_i = fraction of image pixels switched
    (x_0 = 0, x_steps = 1).
    Lower deletion and higher insertion AUC are better. If s_orig == s_blur the normalisation is
    undefined: curves and AUCs are NaN (raw scores still returned).

    Returns deletion_auc, insertion_auc, deletion_curve, insertion_curve (normalised, steps + 1
    points), fractions, deletion_scores, insertion_scores (raw), score_original, score_baseline.
    """
    img = as_image(image)
    base = as_image(baseline, "baseline")
    if base.shape != img.shape:
        raise ValueError(f"baseline {base.shape} and image {img.shape} differ in shape")
    ranks = cell_ranks(saliency, img.shape[:2])
    n_cells = int(np.asarray(saliency).size)
    schedule = cell_schedule(n_cells, steps)
    pixels_before = np.r_[0, np.cumsum(np.bincount(ranks.ravel(), minlength=n_cells))]
    fractions = pixels_before[schedule] / ranks.size

    inner = sorted({int(k) for k in schedule if 0 < k < n_cells})
    jobs: list[Job] = [("original", 0), ("baseline", 0)]
    jobs += [("deletion", k) for k in inner] + [("insertion", k) for k in inner]

    def make_image(job: Job) -> np.ndarray:
        kind, k = job
        if kind in ("original", "baseline"):
            return img if kind == "original" else base
        shown, hidden = (base, img) if kind == "deletion" else (img, base)
        return np.where((ranks < k)[..., None], shown, hidden)

    scores = dict(zip(jobs, _run_batched(score_fn, jobs, make_image, batch_size), strict=True))
    s_orig, s_blur = float(scores[("original", 0)]), float(scores[("baseline", 0)])
    raw = {
        "deletion": _curve(schedule, n_cells, s_orig, s_blur, scores, "deletion"),
        "insertion": _curve(schedule, n_cells, s_blur, s_orig, scores, "insertion"),
    }
    gap = s_orig - s_blur
    norm = {
        kind: (r - s_blur) / gap if gap != 0 else np.full(r.shape, np.nan)
        for kind, r in raw.items()
    }
    return {
        "deletion_auc": trapezoid_auc(fractions, norm["deletion"]),
        "insertion_auc": trapezoid_auc(fractions, norm["insertion"]),
        "deletion_curve": norm["deletion"],
        "insertion_curve": norm["insertion"],
        "fractions": fractions,
        "deletion_scores": raw["deletion"],
        "insertion_scores": raw["insertion"],
        "score_original": s_orig,
        "score_baseline": s_blur,
    }


def _curve(
    counts: np.ndarray, n_total: int, at_zero: float, at_all: float, values: dict, kind: str
) -> np.ndarray:
    """values[(kind, k)] for each k in counts, with the shared end points for k = 0 and n_total."""
    return np.array(
        [at_zero if k == 0 else at_all if k == n_total else values[(kind, int(k))] for k in counts]
    )


def mean_token_probability(
    logprobs: np.ndarray, positions: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """(B,) mean over the selected answer positions of exp(log p): the iGOS++ evaluation score.

    `positions`: indices of the selected (e.g. LLR-selected) tokens, or None for all tokens.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"logprobs must be (B, T), got {lp.shape}")
    chosen = lp if positions is None else lp[:, np.asarray(positions, dtype=np.int64)]
    if chosen.shape[1] == 0:
        raise ValueError("no token positions selected")
    return np.exp(chosen).mean(axis=1)


def probability_score_fn(
    logprob_fn: LogprobFn, positions: Sequence[int] | np.ndarray | None = None
) -> ScoreFn:
    """Turn a batched `logprob_fn` into the `score_fn` of `deletion_insertion`."""
    return lambda images: mean_token_probability(logprob_fn(images), positions)


def pixel_ranks(saliency_up: np.ndarray, descending: bool) -> np.ndarray:
    """(H, W) int map: position of each pixel in the removal order; ties keep raster order."""
    flat = saliency_up.ravel()
    order = np.argsort(-flat if descending else flat, kind="stable")
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(flat.size)
    return rank.reshape(saliency_up.shape)


def perplexity_auc(
    saliency: np.ndarray,
    image: np.ndarray,
    logprob_fn: LogprobFn,
    fill_colour: Sequence[float] | np.ndarray,
    *,
    fractions: Sequence[float] | np.ndarray | None = None,
    mode: UpsampleMode = "bilinear",
    token_mask: np.ndarray | None = None,
    batch_size: int = 32,
) -> dict[str, float | np.ndarray]:
    """DEX-AR perturbation metric: AUC over p of PPL(I_p) / PPL(I).

    DEX-AR sec. 4.1: the saliency map is resampled to the image (`mode`), pixels are ranked by
    saliency (descending for "positive", ascending for "negative"; ties in raster order) and the
    first k(p) = floor(p * H * W + 0.5) are set to `fill_colour` (the data set's mean colour,
    rounded to uint8). PPL(I) = exp(-(1/T) sum_t log p(y_t | I, y_<t)) over the answer tokens
    (those where `token_mask` is True, default all). ratio(p) = PPL(I_p) / PPL(I), computed as
    exp(mean lp(I) - mean lp(I_p)). AUC = trapezoid of ratio over `fractions` (default
    0, 0.1, ..., 1.0). Higher positive AUC and lower negative AUC are better.

    Returns positive_auc, negative_auc, positive_curve, negative_curve, fractions and
    ppl_original.
    """
    img = as_image(image)
    grid = np.linspace(0.0, 1.0, 11) if fractions is None else np.asarray(fractions, float)
    if grid.ndim != 1 or grid.size < 2 or np.any(np.diff(grid) <= 0):
        raise ValueError("fractions must be a strictly increasing 1-D sequence of >= 2 values")
    if grid[0] < 0 or grid[-1] > 1:
        raise ValueError("fractions must lie in [0, 1]")
    fill = as_image(np.asarray(fill_colour, dtype=np.float64).reshape(1, 1, 3), "fill_colour")
    up = upsample_to(saliency, img.shape[:2], mode)
    n_pixels = up.size
    counts = np.floor(grid * n_pixels + 0.5).astype(np.int64)
    ranks = {"positive": pixel_ranks(up, True), "negative": pixel_ranks(up, False)}

    inner = sorted({int(k) for k in counts if 0 < k < n_pixels})
    jobs: list[Job] = [("original", 0), ("filled", n_pixels)]
    jobs += [(kind, k) for kind in ranks for k in inner]

    def make_image(job: Job) -> np.ndarray:
        kind, k = job
        if kind == "original":
            return img
        if kind == "filled":
            return np.broadcast_to(fill, img.shape)
        return np.where((ranks[kind] < k)[..., None], fill, img)

    rows = _run_batched(logprob_fn, jobs, make_image, batch_size)
    mean_lp = dict(zip(jobs, (_masked_mean(r, token_mask) for r in rows), strict=True))
    lp0 = mean_lp[("original", 0)]
    result: dict[str, float | np.ndarray] = {"fractions": grid, "ppl_original": float(np.exp(-lp0))}
    for kind in ranks:
        lps = _curve(counts, n_pixels, lp0, mean_lp[("filled", n_pixels)], mean_lp, kind)
        curve = np.exp(lp0 - lps)
        result[f"{kind}_curve"] = curve
        result[f"{kind}_auc"] = trapezoid_auc(grid, curve)
    return result


def _masked_mean(row: np.ndarray, token_mask: np.ndarray | None) -> float:
    """Mean of one (T,) log-prob row over the tokens selected by `token_mask`."""
    row = np.asarray(row, dtype=np.float64).ravel()
    chosen = row if token_mask is None else row[np.asarray(token_mask, dtype=bool)]
    if chosen.size == 0:
        raise ValueError("token_mask selects no tokens")
    return float(chosen.mean())


def dataset_mean_colour(images: Iterable[np.ndarray]) -> np.ndarray:
    """(3,) mean RGB over every pixel of every image (pixel-weighted, so sizes may differ)."""
    total, count = np.zeros(3), 0
    for image in images:
        pixels = as_image(image).reshape(-1, 3)
        total += pixels.sum(axis=0, dtype=np.float64)
        count += pixels.shape[0]
    if count == 0:
        raise ValueError("no images")
    return total / count

