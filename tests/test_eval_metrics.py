"""Evaluation metrics against hand-computed values on tiny arrays (docs/metrics.md).

Every expected number is derived in the comment or arithmetic beside it, never by calling the
code under test a second way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lvlm_attribution.evaluation import metrics as M

NAN_OK = {"equal_nan": True}


# ---------------------------------------------------------------------------------- upsampling
def test_upsample_nearest_blocks_and_non_integer_ratio():
    grid = np.array([[1.0, 2.0], [3.0, 4.0]])
    # integer ratio: each cell becomes a 2x2 block
    expected = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], float)
    np.testing.assert_array_equal(M.upsample_to(grid, (4, 4), "nearest"), expected)
    # 2 -> 3: source index floor(y * 2 / 3) = 0, 0, 1
    expected = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 4]], float)
    np.testing.assert_array_equal(M.upsample_to(grid, (3, 3), "nearest"), expected)


def test_upsample_bilinear_hand_values():
    # 1x2 -> 1x4, src = (x + 0.5) * 2/4 - 0.5 = -0.25 (clamped 0), 0.25, 0.75, 1.25 (clamped 1)
    out = M.upsample_to(np.array([[0.0, 1.0]]), (1, 4), "bilinear")
    np.testing.assert_allclose(out, [[0.0, 0.25, 0.75, 1.0]])


def test_upsample_bilinear_2d_and_non_integer_ratio():
    # 2 -> 4 per axis: src = -0.25 (clamped 0), 0.25, 0.75, 1.25 (clamped to the last index)
    # -> weights (1, 0), (.75, .25), (.25, .75), (0, 1); separable, so for [[0, 1], [2, 3]]
    # value = col_interp(0, 1) + 2 * row_interp(0, 1) with interp = 0, .25, .75, 1
    expected = np.array([0, 0.25, 0.75, 1])[None, :] + 2 * np.array([0, 0.25, 0.75, 1])[:, None]
    out = M.upsample_to(np.array([[0.0, 1.0], [2.0, 3.0]]), (4, 4), "bilinear")
    np.testing.assert_allclose(out, expected)
    # 2 -> 3: src = (x + 0.5) * 2/3 - 0.5 = -1/6 (clamped 0), 0.5, 7/6 (clamped) -> 0, .5, 1
    out = M.upsample_to(np.array([[0.0, 1.0]]), (1, 3), "bilinear")
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0]])


def test_upsample_constant_stays_exact_and_bad_mode_raises():
    out = M.upsample_to(np.full((3, 3), 0.1), (7, 5), "bilinear")
    assert np.ptp(out) == 0 and out[0, 0] == 0.1
    with pytest.raises(ValueError):
        M.upsample_to(np.ones((2, 2)), (4, 4), "bicubic")  # type: ignore[arg-type]


def test_minmax_and_rank_average():
    np.testing.assert_allclose(
        M.minmax_normalize(np.array([[2.0, 3.0], [4.0, 6.0]])), [[0.0, 0.25], [0.5, 1.0]]
    )  # (x - 2) / 4
    np.testing.assert_array_equal(M.minmax_normalize(np.full((2, 2), 7.0)), np.ones((2, 2)))
    # sorted 1, 2, 3, 3 -> ranks 1, 2, (3 + 4) / 2, (3 + 4) / 2
    np.testing.assert_array_equal(M.rank_average(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])


# ----------------------------------------------------------------------------------------- NSS
S22 = np.array([[0.0, 1.0], [2.0, 3.0]])  # mean 1.5, population std sqrt(1.25) = sqrt(5) / 2


def test_nss_binary_mask():
    mask = np.array([[False, False], [False, True]])
    # z(3) = (3 - 1.5) / sqrt(1.25) = 3 / sqrt(5)
    assert M.nss(S22, mask) == pytest.approx(3 / math.sqrt(5))


def test_nss_continuous_ground_truth_percentiles():
    gt = np.array([[0.0, 0.0], [0.2, 1.0]])
    # 90th percentile of (0, 0, 0.2, 1): position 0.9 * 3 = 2.7 -> 0.2 + 0.7 * 0.8 = 0.76;
    # L = {1.0} -> pixel (1, 1) -> 3 / sqrt(5)
    assert M.nss(S22, gt) == pytest.approx(3 / math.sqrt(5))
    # 50th percentile: position 1.5 -> 0.1; L = {0.2, 1.0}
    # -> mean of z(2), z(3) = (0.5 + 1.5) / 2 / sqrt(1.25)
    assert M.nss(S22, gt, percentile=50) == pytest.approx(1 / math.sqrt(1.25))


def test_nss_ties_at_the_top_use_greater_equal():
    gt = np.array([[0.0, 1.0], [1.0, 1.0]])
    # 90th percentile = 1 and nothing is > 1: L = {G >= 1} = 3 pixels
    # mean z = (-0.5 + 0.5 + 1.5) / 3 / sqrt(1.25) = 1 / sqrt(5)
    assert M.nss(S22, gt) == pytest.approx(1 / math.sqrt(5))


def test_nss_upsampled_blocks_keep_z_scores():
    mask = np.zeros((4, 4), bool)
    mask[2:, 2:] = True  # the block of cell (1, 1), value 3
    assert M.nss(S22, mask, mode="nearest") == pytest.approx(3 / math.sqrt(5))


def test_nss_edge_cases():
    assert M.nss(np.full((2, 2), 5.0), np.eye(2, dtype=bool)) == 0.0  # constant map: chance
    assert math.isnan(M.nss(S22, np.zeros((2, 2), bool)))  # empty mask
    assert math.isnan(M.nss(S22, np.full((2, 2), 0.3)))  # constant ground-truth map


# ------------------------------------------------------------------------------------ Spearman
def test_spearman_without_ties():
    # ranks S 1, 2, 3, 4; G 1, 3, 2, 4; sum d^2 = 2; rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    gt = np.array([[1.0, 3.0], [2.0, 4.0]])
    assert M.spearman(np.array([[1.0, 2.0], [3.0, 4.0]]), gt) == pytest.approx(0.8)


def test_spearman_with_ties_uses_average_ranks():
    # ranks S 1.5, 1.5, 3, 4 and G 1, 2, 3, 4 (mean 2.5 each)
    # deviations S -1, -1, 0.5, 1.5; G -1.5, -0.5, 0.5, 1.5
    # cov 1.5 + 0.5 + 0.25 + 2.25 = 4.5; var S 4.5; var G 5 -> rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    sal = np.array([[1.0, 1.0], [2.0, 3.0]])
    assert M.spearman(sal, np.array([[1.0, 2.0], [3.0, 4.0]])) == pytest.approx(math.sqrt(0.9))


def test_spearman_edge_cases():
    gt = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert M.spearman(np.ones((2, 2)), gt) == 0.0
    assert math.isnan(M.spearman(gt, np.zeros((2, 2), bool)))
    assert M.spearman(-gt, gt) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------ IoU, soft-IoU
SAL_IOU = np.array([[2.0, 3.0], [4.0, 6.0]])  # min-max normalised: [[0, .25], [.5, 1]]
MASK_RIGHT = np.array([[False, True], [False, True]])  # normalised values .25 and 1 inside


def test_iou_curve_and_best():
    # t = 0: B = {.25, .5, 1}: |B & M| = 2, |B | M| = 3 -> 2/3
    # t = .25: B = {.5, 1}: 1 / 3;  t = .5 and .75: B = {1}: 1 / 2
    curve = M.iou_curve(SAL_IOU, MASK_RIGHT, n_thresholds=4)
    np.testing.assert_allclose(curve, [2 / 3, 1 / 3, 1 / 2, 1 / 2])
    assert M.best_iou(SAL_IOU, MASK_RIGHT, n_thresholds=4) == pytest.approx(2 / 3)
    # default K = 10: t = 0 gives 2/3, t in .1, .2 the same B, t = .3, .4: 1/3, t >= .5: 1/2
    assert M.best_iou(SAL_IOU, MASK_RIGHT) == pytest.approx(2 / 3)
    np.testing.assert_allclose(M.iou_thresholds(4), [0.0, 0.25, 0.5, 0.75])


def test_iou_edge_cases():
    # constant map = uniform: B = all 4 pixels, IoU = |M| / 4 = 0.5 at every threshold
    assert M.best_iou(np.zeros((2, 2)), MASK_RIGHT) == pytest.approx(0.5)
    assert math.isnan(M.best_iou(SAL_IOU, np.zeros((2, 2), bool)))
    with pytest.raises(ValueError):
        M.best_iou(SAL_IOU, np.full((2, 2), 0.5))  # not a binary mask


def test_soft_iou_binary_mask_both_forms():
    # min(S~, M) = 0, .25, 0, 1 -> 1.25; max = 0, 1, .5, 1 -> 2.5; soft-IoU = 0.5
    assert M.soft_iou(SAL_IOU, MASK_RIGHT) == pytest.approx(0.5)
    # product form: sum(S M) = 1.25; sum(S + M - S M) = 0 + 1 + .5 + 1 = 2.5 -> same 0.5
    assert M.soft_iou(SAL_IOU, MASK_RIGHT.astype(float)) == pytest.approx(1.25 / 2.5)


def test_soft_iou_soft_ground_truth_and_edges():
    gt = np.array([[0.2, 0.5], [0.0, 1.0]])
    # min = 0, .25, 0, 1 -> 1.25; max = .2, .5, .5, 1 -> 2.2
    assert M.soft_iou(SAL_IOU, gt) == pytest.approx(1.25 / 2.2)
    assert math.isnan(M.soft_iou(SAL_IOU, np.zeros((2, 2), bool)))
    assert M.soft_iou(np.ones((2, 2)), MASK_RIGHT) == pytest.approx(0.5)  # uniform: 2 / 4


# ----------------------------------------------------------------------------------- EPG, SNR
SAL_E = np.array([[-1.0, 1.0], [2.0, 1.0]])  # energy max(S, 0) = [[0, 1], [2, 1]], total 4


def test_epg_and_snr():
    bottom_left = np.array([[False, False], [True, False]])
    assert M.energy_pointing_game(SAL_E, bottom_left) == pytest.approx(2 / 4)
    assert M.snr(SAL_E, bottom_left) == pytest.approx(2 / (0 + 1 + 1))
    diag = np.array([[False, True], [True, False]])
    assert M.energy_pointing_game(SAL_E, diag) == pytest.approx(3 / 4)
    assert M.snr(SAL_E, diag) == pytest.approx(3 / 1)


def test_epg_upsampled_nearest_is_area_weighted():
    mask = np.zeros((4, 4), bool)
    mask[2:, :2] = True  # the block of cell (1, 0): energy 2 * 4 pixels of 4 * 4 total energy
    assert M.energy_pointing_game(SAL_E, mask, mode="nearest") == pytest.approx(8 / 16)


def test_epg_snr_edge_cases():
    mask = np.array([[True, False], [False, False]])
    assert math.isnan(M.energy_pointing_game(SAL_E, np.zeros((2, 2), bool)))
    # no positive energy: evaluated as the uniform map -> |M| / N = 1/4, SNR = 1 / 3
    assert M.energy_pointing_game(-np.ones((2, 2)), mask) == pytest.approx(0.25)
    assert M.snr(-np.abs(SAL_E) - 1, mask) == pytest.approx(1 / 3)
    assert math.isnan(M.snr(SAL_E, np.ones((2, 2), bool)))  # no background
    assert M.snr(np.array([[1.0, 0.0], [0.0, 0.0]]), mask) == math.inf


def test_token_snr():
    weights = np.array([0.1, 0.9, 0.2, 0.7])
    content = np.array([False, True, False, True])
    # content mean (0.9 + 0.7) / 2 = 0.8; filler mean (0.1 + 0.2) / 2 = 0.15
    assert M.token_snr(weights, content) == pytest.approx(0.8 / 0.15)
    assert math.isnan(M.token_snr(weights, np.ones(4, bool)))
    assert M.token_snr(np.array([0.0, 1.0]), np.array([False, True])) == math.inf
    with pytest.raises(ValueError):
        M.token_snr(np.array([-1.0, 1.0]), np.array([False, True]))


# ------------------------------------------------------------------------ deletion / insertion
def _cell_image() -> np.ndarray:
    """4x4 image, 2x2 blocks; channel 0 per cell: A(0,0)=100, B(0,1)=60, C(1,0)=20, D(1,1)=0."""
    cells = np.array([[100, 60], [20, 0]], np.uint8)
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = np.kron(cells, np.ones((2, 2), np.uint8))
    return img


class CountingScore:
    """score = mean of channel 0 over pixels (linear, so the curves are hand-computable)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.ndim == 4
        self.calls.append(images.shape[0])
        return images[..., 0].reshape(images.shape[0], -1).mean(axis=1)


def test_cell_schedule():
    # 64 cells in 50 steps: 64 = 50 + 14 -> 14 steps switch 2 cells, 36 steps switch 1
    steps = np.diff(M.cell_schedule(64, 50))
    assert (steps == 2).sum() == 14 and (steps == 1).sum() == 36
    np.testing.assert_array_equal(M.cell_schedule(4, 8), [0, 0, 1, 1, 2, 2, 3, 3, 4])


def test_deletion_insertion_hand_computed():
    sal = np.array([[0.1, 0.9], [0.5, 0.3]])  # order B (.9), C (.5), D (.3), A (.1)
    score = CountingScore()
    out = M.deletion_insertion(sal, _cell_image(), np.zeros((4, 4, 3)), score, steps=4)
    # s_orig = (100 + 60 + 20 + 0) / 4 = 45, s_blur = 0
    # deletion raw: 45, -B (100+20+0)/4 = 30, -C 25, -D 25, -A 0 -> / 45: 1, 2/3, 5/9, 5/9, 0
    np.testing.assert_allclose(out["deletion_scores"], [45, 30, 25, 25, 0])
    np.testing.assert_allclose(out["deletion_curve"], [1, 2 / 3, 5 / 9, 5 / 9, 0])
    # insertion raw: 0, +B 15, +C 20, +D 20, +A 45 -> 0, 1/3, 4/9, 4/9, 1
    np.testing.assert_allclose(out["insertion_curve"], [0, 1 / 3, 4 / 9, 4 / 9, 1])
    np.testing.assert_allclose(out["fractions"], [0, 0.25, 0.5, 0.75, 1])
    # trapezoid, dx = 1/4: (1/8) * [(1 + 2/3) + (2/3 + 5/9) + (5/9 + 5/9) + (5/9 + 0)] = 41/72
    assert out["deletion_auc"] == pytest.approx(41 / 72)
    # (1/8) * [(0 + 1/3) + (1/3 + 4/9) + (4/9 + 4/9) + (4/9 + 1)] = 31/72
    assert out["insertion_auc"] == pytest.approx(31 / 72)
    assert (out["score_original"], out["score_baseline"]) == (45.0, 0.0)
    # unique images: original, baseline, 3 deletion + 3 insertion intermediates = 8, one call
    assert score.calls == [8]


def test_deletion_insertion_batches_and_full_size_schedule():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    score = CountingScore()
    out = M.deletion_insertion(
        rng.random((8, 8)), image, np.zeros_like(image), score, batch_size=32
    )
    # 50 steps over 64 cells: 49 distinct inner k per curve -> 2 + 2 * 49 = 100 images
    assert score.calls == [32, 32, 32, 4]
    assert out["deletion_curve"].shape == (51,) and out["fractions"][[0, -1]].tolist() == [0, 1]
    assert out["deletion_curve"][0] == 1.0 and out["deletion_curve"][-1] == 0.0
    # linear score: deletion + insertion curves sum to 1 at every step, so the AUCs sum to 1
    assert out["deletion_auc"] + out["insertion_auc"] == pytest.approx(1.0)


def test_deletion_unequal_blocks_and_ties():
    # 2x2 grid on a 3x3 image: rows/cols -> cells 0, 0, 1: cell pixel counts 4, 2, 2, 1
    sal = np.array([[4.0, 3.0], [2.0, 1.0]])
    out = M.deletion_insertion(
        sal, np.zeros((3, 3, 3), np.uint8), np.full((3, 3, 3), 9), CountingScore(), steps=4
    )
    np.testing.assert_allclose(out["fractions"], [0, 4 / 9, 6 / 9, 8 / 9, 1])
    # ties (uniform map) keep raster order: cell ranks 0, 1 / 2, 3
    np.testing.assert_array_equal(M.cell_ranks(np.ones((2, 2)), (2, 2)), [[0, 1], [2, 3]])


def test_deletion_insertion_degenerate_normalisation_is_nan():
    image = np.full((4, 4, 3), 7, np.uint8)
    out = M.deletion_insertion(np.ones((2, 2)), image, image, CountingScore(), steps=4)
    assert math.isnan(out["deletion_auc"]) and math.isnan(out["insertion_auc"])
    np.testing.assert_allclose(out["deletion_scores"], np.full(5, 7.0))


def test_probability_score_fn():
    logprob = np.log(np.array([[0.5, 0.25], [1.0, 0.5]]))
    np.testing.assert_allclose(M.mean_token_probability(logprob), [0.375, 0.75])
    np.testing.assert_allclose(M.mean_token_probability(logprob, [1]), [0.25, 0.5])
    score = M.probability_score_fn(lambda images: logprob[: len(images)], positions=[0])
    np.testing.assert_allclose(score(np.zeros((2, 1, 1, 3), np.uint8)), [0.5, 1.0])


# ------------------------------------------------------------------------- DEX-AR perplexity
PPL_IMAGE = np.repeat(np.array([[100, 50], [20, 0]], np.uint8)[..., None], 3, axis=2)


def _logprob_fn(images: np.ndarray) -> np.ndarray:
    """Token 0: -1 - D / 100, D = sum |channel 0 - original|; token 1: -2 (constant)."""
    diff = np.abs(images[..., 0].astype(float) - PPL_IMAGE[..., 0]).reshape(len(images), -1)
    return np.stack([-1.0 - diff.sum(axis=1) / 100, np.full(len(images), -2.0)], axis=1)


def test_perplexity_auc_hand_computed():
    sal = np.array([[0.9, 0.1], [0.5, 0.3]])
    fracs = [0.0, 0.25, 0.5, 0.75, 1.0]  # k = floor(p * 4 + 0.5) = 0, 1, 2, 3, 4 pixels
    out = M.perplexity_auc(sal, PPL_IMAGE, _logprob_fn, (10, 10, 10), fractions=fracs)
    # mean lp = (-3 - D / 100) / 2, so PPL(p) / PPL(0) = exp(D / 200)
    # positive order 100, 20, 0, 50: D = 90, 100, 110, 150
    pos = np.exp(np.array([0, 90, 100, 110, 150]) / 200)
    # negative order 50, 0, 20, 100: D = 40, 50, 60, 150
    neg = np.exp(np.array([0, 40, 50, 60, 150]) / 200)
    np.testing.assert_allclose(out["positive_curve"], pos)
    np.testing.assert_allclose(out["negative_curve"], neg)
    assert out["positive_auc"] == pytest.approx(0.125 * (pos[0] + 2 * pos[1:4].sum() + pos[4]))
    assert out["negative_auc"] == pytest.approx(0.125 * (neg[0] + 2 * neg[1:4].sum() + neg[4]))
    assert out["ppl_original"] == pytest.approx(math.exp(1.5))


def test_perplexity_auc_token_mask_and_default_grid():
    sal = np.array([[0.9, 0.1], [0.5, 0.3]])
    out = M.perplexity_auc(
        sal,
        PPL_IMAGE,
        _logprob_fn,
        (10, 10, 10),
        fractions=[0.0, 1.0],
        token_mask=np.array([True, False]),
    )
    # token 0 only: ratio = exp(D / 100); p = 1: D = 150 -> AUC = (1 + e^1.5) / 2
    assert out["positive_auc"] == pytest.approx((1 + math.exp(1.5)) / 2)
    out = M.perplexity_auc(sal, PPL_IMAGE, _logprob_fn, (10, 10, 10))
    # default p = 0, .1, ..., 1 on 4 pixels: k = 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4
    d = np.array([0, 0, 90, 90, 100, 100, 100, 110, 110, 150, 150])
    np.testing.assert_allclose(out["positive_curve"], np.exp(d / 200))


# ------------------------------------------------------------------------ baselines and stats
def test_mean_ci95_small_and_large_n():
    # 1..4: mean 2.5, s = sqrt((2.25 + .25 + .25 + 2.25) / 3) = sqrt(5/3); t_{.975,3} = 3.182
    half = 3.182 * math.sqrt(5 / 3) / 2
    assert M.mean_ci95([1, 2, 3, 4]) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    # 0..29: var(ddof=1) = n (n + 1) / 12 = 77.5; z = 1.96
    half = 1.96 * math.sqrt(77.5) / math.sqrt(30)
    assert M.mean_ci95(range(30)) == pytest.approx((14.5, 14.5 - half, 14.5 + half))


def test_mean_ci95_edge_cases():
    np.testing.assert_allclose(M.mean_ci95([]), [np.nan] * 3, **NAN_OK)
    np.testing.assert_allclose(M.mean_ci95([3.0, np.nan]), [3.0, np.nan, np.nan], **NAN_OK)
    assert math.isnan(M.mean_ci95([1.0, np.nan, 2.0], omit_nan=False)[0])


def test_baseline_maps():
    np.testing.assert_array_equal(M.uniform_map(2, 2), np.full((2, 2), 0.25))
    np.testing.assert_array_equal(M.random_map(3, 4, seed=5), M.random_map(3, 4, seed=5))
    assert not np.array_equal(M.random_map(3, 4, seed=5), M.random_map(3, 4, seed=6))
    # sigma * 3 = 1: centre 1, edge-adjacent exp(-1/2), corner exp(-(1 + 1)/2)
    prior = M.centre_prior(3, 3, sigma=1 / 3)
    a, b = math.exp(-0.5), math.exp(-1.0)
    np.testing.assert_allclose(prior, [[b, a, b], [a, 1, a], [b, a, b]])


def test_dataset_mean_colour():
    # (the blurred baseline is the engine's blur_baseline: tests/test_llr_igos.py)
    # (10, 20, 30) once and (40, 50, 60) twice -> ((10 + 80) / 3, (20 + 100) / 3, (30 + 120) / 3)
    images = [np.array([[[10, 20, 30]]], np.uint8), np.array([[[40, 50, 60]] * 2], np.uint8)]
    np.testing.assert_allclose(M.dataset_mean_colour(images), [30, 40, 50])


def test_median_ci95_bootstrap():
    # a constant sample: every resample has the same median
    assert M.median_ci95([2.0] * 7) == (2.0, 2.0, 2.0)
    # the interval holds the median, lies inside the data's range, is reproducible (seeded) and
    # ignores NaN; one exploding value moves the mean, not the median
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1000.0, float("nan")]
    median, low, high = M.median_ci95(values)
    assert median == pytest.approx(0.55)
    assert 0.1 <= low <= median <= high <= 1000.0 and high < 2.0
    assert M.median_ci95(values) == (median, low, high)
    assert M.mean_ci95(values)[0] > 100
    np.testing.assert_allclose(M.median_ci95([]), [np.nan] * 3, **NAN_OK)
    np.testing.assert_allclose(M.median_ci95([4.0]), [4.0, np.nan, np.nan], **NAN_OK)
