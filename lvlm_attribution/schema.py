"""Engine-level request and result types. Transport-free: the service maps them to and from
the protobuf messages in proto/; the CLI prints `Explanation.to_dict()`, whose keys follow the
proto3 JSON names (lowerCamelCase) so the CLI and the service return the same structure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ExplainOptions:
    """What to compute for one request."""

    methods: tuple[str, ...] = ("glimpse", "dexar")
    max_new_tokens: int = 16
    per_token_maps: bool = False
    # Per-method overrides of config fields, e.g. {"glimpse": {"tau": 0.5}}.
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-method upper bounds replacing the registry's cost limits, e.g. {"igos": {"iterations":
    # 10}} (a deployment's choice; see MethodSpec.limits).
    setting_limits: dict[str, dict[str, float]] = field(default_factory=dict)
    # LLR per token (one forward of the blurred image). Off: no llr and no grounding verdict.
    llr: bool = True
    # Deletion/insertion AUC of every returned map (lvlm_attribution.faithfulness).
    faithfulness: bool = False


@dataclass
class BatchItem:
    """One request for `Explainer.explain_batch`: generate an answer, or explain a given one
    (text, or exact token ids)."""

    image: Any  # PIL.Image.Image
    question: str
    answer: str | None = None
    answer_token_ids: list[int] | None = None

    @property
    def audit(self) -> bool:
        return self.answer is not None or self.answer_token_ids is not None

    @classmethod
    def of(cls, item: Any) -> BatchItem:
        """A BatchItem from itself, a dict of its fields or an (image, question[, answer])."""
        if isinstance(item, BatchItem):
            return item
        if isinstance(item, dict):
            return cls(**item)
        return cls(*item)


@dataclass
class TokenInfo:
    """One answer token."""

    index: int  # 0-based position within the answer
    token_id: int
    text: str
    probability: float  # p(y_t | image, prompt, y_<t), teacher-forced
    llr: float | None = None  # ln p(y_t | I) - ln p(y_t | blurred I); None when not computed
    weights: dict[str, float] = field(default_factory=dict)  # "glimpse.beta", "dexar.delta", ...
    grounded: bool | None = None  # None when the grounding rule could not be evaluated

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "tokenId": self.token_id, "text": self.text,
                               "probability": self.probability,
                               "weights": dict(self.weights)}
        if self.llr is not None:
            out["llr"] = self.llr
        if self.grounded is not None:
            out["grounded"] = self.grounded
        return out


@dataclass
class MethodOutput:
    """What one attribution method returns. Maps are float32 at the patch grid (h, w)."""

    visual_map: np.ndarray  # (h, w), finite, >= 0
    per_token_maps: np.ndarray | None = None  # (T, h, w) or None
    token_weights: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (T,)
    prompt_saliency: np.ndarray | None = None  # (|question tokens|,)
    settings: dict[str, Any] = field(default_factory=dict)  # the config actually used
    extras: dict[str, Any] = field(default_factory=dict)
    # With ExplainOptions.faithfulness: {"deletion_auc": ..., "insertion_auc": ...}
    faithfulness: dict[str, float] | None = None


@dataclass
class GroundingSummary:
    score: float  # answer-level grounding in [0, 1]; higher = better supported by the image
    flagged: list[int]  # answer-token indices flagged as not supported by the image
    rule: str  # name and version of the rule, so an audit can be reproduced

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "flaggedTokens": list(self.flagged), "rule": self.rule}


@dataclass
class Explanation:
    """The full result for one (image, question, answer)."""

    answer: str
    answer_token_ids: list[int]
    tokens: list[TokenInfo]
    methods: dict[str, MethodOutput]
    question_tokens: list[str]  # texts of the question tokens prompt saliency refers to
    grid: tuple[int, int]  # (h, w) of the visual-token grid
    image_size: tuple[int, int]  # (width, height) of the image as received
    audit_mode: bool
    model_name: str
    model_version: str
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    grounding: GroundingSummary | None = None
    # (left, top, right, bottom) in image pixels: the region the visual-token grid covers (a
    # processor may crop); None = the whole image.
    visual_box: tuple[float, float, float, float] | None = None
    warnings: list[str] = field(default_factory=list)  # for the caller; the request succeeded

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "answerTokenIds": list(self.answer_token_ids),
            "auditMode": self.audit_mode,
            "tokens": [t.to_dict() for t in self.tokens],
            "heatmaps": {name: _map_dict(m) for name, m in self.methods.items()},
            "promptSaliency": self._prompt_saliency(),
            "grid": {"height": self.grid[0], "width": self.grid[1]},
            "imageSize": {"width": self.image_size[0], "height": self.image_size[1]},
            "grounding": self.grounding.to_dict() if self.grounding else None,
            "timings": dict(self.timings),
            "model": {"name": self.model_name, "version": self.model_version},
            "settings": {name: m.settings for name, m in self.methods.items()},
            "visualBox": list(self.visual_box) if self.visual_box else None,
            "warnings": list(self.warnings),
        }

    def _prompt_saliency(self) -> dict[str, list] | None:
        for name, m in self.methods.items():
            if m.prompt_saliency is not None:
                return {"method": name, "tokens": list(self.question_tokens),
                        "weights": [float(v) for v in m.prompt_saliency]}
        return None


def _map_dict(m: MethodOutput) -> dict[str, Any]:
    out: dict[str, Any] = {"values": np.asarray(m.visual_map, dtype=float).round(6).tolist()}
    if m.per_token_maps is not None:
        out["perToken"] = np.asarray(m.per_token_maps, dtype=float).round(6).tolist()
    return out
