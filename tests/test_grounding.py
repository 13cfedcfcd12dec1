"""Grounding rule (grounding-v2), planted-error generator, engine wiring."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lvlm_attribution.grounding import (
    CALIBRATION,
    DECISION_THRESHOLD,
    RuleParams,
    available_signals,
    fit_logistic,
    ground,
    support_scores,
)
from lvlm_attribution.schema import ExplainOptions, TokenInfo
from lvlm_attribution.world.corrupt import FLIP, corrupt
from lvlm_attribution.world.scenes import COUNT_WORDS, KINDS, PALETTE, SHAPES, generate


def _tokens(rows, weights=None):
    """rows: (text, p, llr); weights: optional list of dicts."""
    return [TokenInfo(index=i, token_id=i, text=t, probability=p, llr=llr,
                      weights=dict(weights[i]) if weights else {})
            for i, (t, p, llr) in enumerate(rows)]


ANSWER_OK = [("the", 0.999, 0.0), ("circle", 0.998, 0.0), ("is", 0.999, 0.0), ("red", 0.99, 6.0)]
ANSWER_BAD = [("the", 0.999, 0.0), ("circle", 0.998, 0.0), ("is", 0.999, 0.0),
              ("blue", 1e-4, -6.0)]


def test_filler_and_correct_content_are_grounded_corrupted_word_is_flagged():
    good = _tokens(ANSWER_OK)
    g = ground(good)
    assert g.flagged == [] and g.rule == "grounding-v2:llr+p"
    assert [t.grounded for t in good] == [None, True, None, True]  # stop words are not judged
    bad = _tokens(ANSWER_BAD)
    b = ground(bad)
    assert b.flagged == [3]
    assert bad[3].grounded is False and bad[1].grounded is True
    assert 0.0 <= b.score < g.score <= 1.0
    # answer score = the least supported content-like token
    params = CALIBRATION[()]
    assert b.score == pytest.approx(float(support_scores(bad, params)[3]))


def test_rule_names_the_signals_used_and_degrades_gracefully():
    rows = ANSWER_BAD
    delta = [{"dexar.delta": v} for v in (0.0, 0.1, 0.3, 0.2)]
    both = [{"dexar.delta": d, "glimpse.visual_alignment": a}
            for d, a in zip((0.0, 0.1, 0.3, 0.2), (0.01, 0.02, 0.01, 0.015), strict=True)]
    align = [{"glimpse.visual_alignment": a} for a in (0.01, 0.02, 0.01, 0.015)]
    assert ground(_tokens(rows)).rule == "grounding-v2:llr+p"
    assert ground(_tokens(rows, delta)).rule == "grounding-v2:llr+p+delta"
    assert ground(_tokens(rows, align)).rule == "grounding-v2:llr+p+align"
    assert ground(_tokens(rows, both)).rule == "grounding-v2:llr+p+delta+align"
    for w in (None, delta, align, both):
        assert ground(_tokens(rows, w)).flagged == [3]
    # a signal present on only some tokens is not used
    partial = [dict(d) for d in delta]
    del partial[0]["dexar.delta"]
    assert available_signals(_tokens(rows, partial)) == ()
    # missing LLR (None) is treated as no evidence, not an error
    none_llr = _tokens([("red", 0.99, 0.0)])
    none_llr[0].llr = None
    assert ground(none_llr).flagged == []


def test_only_content_like_tokens_can_be_flagged():
    toks = _tokens([("the", 1e-5, -9.0), (",", 1e-5, -9.0), ("is", 1e-5, -9.0)])
    g = ground(toks)
    assert g.flagged == [] and g.score == 1.0
    assert all(t.grounded is None for t in toks)


def test_custom_calibration_is_used():
    strict = {(): RuleParams(("p", "llr"), (1.0, 0.0), 0.0, 0.9999)}
    g = ground(_tokens(ANSWER_OK), strict)  # s = p < 0.9999 for every content token
    assert g.flagged == [1, 3]


def test_fit_logistic_balances_the_classes():
    """Two unit-variance classes at +-2 (4:1 imbalance): with the classes re-weighted, the decision
    boundary s = 0.5 sits near the midpoint x = 0, not shifted towards the minority class, so each
    class is misclassified at about Phi(-2) = 2.3%."""
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(2, 1, (2000, 1)), rng.normal(-2, 1, (500, 1))]
    y = np.r_[np.ones(2000), np.zeros(500)]
    w, b = fit_logistic(x, y)
    assert w[0] > 0 and abs(-b / w[0]) < 0.15
    s = 1 / (1 + np.exp(-(x[:, 0] * w[0] + b)))
    assert np.mean(s[:2000] < DECISION_THRESHOLD) < 0.04
    assert np.mean(s[2000:] < DECISION_THRESHOLD) > 0.96
    assert all(p.threshold == DECISION_THRESHOLD for p in CALIBRATION.values())


@pytest.mark.parametrize("kind", KINDS)
def test_corruption_changes_exactly_the_intended_word(kind):
    vocab = {"color": set(PALETTE), "shape": set(SHAPES), "count": set(COUNT_WORDS.values())}
    for seed in range(40):
        sample = generate(seed, kind)
        c = corrupt(sample, seed=seed)
        old, new = sample.answer.split(), c.answer.split()
        assert len(new) == len(old) and c.answer != sample.answer
        diff = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
        assert tuple(diff) == c.changed
        assert set(c.targets) <= set(c.changed) and c.targets
        assert all(sample.content[i] for i in c.targets)
        if kind in vocab:
            assert c.changed == (len(old) - 1,) == c.targets
            assert new[-1] in vocab[kind] and new[-1] != old[-1]
        elif kind == "position":
            (i,) = c.changed
            assert i in (len(old) - 2, len(old) - 1) and new[i] == FLIP[old[i]]
        else:  # existence: the yes/no word and the template determiner
            assert c.changed == (0, 3) and c.targets == (0,)
            assert (new[0], new[3]) in (("yes", "a"), ("no", "no"))
            assert new[0] != old[0]
        # the corrupted answer is well formed: same template as some correct answer
        assert new[:-1] == old[:-1] or kind in ("position", "existence")
        assert corrupt(sample, seed=seed) == c  # deterministic


def test_engine_sets_grounding(random_llava_explainer, scene):
    image, sample = scene
    out = random_llava_explainer.explain(image, sample.question, answer=sample.answer,
                                         options=ExplainOptions(methods=("dexar",)))
    assert out.grounding is not None
    assert out.grounding.rule == "grounding-v2:llr+p+delta"
    assert 0.0 <= out.grounding.score <= 1.0
    for t in out.tokens:
        if t.text in ("the", "is"):
            assert t.grounded is None
        else:
            assert isinstance(t.grounded, bool)
            assert (t.index in out.grounding.flagged) == (not t.grounded)
    d = out.to_dict()
    assert d["grounding"]["rule"] == "grounding-v2:llr+p+delta"
    none = random_llava_explainer.explain(Image.fromarray(sample.image), sample.question,
                                          answer=sample.answer,
                                          options=ExplainOptions(methods=()))
    assert none.grounding.rule == "grounding-v2:llr+p"
