"""The serving core: one request item in, one or two encoded replies out, metrics on the side.

    service = ExplainService(engine, ServiceConfig(...))
    call = service.call(item, transport="grpc", content_type="")
    for reply in call.replies():   # 1 reply, or 2 when the request asks to stream
        ...                        # (answer first, then everything)
    call.observations              # outcome counter + histograms, whatever happened

`replies()` raises ServiceError subclasses only: InvalidRequest (400; ResponseTooLarge is one),
OutOfMemory (413), DeadlineExceeded (504), InternalError (500) — except after a streamed answer
has gone out: the caller already has a 200, so a later failure is the stream's last message
(PART_ERROR with the same status and message) instead.

Budgets (ServiceConfig): the request's methods and settings are checked before any model work;
generation and attribution run under a deadline (`lvlm_attribution.deadline`) that ends the
request, not the worker; the encoded response is checked against the size budget before it is
handed to the transport. Every call is journaled while in flight (`inflight.py`) so that one
whose worker dies is counted by the next worker.

The engine is duck-typed (lvlm_attribution.engine.Explainer's interface).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..deadline import Deadline
from ..deadline import DeadlineExceeded as EngineDeadlineExceeded
from . import codec
from .config import ServiceConfig
from .errors import (
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    OutOfMemory,
    ResponseTooLarge,
    ServiceError,
)
from .inflight import InflightJournal
from .response import answer_part, error_response, full_response
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


STREAM_UNAVAILABLE = ("stream: this transport cannot stream (TorchServe's raw gRPC hands the "
                      "handler no way to tell Predictions from StreamPredictions); answered in "
                      "one message. Stream over REST or lvlm.v1.Explainer/ExplainStream")


@dataclass
class Call:
    service: ExplainService
    item: Any
    transport: str
    content_type: str = ""
    can_stream: bool = True  # False where the transport cannot take intermediate replies
    outcome: str = "error"
    observations: list[Observation] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    wire: str = codec.JSON  # the encoding replies use, once the request has been decoded
    request_id: str = ""
    partial_sent: bool = False

    def replies(self) -> Iterator[Reply]:
        self.started = start = time.perf_counter()
        token = self.service.journal.begin(self.transport) if self.service.journal else None
        try:
            for reply in self._guarded():
                self.partial_sent = self.partial_sent or not reply.final
                yield reply
        finally:
            self.timings["total"] = time.perf_counter() - start
            self._observe_outcome()
            if self.service.journal:
                self.service.journal.end(token)

    def _guarded(self) -> Iterator[Reply]:
        try:
            yield from self.service._run(self)
            self.outcome = "ok"
        except Exception as err:
            mapped = err if isinstance(err, ServiceError) else _map_exception(err)
            self.outcome = mapped.outcome
            if not self.partial_sent:
                raise mapped from (None if mapped is err else err)
            yield self.service.error_reply(self, mapped)  # the stream's 200 is already out

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observations.append(Observation(name, "histogram", float(value), labels))

    def _observe_outcome(self) -> None:
        for stage, seconds in self.timings.items():
            method = stage if stage in self.service.methods else NO_METHOD
            self.observe("lvlm_stage_latency_seconds", seconds,
                         stage="attribute" if method != NO_METHOD else stage, method=method,
                         transport=self.transport)
        self.observations.append(outcome_observation(self.outcome, self.transport))


def outcome_observation(outcome: str, transport: str) -> Observation:
    """The one `lvlm_requests_total` sample every request gets."""
    return Observation("lvlm_requests_total", "counter", 1.0,
                       {"outcome": outcome, "transport": transport})


class ExplainService:
    def __init__(self, engine: Any, config: ServiceConfig,
                 journal: InflightJournal | None = None) -> None:
        self.engine = engine
        self.config = config
        self.methods = tuple(engine.available_methods())
        self.journal = journal

    def call(self, item: Any, transport: str, content_type: str = "",
             can_stream: bool = True) -> Call:
        return Call(self, item, transport, content_type, can_stream)

    def recovered_observations(self) -> list[Observation]:
        """At start-up: one worker_died outcome per request a dead worker left unanswered."""
        died = self.journal.recover() if self.journal else []
        return [outcome_observation("worker_died", transport) for transport in died]

    def error_reply(self, call: Call, err: ServiceError) -> Reply:
        msg = error_response(call.request_id, err)
        return Reply(codec.encode(msg, call.wire), call.wire, final=True)

    def _run(self, call: Call) -> Iterator[Reply]:
        with _timed(call.timings, "decode"):
            decoded = codec.decode(call.item, call.content_type)
            call.wire = decoded.wire
            call.request_id = decoded.request.request_id
            job = validate(decoded.request, self.config, self.methods)
            self.engine.check_options(job.options)  # method settings: types and cost limits
        deadline = Deadline(job.deadline_s)
        stream = job.stream and call.can_stream
        warnings = [STREAM_UNAVAILABLE] if job.stream and not stream else []
        audit = job.answer is not None
        if audit:
            ids = self._answer_ids(job.answer)
        else:
            with _timed(call.timings, "generate"):
                ids = self.engine.generate(job.image, job.question, job.options.max_new_tokens,
                                           deadline=deadline)
            if not ids:
                raise InvalidRequest("question", "the model produced an empty answer; nothing "
                                     "to explain")
        if stream:
            yield self._answer_reply(job, ids, audit, decoded.wire)
        expl = self.engine.explain(job.image, job.question, answer_token_ids=ids,
                                   options=job.options, deadline=deadline)
        call.timings.update({k: v for k, v in expl.timings.items() if k not in call.timings})
        with _timed(call.timings, "encode"):  # heatmaps and message; serializing is ~free
            deadline.check("encode")
            msg = full_response(job, expl, audit)
            msg.warnings.extend(warnings)
            if job.stream:  # the last (here perhaps the only) message of a stream
                msg.part = msg.PART_COMPLETE
        msg.timings.update(call.timings)
        msg.timings["total"] = time.perf_counter() - call.started
        body = codec.encode(msg, decoded.wire)
        self._check_size(len(body), job)
        call.observe("lvlm_answer_tokens", len(expl.tokens))
        call.observe("lvlm_visual_tokens", expl.grid[0] * expl.grid[1])
        if expl.grounding is not None:
            call.observe("lvlm_grounding_score", expl.grounding.score)
        yield Reply(body, decoded.wire, final=True)

    def _answer_ids(self, answer: str) -> list[int]:
        ids = self.engine.encode_answer(answer)
        limit = self.config.max_answer_tokens
        if len(ids) > limit:
            raise InvalidRequest("answer", f"{len(ids)} tokens exceeds the limit of {limit} "
                                 "tokens (every method's cost grows with the answer's length)")
        return ids

    def _check_size(self, size: int, job: Job) -> None:
        limit = self.config.max_response_bytes
        if size <= limit:
            return
        culprit = ("heatmaps.overlay" if job.overlay else
                   "heatmaps.per_token_maps" if job.options.per_token_maps else "methods")
        remedy = "ask for fewer methods" if culprit == "methods" else f"ask without {culprit}"
        raise ResponseTooLarge(culprit, f"the response would be {_size(size)}, over the limit "
                               f"of {_size(limit)}; {remedy}")

    def _answer_reply(self, job: Job, ids: list[int], audit: bool, wire: str) -> Reply:
        answer = job.answer if audit else self.engine.decode(ids)
        texts = [self.engine.decode([i]) for i in ids]
        model = (self.engine.model_name, self.engine.model_version)
        return Reply(codec.encode(answer_part(job, answer or "", ids, texts, audit, model), wire),
                     wire, final=False)


def _map_exception(err: Exception) -> ServiceError:
    """Engine exceptions -> service errors. Out-of-memory frees what it can so the worker lives."""
    if isinstance(err, ValueError) and hasattr(err, "field"):  # engine.InvalidInput
        return InvalidRequest(err.field, getattr(err, "message", str(err)))
    if isinstance(err, EngineDeadlineExceeded):
        gc.collect()
        _empty_device_cache()
        return DeadlineExceeded(f"{err}; ask for fewer methods, fewer answer tokens or cheaper "
                                "method settings, or a larger timeout_ms within the server's "
                                "budget")
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


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


class _timed:
    def __init__(self, timings: dict[str, float], stage: str) -> None:
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.stage] = time.perf_counter() - self.start
