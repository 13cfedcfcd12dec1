"""The per-item audit record: what both backends (local Explainer, remote service) return.

Keeping one transport-free record means the pictures, the HTML and the summary never know where an
explanation came from. Maps are kept as float32 (h, w) arrays at the patch grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Tokens that carry no claim about the image; the proxy score ignores them. Lower-case, without
# the tokenizer's word-boundary markers.
STOP_WORDS = frozenset({
    "the", "a", "an", "is", "are", "was", "were", "be", "at", "of", "in", "on", "to", "and",
    "or", "there", "it", "its", "this", "that", "these", "those", "with", "as", "by", "for",
})
PROXY_RULE = "proxy:min-llr-content@1"
PROXY_FLAG_LLR = 0.0  # the proxy flags a content token whose LLR is below this (nats)


def clean_token(text: str) -> str:
    """A tokenizer piece as a reader sees it (BPE/SentencePiece word markers become spaces)."""
    return text.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n")


def is_content(text: str) -> bool:
    word = clean_token(text).strip().lower()
    return bool(word) and any(ch.isalnum() for ch in word) and word not in STOP_WORDS


@dataclass
class TokenRecord:
    index: int
    text: str
    probability: float
    llr: float | None
    weights: dict[str, float]
    grounded: bool | None  # from the service / engine grounding rule; None when not evaluated

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "probability": self.probability,
                "llr": self.llr, "weights": dict(self.weights), "grounded": self.grounded}


@dataclass
class Grounding:
    score: float
    flagged: list[int]
    rule: str


@dataclass
class ItemRecord:
    """Everything the report needs for one explained answer."""

    answer: str
    tokens: list[TokenRecord]
    maps: dict[str, np.ndarray]  # method -> (h, w), in request order
    prompt_saliency: tuple[str, list[str], list[float]] | None  # (method, tokens, weights)
    grounding: Grounding | None
    model_name: str
    model_version: str
    settings: dict[str, dict[str, Any]]
    timings: dict[str, float]  # stage -> seconds, as reported by the engine / service
    backend: str  # "local" or the service URL
    image_size: tuple[int, int] = (0, 0)
    # (left, top, right, bottom) in image pixels: the region the maps cover (the model's
    # processor may crop); None = the whole image.
    visual_box: tuple[float, float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- the score the audit ranks by -----------------------------------------------------
    def proxy_score(self) -> float | None:
        """Minimum LLR over content (non-stop-word) tokens; None when no token has an LLR."""
        values = [t.llr for t in self.tokens if t.llr is not None and is_content(t.text)]
        if not values:
            values = [t.llr for t in self.tokens if t.llr is not None]
        return min(values) if values else None

    def min_logprob(self) -> float | None:
        """A second reference signal (not a grounding score): the minimum ln p(token | image,
        question, earlier tokens) over content tokens."""
        values = [math.log(max(t.probability, 1e-30)) for t in self.tokens if is_content(t.text)]
        values = values or [math.log(max(t.probability, 1e-30)) for t in self.tokens]
        return min(values) if values else None

    def score(self) -> tuple[float | None, str]:
        """(score, source): the service's grounding score when present, else the proxy."""
        if self.grounding is not None:
            return float(self.grounding.score), f"grounding:{self.grounding.rule}"
        return self.proxy_score(), PROXY_RULE

    def flagged(self) -> tuple[list[int], str]:
        """Indices of tokens flagged as not supported by the image, and by which rule."""
        if self.grounding is not None:
            flagged = set(self.grounding.flagged)
            flagged |= {t.index for t in self.tokens if t.grounded is False}
            return sorted(flagged), f"grounding:{self.grounding.rule}"
        if any(t.grounded is not None for t in self.tokens):
            return [t.index for t in self.tokens if t.grounded is False], "token.grounded"
        return ([t.index for t in self.tokens if t.llr is not None and is_content(t.text)
                 and t.llr < PROXY_FLAG_LLR], f"{PROXY_RULE} (content token with LLR < 0)")

    def method_timings(self) -> dict[str, float]:
        return {name: float(self.timings[name]) for name in self.maps if name in self.timings}

    def to_dict(self) -> dict[str, Any]:
        score, source = self.score()
        flagged, flag_rule = self.flagged()
        return {
            "answer": self.answer,
            "tokens": [t.to_dict() for t in self.tokens],
            "maps": {k: np.asarray(v, dtype=float).round(6).tolist() for k, v in self.maps.items()},
            "promptSaliency": None if self.prompt_saliency is None else {
                "method": self.prompt_saliency[0], "tokens": list(self.prompt_saliency[1]),
                "weights": [float(w) for w in self.prompt_saliency[2]]},
            "grounding": None if self.grounding is None else {
                "score": self.grounding.score, "flaggedTokens": list(self.grounding.flagged),
                "rule": self.grounding.rule},
            "score": score, "scoreSource": source, "proxyScore": self.proxy_score(),
            "minLogprob": self.min_logprob(),
            "flagged": flagged, "flagRule": flag_rule,
            "model": {"name": self.model_name, "version": self.model_version},
            "settings": self.settings, "timings": dict(self.timings), "backend": self.backend,
            "imageSize": list(self.image_size),
            "visualBox": None if self.visual_box is None else list(self.visual_box),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ItemRecord:
        ps = d.get("promptSaliency")
        g = d.get("grounding")
        return cls(
            answer=d["answer"],
            tokens=[TokenRecord(t["index"], t["text"], t["probability"], t.get("llr"),
                                dict(t.get("weights", {})), t.get("grounded"))
                    for t in d["tokens"]],
            maps={k: np.asarray(v, dtype=np.float32) for k, v in d["maps"].items()},
            prompt_saliency=None if ps is None else (ps["method"], ps["tokens"], ps["weights"]),
            grounding=None if g is None else Grounding(g["score"], list(g["flaggedTokens"]),
                                                       g["rule"]),
            model_name=d["model"]["name"], model_version=d["model"]["version"],
            settings=d.get("settings", {}), timings=d.get("timings", {}),
            backend=d.get("backend", ""), image_size=tuple(d.get("imageSize", (0, 0))),
            visual_box=None if d.get("visualBox") is None else tuple(d["visualBox"]),
        )
