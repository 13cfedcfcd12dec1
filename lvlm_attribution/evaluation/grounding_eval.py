"""`grounding-eval`: precision/recall of the grounding flags on planted errors (audit mode).

For every held-out scene (`held_out(GROUNDING_STREAM + seed, i)`, disjoint from model-eval's and
evaluate's streams) the engine explains, teacher-forced, the CORRECT answer and a CORRUPTED one
(`world.corrupt`: one colour/shape/count/position word swapped, or an existence answer flipped),
and records every token's signals (p, LLR, DEX-AR δ, GLIMPSE a^V). The rule (`grounding.py`) is
applied afterwards to the stored signals, so one collection serves calibration (`--calibrate`:
fit the per-signal-subset weights and thresholds) and evaluation of every signal subset.

Reported, overall and per question kind:
  recall        flagged corrupted target tokens / corrupted target tokens
  precision     flagged targets / all flags in the corrupted answers
                (precision_all: / all flags in both answers)
  false_flag    flagged world-content tokens / world-content tokens of CORRECT answers (the
                issue's bar, <= 5%); false_flag_content_like: the same over every content-like
                token (non-stop) of correct answers
  auroc         of the answer-level score, correct (positive) vs corrupted answers
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..engine import Explainer
from ..grounding import (
    CALIBRATION,
    DECISION_THRESHOLD,
    WEIGHT_KEYS,
    RuleParams,
    content_like,
    features,
    fit_logistic,
    ground,
)
from ..schema import ExplainOptions, TokenInfo
from ..world.corrupt import corrupt
from ..world.scenes import KINDS, generate, held_out
from .run import load_done

GROUNDING_STREAM = 30_000


@dataclass(frozen=True)
class GroundingEvalConfig:
    scenes: int = 500
    seed: int = 0
    methods: tuple[str, ...] = ("glimpse", "dexar")
    kinds: tuple[str, ...] = KINDS

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("scenes")
        d["methods"], d["kinds"] = list(self.methods), list(self.kinds)
        return d


def _token_rows(expl, content: Sequence[bool], targets: Sequence[int],
                changed: Sequence[int]) -> list[dict[str, Any]]:
    keep = set(WEIGHT_KEYS.values())
    return [{"text": t.text, "p": t.probability, "llr": t.llr,
             "weights": {k: v for k, v in t.weights.items() if k in keep},
             "content": bool(content[t.index]) if t.index < len(content) else False,
             "target": t.index in targets, "changed": t.index in changed}
            for t in expl.tokens]


def collect_scene(explainer: Explainer, index: int, seed: int, kind: str,
                  methods: Sequence[str]) -> dict[str, Any]:
    sample = generate(seed, kind)
    bad = corrupt(sample, seed=index)
    image = Image.fromarray(sample.image)
    options = ExplainOptions(methods=tuple(methods))
    words = len(sample.answer_words)
    if len(explainer.encode_answer(sample.answer)) != words:
        raise ValueError("answer words and tokens are not aligned one to one")
    good = explainer.explain(image, sample.question, answer=sample.answer, options=options)
    wrong = explainer.explain(image, sample.question, answer=bad.answer, options=options)
    return {"type": "scene", "index": index, "seed": seed, "kind": kind,
            "question": sample.question, "answer": sample.answer, "corrupted": bad.answer,
            "description": bad.description,
            "correct_tokens": _token_rows(good, sample.content, (), ()),
            "corrupted_tokens": _token_rows(wrong, sample.content, bad.targets, bad.changed)}


def collect(explainer: Explainer, cfg: GroundingEvalConfig, out: Path | None = None,
            progress: bool = True) -> list[dict[str, Any]]:
    identity = {**cfg.identity(), "model_version": explainer.model_version}
    done = load_done(out, identity) if out is not None else {}
    plan = [(i, held_out(GROUNDING_STREAM + cfg.seed, i), cfg.kinds[i % len(cfg.kinds)])
            for i in range(cfg.scenes)]
    records = [done[i] for i, _, _ in plan if i in done]
    todo = [p for p in plan if p[0] not in done]
    handle = out.open("a") if out is not None else None
    try:
        for index, seed, kind in tqdm(todo, desc="grounding-eval", disable=not progress,
                                      mininterval=2, file=sys.stderr):
            rec = collect_scene(explainer, index, seed, kind, cfg.methods)
            if handle is not None:
                handle.write(json.dumps(rec) + "\n")
                handle.flush()
            records.append(rec)
    finally:
        if handle is not None:
            handle.close()
    return records


# ---- applying the rule ------------------------------------------------------------------------
def to_tokens(rows: Sequence[dict], signals: Sequence[str] = ("delta", "align")) -> list[TokenInfo]:
    """TokenInfo objects from stored rows, keeping only the optional signals in `signals`."""
    keep = {WEIGHT_KEYS[s] for s in signals}
    return [TokenInfo(index=i, token_id=0, text=r["text"], probability=r["p"], llr=r["llr"],
                      weights={k: v for k, v in r["weights"].items() if k in keep})
            for i, r in enumerate(rows)]


def _auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score_pos > score_neg) + ½ P(tie) (Mann-Whitney)."""
    a, b = np.asarray(pos, float), np.asarray(neg, float)
    if a.size == 0 or b.size == 0:
        return float("nan")
    greater = (a[:, None] > b[None, :]).sum()
    ties = (a[:, None] == b[None, :]).sum()
    return float((greater + 0.5 * ties) / (a.size * b.size))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def score_records(records: Sequence[dict], signals: Sequence[str] = ("delta", "align"),
                  calibration: dict | None = None) -> dict[str, Any]:
    """Apply the rule to stored records; metrics overall and per kind."""
    groups: dict[str, list[dict]] = {"all": list(records)}
    for r in records:
        groups.setdefault(r["kind"], []).append(r)
    rule_name = None
    out: dict[str, Any] = {}
    for scope, recs in groups.items():
        c = {"targets": 0, "targets_flagged": 0, "flags_corrupted": 0, "flags_correct": 0,
             "content_correct": 0, "content_correct_flagged": 0, "content_like_correct": 0,
             "content_like_correct_flagged": 0, "answers_correct_flagged": 0,
             "answers_corrupted_flagged": 0}
        good_scores, bad_scores = [], []
        for r in recs:
            good = to_tokens(r["correct_tokens"], signals)
            g = ground(good, calibration)
            rule_name = g.rule
            good_scores.append(g.score)
            flags = set(g.flagged)
            c["flags_correct"] += len(flags)
            c["answers_correct_flagged"] += bool(flags)
            for t, (row, like) in enumerate(zip(r["correct_tokens"], content_like(good),
                                                strict=True)):
                if row["content"]:
                    c["content_correct"] += 1
                    c["content_correct_flagged"] += t in flags
                if like:
                    c["content_like_correct"] += 1
                    c["content_like_correct_flagged"] += t in flags
            bad = to_tokens(r["corrupted_tokens"], signals)
            b = ground(bad, calibration)
            bad_scores.append(b.score)
            bflags = set(b.flagged)
            c["flags_corrupted"] += len(bflags)
            c["answers_corrupted_flagged"] += bool(bflags)
            for t, row in enumerate(r["corrupted_tokens"]):
                if row["target"]:
                    c["targets"] += 1
                    c["targets_flagged"] += t in bflags
        out[scope] = {
            "scenes": len(recs),
            "recall": _ratio(c["targets_flagged"], c["targets"]),
            "precision": _ratio(c["targets_flagged"], c["flags_corrupted"]),
            "precision_all": _ratio(c["targets_flagged"],
                                    c["flags_corrupted"] + c["flags_correct"]),
            "false_flag": _ratio(c["content_correct_flagged"], c["content_correct"]),
            "false_flag_content_like": _ratio(c["content_like_correct_flagged"],
                                              c["content_like_correct"]),
            "answers_correct_flagged": _ratio(c["answers_correct_flagged"], len(recs)),
            "answers_corrupted_flagged": _ratio(c["answers_corrupted_flagged"], len(recs)),
            "auroc": _auroc(good_scores, bad_scores),
            "counts": c,
        }
    return {"rule": rule_name, "by_scope": out}


def _collected(records: Sequence[dict], subset: Sequence[str]) -> bool:
    keys = {WEIGHT_KEYS[sig] for sig in subset}
    return all(keys <= set(row["weights"]) for r in records
               for row in r["correct_tokens"] + r["corrupted_tokens"])


def calibrate(records: Sequence[dict], *, l2: float = 1e-2) -> dict[tuple[str, ...], RuleParams]:
    """Fit the weights for every optional-signal subset the records carry (module docstring); the
    threshold is the balanced fit's decision boundary, DECISION_THRESHOLD (grounding.py says
    why). A subset whose signal was not collected (its method did not run) is left out."""
    result = {}
    for subset in CALIBRATION:  # every optional-signal subset the rule knows
        if not _collected(records, subset):
            continue
        signals = ("p", "llr", *subset)
        supported, unsupported = [], []
        for r in records:
            good = to_tokens(r["correct_tokens"], subset)
            x = features(good, signals)
            supported += [x[t] for t, like in enumerate(content_like(good)) if like]
            xb = features(to_tokens(r["corrupted_tokens"], subset), signals)
            unsupported += [xb[t] for t, row in enumerate(r["corrupted_tokens"]) if row["target"]]
        y = np.r_[np.ones(len(supported)), np.zeros(len(unsupported))]
        w, b = fit_logistic(np.array(supported + unsupported), y, l2=l2)
        result[subset] = RuleParams(signals, tuple(round(float(v), 4) for v in w), round(b, 4),
                                    DECISION_THRESHOLD)
    return result


def calibration_literal(calib: dict[tuple[str, ...], RuleParams]) -> str:
    """Python source for grounding.CALIBRATION."""
    lines = ["CALIBRATION: dict[tuple[str, ...], RuleParams] = {"]
    for key, p in calib.items():
        lines.append(f"    {key!r}: RuleParams(\n        {p.signals!r}, {p.weights!r},\n"
                     f"        {p.bias!r}, {p.threshold!r}),")
    lines.append("}")
    return "\n".join(lines)


def run_grounding_eval(explainer: Explainer, cfg: GroundingEvalConfig, out: Path | None = None,
                       do_calibrate: bool = False, progress: bool = True) -> dict[str, Any]:
    records = collect(explainer, cfg, out, progress)
    fitted = calibrate(records) if do_calibrate else None
    calib = {**CALIBRATION, **fitted} if fitted is not None else None
    subsets = {}
    for subset in CALIBRATION:
        if records and _collected(records, subset):
            scored = score_records(records, subset, calib)
            subsets[scored["rule"]] = scored["by_scope"]
    report = {
        "config": {**cfg.identity(), "scenes": cfg.scenes, "model_version":
                   explainer.model_version},
        "model": explainer.model_name, "scenes_done": len(records),
        "calibration": ("fitted on THIS run (in-sample numbers)" if calib is not None
                        else "shipped grounding.CALIBRATION"),
        "calibration_params": {"+".join(k) or "-": asdict(v) for k, v in
                               (calib or CALIBRATION).items()},
        "rules": subsets,
    }
    if fitted is not None:
        report["calibration_literal"] = calibration_literal(fitted)
    return report


def format_grounding(report: dict[str, Any]) -> str:
    lines = [f"{report['scenes_done']} scenes, calibration: {report['calibration']}", ""]
    for rule, scopes in report["rules"].items():
        lines += [f"**{rule}**", "",
                  "| kind | scenes | recall | precision | false-flag (content) | "
                  "false-flag (content-like) | AUROC |", "|---|---|---|---|---|---|---|"]
        for scope, m in scopes.items():
            def f(v):
                return "—" if v is None or v != v else f"{v:.3f}"
            lines.append(f"| {scope} | {m['scenes']} | {f(m['recall'])} | {f(m['precision'])} | "
                         f"{f(m['false_flag'])} | {f(m['false_flag_content_like'])} | "
                         f"{f(m['auroc'])} |")
        lines.append("")
    return "\n".join(lines)
