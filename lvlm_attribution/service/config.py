"""The handler's settings: the `handler:` section of model-config.yaml, parsed once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServiceConfig:
    model_dir: str = "model_store/tiny-shapes-llava"
    device: str = "cpu"
    dtype: str = "float32"
    default_methods: tuple[str, ...] = ("glimpse", "dexar")
    allowed_methods: tuple[str, ...] | None = None  # None: every method the engine registers
    # LLR per token (one forward of the blurred image per request): the grounding rule needs it.
    # A forward-only tier (e.g. TAM on a large model) may turn it off: no llr, no grounding.
    llr: bool = True
    max_new_tokens_cap: int = 32
    default_max_new_tokens: int = 16  # used when a request leaves max_new_tokens at 0
    max_image_bytes: int = 4_000_000
    max_image_pixels: int = 4_000_000
    max_question_chars: int = 500
    max_answer_chars: int = 500
    max_answer_tokens: int = 64  # an audit answer's tokens (cost of every method grows with it)
    # Width/height or height/width of the image; beyond it resizing is pathological (a 4M x 1
    # image would be resized to gigapixels by a shortest-edge processor).
    max_aspect_ratio: float = 20.0
    max_overlay_side: int = 1024  # overlays are rendered with the longer side at most this
    # Every request ends by this many seconds (DEADLINE_EXCEEDED / HTTP 504) and the worker goes
    # on serving; must stay below TorchServe's responseTimeout, which kills the worker instead.
    request_deadline_s: float = 60.0
    # Encoded responses above this are refused with a 400 naming the options that made them
    # large; must stay below TorchServe's max_response_size (a larger frame kills the worker).
    max_response_bytes: int = 15 * 1024 * 1024
    # Per-method upper bounds overriding the registry's (method -> setting -> max), e.g.
    # {"igos": {"iterations": 10}}.
    method_limits: dict[str, dict[str, float]] | None = None
    # Where the worker journals in-flight requests so a request whose worker died is counted
    # (outcome worker_died) by the next worker; None = $TMPDIR/lvlm-inflight-<model name>.
    inflight_dir: str | None = None

    def __post_init__(self) -> None:
        positive = ("max_new_tokens_cap", "max_image_bytes", "max_image_pixels",
                    "max_question_chars", "max_answer_chars", "max_answer_tokens",
                    "max_aspect_ratio", "max_overlay_side", "request_deadline_s",
                    "max_response_bytes")
        bad = [name for name in positive if not getattr(self, name) > 0]
        if bad:
            raise ValueError(f"handler settings {bad} must be > 0")
        if self.default_max_new_tokens < 1:
            raise ValueError("handler setting default_max_new_tokens must be >= 1")

    def check_server_limits(self, response_timeout_s: float | None) -> None:
        """Refuse settings that would let a request outlive TorchServe's responseTimeout (which
        kills the worker): the deadline must leave room for the last backward and the encoding."""
        if response_timeout_s is not None and self.request_deadline_s > 0.8 * response_timeout_s:
            raise ValueError(f"request_deadline_s {self.request_deadline_s} must be at most 80% "
                             f"of responseTimeout ({response_timeout_s} s)")

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> ServiceConfig:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown handler settings {unknown}; known: {sorted(known)}")
        for key in ("default_methods", "allowed_methods"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def resolve_model_dir(self, *bases: str | Path) -> Path:
        """Absolute model_dir; a relative one is looked up under each base, then the repo root."""
        path = Path(self.model_dir).expanduser()
        if path.is_absolute():
            return path
        for base in (*bases, REPO_ROOT):
            if (Path(base) / path).is_dir():
                return (Path(base) / path).resolve()
        return (REPO_ROOT / path).resolve()
