"""The serving core: one request item in, one or two encoded replies out, metrics on the side.

    service = ExplainService(engine, ServiceConfig(...))
    call = service.call(item, transport="grpc", content_type="")
    for reply in call.replies():   # 1 reply, or 2 when the request asks to stream
        ...                        # (answer first, then everything)
    call.observations              # outcome counter + histograms, whatever happened

`replies()` raises ServiceError subclasses only: InvalidRequest (400), OutOfMemory (413),
InternalError (500). The engine is duck-typed (lvlm_attribution.engine.Explainer's interface).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import codec
from .config import ServiceConfig
from .errors import InternalError, InvalidRequest, OutOfMemory, ServiceError
from .response import answer_part, full_response
from .validation import Job, validate

log = logging.getLogger(__name__)
NO_METHOD = "-"  # `method` label of stages that are not a method


@dataclass(frozen=True)
class Reply:
    body: bytes
    content_type: str
    final: bool


@dataclass(frozen=True)
class Observation:
    """One metric sample. Labels never hold request ids or text."""

    name: str
    kind: str  # "counter" | "histogram"
    value: float
    labels: dict[str, str]


@dataclass
class Call:
    service: ExplainService
    item: Any
    transport: str
    content_type: str = ""
    outcome: str = "error"
    observations: list[Observation] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = 0.0

    def replies(self) -> Iterator[Reply]:
        self.started = start = time.perf_counter()
        try:
            yield from self.service._run(self)
            self.outcome = "ok"
        except ServiceError as err:
            self.outcome = err.outcome
            raise
        except Exception as err:
            mapped = _map_exception(err)
            self.outcome = mapped.outcome
            raise mapped from err
        finally:
            self.timings["total"] = time.perf_counter() - start
            self._observe_outcome()

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observations.append(Observation(name, "histogram", float(value), labels))

    def _observe_outcome(self) -> None:
        for stage, seconds in self.timings.items():
            method = stage if stage in self.service.methods else NO_METHOD
            self.observe("lvlm_stage_latency_seconds", seconds,
                         stage="attribute" if method != NO_METHOD else stage, method=method,
                         transport=self.transport)
        self.observations.append(Observation("lvlm_requests_total", "counter", 1.0,
                                             {"outcome": self.outcome,
                                              "transport": self.transport}))


class ExplainService:
    def __init__(self, engine: Any, config: ServiceConfig) -> None:
        self.engine = engine
        self.config = config
        self.methods = tuple(engine.available_methods())

    def call(self, item: Any, transport: str, content_type: str = "") -> Call:
        return Call(self, item, transport, content_type)

    def _run(self, call: Call) -> Iterator[Reply]:
        with _timed(call.timings, "decode"):
            decoded = codec.decode(call.item, call.content_type)
            job = validate(decoded.request, self.config, self.methods)
        audit = job.answer is not None
        ids: list[int] | None = None
        if not audit:
            with _timed(call.timings, "generate"):
                ids = self.engine.generate(job.image, job.question, job.options.max_new_tokens)
            if not ids:
                raise InvalidRequest("question", "the model produced an empty answer; nothing "
                                     "to explain")
        if job.stream:
            yield self._answer_reply(job, ids, audit, decoded.wire)
        expl = self.engine.explain(job.image, job.question, answer=job.answer,
                                   answer_token_ids=ids, options=job.options)
        call.timings.update({k: v for k, v in expl.timings.items() if k not in call.timings})
        with _timed(call.timings, "encode"):  # heatmaps and message; serializing is ~free
            msg = full_response(job, expl, audit)
            if job.stream:
                msg.part = msg.PART_COMPLETE
        msg.timings.update(call.timings)
        msg.timings["total"] = time.perf_counter() - call.started
        body = codec.encode(msg, decoded.wire)
        call.observe("lvlm_answer_tokens", len(expl.tokens))
        call.observe("lvlm_visual_tokens", expl.grid[0] * expl.grid[1])
        if expl.grounding is not None:
            call.observe("lvlm_grounding_score", expl.grounding.score)
        yield Reply(body, decoded.wire, final=True)

    def _answer_reply(self, job: Job, ids: list[int] | None, audit: bool, wire: str) -> Reply:
        if ids is None:  # audit mode: the answer is the caller's
            answer, ids = job.answer or "", self.engine.encode_answer(job.answer)
        else:
            answer = self.engine.decode(ids)
        texts = [self.engine.decode([i]) for i in ids]
        model = (self.engine.model_name, self.engine.model_version)
        return Reply(codec.encode(answer_part(job, answer, ids, texts, audit, model), wire),
                     wire, final=False)


def _map_exception(err: Exception) -> ServiceError:
    """Engine exceptions -> service errors. Out-of-memory frees what it can so the worker lives."""
    if isinstance(err, ValueError) and hasattr(err, "field"):  # engine.InvalidInput
        return InvalidRequest(err.field, getattr(err, "message", str(err)))
    if _is_oom(err):
        gc.collect()
        _empty_device_cache()
        log.warning("out of memory: %s", err)
        return OutOfMemory(f"out of memory while serving this request ({type(err).__name__}); "
                           "retry with fewer methods, fewer max_new_tokens or no per-token maps")
    log.exception("request failed")
    return InternalError(f"internal error ({type(err).__name__}); see the server log")


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def _empty_device_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # never let cleanup hide the original error
        log.debug("could not empty the CUDA cache", exc_info=True)


class _timed:
    def __init__(self, timings: dict[str, float], stage: str) -> None:
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.stage] = time.perf_counter() - self.start
