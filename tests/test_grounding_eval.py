"""`grounding-eval`: scoring of stored token signals (hand-computed) and a real collection run."""

from __future__ import annotations

import json

import pytest

from lvlm_attribution.evaluation.grounding_eval import (
    GroundingEvalConfig,
    calibrate,
    run_grounding_eval,
    score_records,
)
from lvlm_attribution.grounding import DECISION_THRESHOLD, RuleParams

# s = sigmoid(ln p): flagged below 0.5 <=> p < 1 (no LLR weight) — so p = 1 is "supported"
PLAIN = {(): RuleParams(("p", "llr"), (1.0, 0.0), 0.0, 0.5)}


def _row(text, p, *, content=False, target=False):
    return {"text": text, "p": p, "llr": 0.0, "weights": {}, "content": content,
            "target": target, "changed": target}


def _record(kind, correct_p, corrupted_p):
    """'the circle is W': W correct with probability correct_p, corrupted with corrupted_p."""
    head = [_row("the", 1.0), _row("circle", 1.0), _row("is", 1.0)]
    return {"type": "scene", "kind": kind,
            "correct_tokens": head + [_row("red", correct_p, content=True)],
            "corrupted_tokens": head + [_row("blue", corrupted_p, content=True, target=True)]}


def test_scores_hand_computed():
    # color: correct word supported, corrupted flagged; shape: correct word flagged (p < 1),
    # corrupted word NOT flagged (p = 1: a miss)
    records = [_record("color", 1.0, 0.01), _record("shape", 0.5, 1.0)]
    out = score_records(records, (), PLAIN)
    assert out["rule"] == "grounding-v2:llr+p"
    color, shape, both = (out["by_scope"][k] for k in ("color", "shape", "all"))
    assert (color["recall"], color["precision"], color["false_flag"]) == (1.0, 1.0, 0.0)
    assert shape["recall"] == 0.0 and shape["precision"] is None and shape["false_flag"] == 1.0
    assert (both["recall"], both["false_flag"], both["precision_all"]) == (0.5, 0.5, 0.5)
    # answer scores: correct [sig(0)=.5, sig(ln .5)=1/3], corrupted [sig(ln .01)=1/101, .5]
    # pairs correct > corrupted: .5 > 1/101, 1/3 > 1/101; .5 vs .5 tie; 1/3 < .5 -> (2 + .5)/4
    assert both["auroc"] == pytest.approx(2.5 / 4)
    assert both["answers_correct_flagged"] == 0.5 and both["answers_corrupted_flagged"] == 0.5


def test_collect_calibrate_and_resume(random_llava_explainer, tmp_path):
    cfg = GroundingEvalConfig(scenes=3, seed=4, methods=("dexar",), kinds=("color", "count"))
    out = tmp_path / "g.jsonl"
    report = run_grounding_eval(random_llava_explainer, cfg, out, do_calibrate=True,
                                progress=False)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["type"] == "header" and len(lines) == 4
    assert [r["kind"] for r in lines[1:]] == ["color", "count", "color"]
    for rec in lines[1:]:
        assert sum(r["target"] for r in rec["corrupted_tokens"]) >= 1
        assert all("dexar.delta" in r["weights"] for r in rec["correct_tokens"])
    # dexar ran, glimpse did not: p+LLR and +delta rules are scored, +align ones are not
    assert set(report["rules"]) == {"grounding-v2:llr+p", "grounding-v2:llr+p+delta"}
    assert report["calibration"].startswith("fitted on THIS run")
    assert all(p["threshold"] == DECISION_THRESHOLD
               for p in report["calibration_params"].values())
    assert "CALIBRATION: dict" in report["calibration_literal"]
    fitted = calibrate(lines[1:])
    assert set(fitted) == {(), ("delta",)}  # no glimpse ran: no visual-alignment signal to fit
    again = run_grounding_eval(random_llava_explainer, cfg, out, progress=False)  # all resumed
    assert again["scenes_done"] == 3 and len(out.read_text().splitlines()) == 4
