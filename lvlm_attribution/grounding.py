"""Grounding flags: which answer tokens are NOT supported by the image (rule "grounding-v2").

Signals per answer token t (all teacher-forced on the answer being explained):
  p_t      probability of the token given the image (TokenInfo.probability)         always
  LLR_t    ln p(y_t | I) − ln p(y_t | blurred I) (TokenInfo.llr)                     always
  δ_t      DEX-AR's token filter (weight "dexar.delta")                         when dexar ran
  a^V_t    GLIMPSE's visual alignment (weight "glimpse.visual_alignment")     when glimpse ran

Which tokens can be flagged: only CONTENT-LIKE tokens — `llr.is_stop_token` is False (so no
punctuation, articles, auxiliaries). Filler words that merely repeat the question ("circle" in
"the circle is red", "object", "number") are content-like by text, but the rule does not need to
know them: such a token is predicted from the text alone, so it has p ≈ 1 and LLR ≈ 0, and its
support stays high. What the rule looks for is a token the IMAGE argues against: a corrupted word
("the circle is blue" when it is red) gets a LOW probability under the real image, usually lower
than under the blurred image (LLR < 0) or only slightly higher.

Per-token support (a logistic score in [0, 1]; higher = better supported):
  s_t = σ( w · x_t + b ),  x_t = [ ln max(p_t, 1e-6),  clip(LLR_t, −10, 10),
                                   δ_t / mean_answer(δ)   (clipped to [0, 10]; DEX-AR only),
                                   a^V_t / mean_answer(a^V) (clipped to [0, 10]; GLIMPSE only) ]
The δ and a^V features are RELATIVE to the answer's own mean, so their scale does not depend on
the model (δ is an unnormalised gradient difference, a^V ~ 1/N). The weights (w, b) are fitted by
L2-regularised logistic regression in audit mode on planted errors (`fit_logistic`; corrupted target
tokens vs content-like tokens of correct answers), ONE weight set per available signal subset, so
the rule degrades gracefully: with neither method it uses p + LLR, and `GroundingSummary.rule`
names the signals used ("grounding-v2:llr+p", "grounding-v2:llr+p+delta", "...+align",
"...+delta+align"). A token is flagged when s_t < 0.5 (DECISION_THRESHOLD): the fit weights the
two classes equally, so s_t = 0.5 is its decision boundary — "more likely a planted error than a
supported token, at even odds". Real error rates are far below even odds, so this threshold errs
towards NOT flagging; recall stays >= 0.9 in every question kind, shape at the bar
(docs/grounding.md).

grounding-v1 (same weights) flagged below the largest threshold that kept 3% false flags on the
pooled content tokens of the calibration seed (~0.93). That spent the whole false-flag budget
where one question kind's uncertain tokens concentrate: 12% false flags on correct shape words on
the next seed, for a recall margin nobody needed. v2 replaces only the threshold.

Answer-level score: min over content-like tokens of s_t (1.0 when the answer has none) — an answer
is as grounded as its least supported claim.

Calibration (docs/grounding.md): `lvlm-attribution grounding-eval --calibrate` on seed 1 printed
the constants in CALIBRATION below; the reported numbers use another seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .llr import is_stop_token
from .schema import GroundingSummary, TokenInfo

RULE = "grounding-v2"
DECISION_THRESHOLD = 0.5  # the balanced fit's decision boundary (module docstring)
SIGNALS = ("p", "llr", "delta", "align")
WEIGHT_KEYS = {"delta": "dexar.delta", "align": "glimpse.visual_alignment"}
P_FLOOR = 1e-6
LLR_CLIP = 10.0
RELATIVE_CLIP = 10.0


@dataclass(frozen=True)
class RuleParams:
    """Logistic weights over the features of the signals in `signals`, in SIGNALS order."""

    signals: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float

    @property
    def name(self) -> str:
        order = ["llr", "p"] + [s for s in ("delta", "align") if s in self.signals]
        return f"{RULE}:" + "+".join(order)


# Weights fitted by `grounding-eval --calibrate --seed 1 --scenes 250` on the embedded model
# (weights version c607d36bae69, runs/train-a step 3000); threshold DECISION_THRESHOLD; evaluated
# on seed 3 in docs/grounding.md. Keyed by the optional signals present. On this model δ and a^V
# get small NEGATIVE weights: they add nothing beyond p and LLR (see docs/grounding.md).
CALIBRATION: dict[tuple[str, ...], RuleParams] = {
    (): RuleParams(
        ("p", "llr"), (1.9851, -0.1081),
        3.8221, DECISION_THRESHOLD),
    ("delta",): RuleParams(
        ("p", "llr", "delta"), (1.997, -0.1125, -0.0937),
        3.9495, DECISION_THRESHOLD),
    ("align",): RuleParams(
        ("p", "llr", "align"), (1.9802, -0.1069, -0.1363),
        3.9538, DECISION_THRESHOLD),
    ("delta", "align"): RuleParams(
        ("p", "llr", "delta", "align"), (1.9921, -0.1113, -0.0923, -0.131),
        4.0745, DECISION_THRESHOLD),
}


def available_signals(tokens: Sequence[TokenInfo]) -> tuple[str, ...]:
    """Optional signals present on every token (in SIGNALS order)."""
    return tuple(s for s in ("delta", "align")
                 if tokens and all(WEIGHT_KEYS[s] in t.weights for t in tokens))


def _relative(values: np.ndarray) -> np.ndarray:
    mean = float(values.mean()) if values.size else 0.0
    if not mean > 0:
        return np.zeros_like(values)
    return np.clip(values / mean, 0.0, RELATIVE_CLIP)


def features(tokens: Sequence[TokenInfo], signals: Sequence[str]) -> np.ndarray:
    """(T, len(signals)) feature matrix in the order of `signals` (see the module docstring).
    A token without an LLR (not computed) gets LLR 0 (no evidence either way)."""
    p = np.array([t.probability for t in tokens], dtype=np.float64)
    llr = np.array([0.0 if t.llr is None or not math.isfinite(t.llr) else t.llr for t in tokens])
    cols = {"p": np.log(np.maximum(p, P_FLOOR)), "llr": np.clip(llr, -LLR_CLIP, LLR_CLIP)}
    for s in ("delta", "align"):
        if s in signals:
            raw = np.array([max(float(t.weights[WEIGHT_KEYS[s]]), 0.0) for t in tokens])
            cols[s] = _relative(raw)
    return np.stack([cols[s] for s in signals], axis=1) if tokens else np.zeros((0, len(signals)))


def content_like(tokens: Sequence[TokenInfo]) -> list[bool]:
    return [not is_stop_token(t.text) for t in tokens]


def support_scores(tokens: Sequence[TokenInfo], params: RuleParams) -> np.ndarray:
    """s_t in [0, 1] for every token (stop tokens included; only content-like ones are used)."""
    x = features(tokens, params.signals)
    z = x @ np.asarray(params.weights, dtype=np.float64) + params.bias
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def params_for(tokens: Sequence[TokenInfo],
               calibration: dict[tuple[str, ...], RuleParams] | None = None) -> RuleParams:
    table = CALIBRATION if calibration is None else calibration
    return table[available_signals(tokens)]


def ground(tokens: Sequence[TokenInfo],
           calibration: dict[tuple[str, ...], RuleParams] | None = None) -> GroundingSummary:
    """Apply the rule (RULE): sets `TokenInfo.grounded` on every token (None for stop/punctuation
    tokens, which are never judged) and returns the answer-level summary."""
    params = params_for(tokens, calibration)
    scores = support_scores(tokens, params)
    judged = content_like(tokens)
    flagged = []
    for t, (token, ok, s) in enumerate(zip(tokens, judged, scores, strict=True)):
        if not ok:
            token.grounded = None
            continue
        token.grounded = bool(s >= params.threshold)
        if not token.grounded:
            flagged.append(t)
    content_scores = [float(s) for s, ok in zip(scores, judged, strict=True) if ok]
    score = min(content_scores) if content_scores else 1.0
    return GroundingSummary(score=float(score), flagged=flagged, rule=params.name)


# ---- calibration ------------------------------------------------------------------------------
def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2,
                 iterations: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (IRLS); y = 1 means SUPPORTED.
    Classes are re-weighted to equal total weight (corrupted tokens are the minority).
    Returns (weights, bias)."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    pos = max(int(y.sum()), 1)
    neg = max(n - int(y.sum()), 1)
    sample_w = np.where(y > 0, n / (2 * pos), n / (2 * neg))
    beta = np.zeros(d + 1)
    reg = np.full(d + 1, l2 * n)
    reg[-1] = 0.0
    for _ in range(iterations):
        z = np.clip(xb @ beta, -50, 50)
        mu = 1.0 / (1.0 + np.exp(-z))
        grad = xb.T @ (sample_w * (mu - y)) + reg * beta
        hess = (xb * (sample_w * mu * (1 - mu))[:, None]).T @ xb + np.diag(reg) + 1e-9 * np.eye(
            d + 1)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return beta[:-1], float(beta[-1])
