"""The serving core: request items in, encoded replies out, metrics on the side.

    service = ExplainService(engine, ServiceConfig(...))
    call = service.call(item, transport="grpc", content_type="")
    for reply in call.replies():   # 1 reply, or 2 when the request asks to stream
        ...                        # (answer first, then everything)
    call.observations              # outcome counter + histograms, whatever happened

    calls = [service.call(item, transport) for item in batch]      # TorchServe's batch
    batch_observations = service.serve(calls, on_partial)          # every call ends in
    for call in calls: call.final or call.error                    # a reply or an error

`serve` runs a batch: every item is decoded and validated on its own (a bad item fails only
itself), the valid ones are grouped by their options (methods, settings, per-token maps, max new
tokens: one engine batch per group) and answered and explained in shared passes
(`Explainer.answer` then `Explainer.attribute`); an item the engine refuses is taken out and the
rest of its group runs again. A streamed item's answer goes out through `on_partial` as soon as
its group is answered. A failure that hits a whole group (out of memory, the deadline) fails
every item of it.

`replies()` (one call, a batch of one) raises ServiceError subclasses only: InvalidRequest (400;
ResponseTooLarge is one), OutOfMemory (413), DeadlineExceeded (504), InternalError (500) —
except after a streamed answer has gone out: the caller already has a 200, so a later failure is
the stream's last message (PART_ERROR with the same status and message) instead.

Budgets (ServiceConfig): the request's methods and settings are checked before any model work;
answering and attribution run under a deadline (`lvlm_attribution.deadline`; in a batch, one for
the whole batch: the largest of its items' deadlines) that ends the request, not the worker; the
encoded response is checked against the size budget before it is handed to the transport. Every
call is journaled while in flight (`inflight.py`) so that one whose worker dies is counted by the
next worker.

The engine is duck-typed (lvlm_attribution.engine.Explainer's interface).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..deadline import Deadline
from ..deadline import DeadlineExceeded as EngineDeadlineExceeded
from ..schema import BatchItem
from . import codec
from .config import ServiceConfig
from .describe import describe
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
STREAM_UNAVAILABLE = ("stream: this transport cannot stream (TorchServe's raw gRPC hands the "
                      "handler no way to tell Predictions from StreamPredictions); answered in "
                      "one message. Stream over REST or lvlm.v1.Explainer/ExplainStream")


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
    """One request item through the service: ends with `final` (a reply) or `error`."""

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
    job: Job | None = None
    answer_ids: list[int] | None = None  # audit mode: the given answer, tokenized
    partial_sent: bool = False
    final: Reply | None = None
    error: ServiceError | None = None
    _journal_token: Any = None

    @property
    def stream(self) -> bool:
        return bool(self.job and self.job.stream and self.can_stream)

    def replies(self) -> Iterator[Reply]:
        """This call alone (a batch of one): the streamed answer, if any, then the last reply;
        raises the call's ServiceError when it failed before anything was sent."""
        partials: list[Reply] = []
        self.service.serve([self], lambda _call, reply: partials.append(reply))
        yield from partials
        if self.error is not None and self.final is None:
            raise self.error
        yield self.final

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observations.append(Observation(name, "histogram", float(value), labels))

    # ---- lifecycle (driven by ExplainService.serve) ------------------------------------------
    def _begin(self) -> None:
        self.started = time.perf_counter()
        journal = self.service.journal
        self._journal_token = journal.begin(self.transport) if journal else None

    def _succeed(self, reply: Reply) -> None:
        self.final, self.outcome = reply, "ok"

    def _fail(self, err: BaseException) -> None:
        mapped = err if isinstance(err, ServiceError) else _map_exception(err)
        self.error, self.outcome = mapped, mapped.outcome
        if self.partial_sent:  # the stream's 200 is already out: its last message says it
            self.final = self.service.error_reply(self, mapped)

    def _finish(self) -> None:
        self.timings["total"] = time.perf_counter() - self.started
        for stage, seconds in self.timings.items():
            method = stage if stage in self.service.methods else NO_METHOD
            self.observe("lvlm_stage_latency_seconds", seconds,
                         stage="attribute" if method != NO_METHOD else stage, method=method,
                         transport=self.transport)
        self.observations.append(outcome_observation(self.outcome, self.transport))
        if self.service.journal:
            self.service.journal.end(self._journal_token)


def outcome_observation(outcome: str, transport: str) -> Observation:
    """The one `lvlm_requests_total` sample every request gets."""
    return Observation("lvlm_requests_total", "counter", 1.0,
                       {"outcome": outcome, "transport": transport})


PartialSink = Callable[[Call, Reply], None]


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

    def describe_reply(self) -> Reply:
        msg = describe(self.engine, self.config, self.methods)
        return Reply(msg.SerializeToString(), codec.PROTOBUF, final=True)

    def item_error(self, call: Call) -> tuple[int | None, Reply]:
        """(status, reply) for a failed item of a batch of several, where TorchServe takes a
        status per item: REST gets the status and TorchServe's own error JSON (out of memory as
        507, as TorchServe answers it for a whole batch); gRPC (status None: TorchServe's gRPC
        sends every item of a batch as OK) gets a PART_ERROR ExplainResponse that says it."""
        err = call.error
        if call.transport == "grpc":
            return None, self.error_reply(call, err)
        status = 507 if err.status == 413 else err.status
        body = json.dumps({"code": status, "type": type(err).__name__, "message": err.message})
        return status, Reply(body.encode(), codec.JSON, final=True)

    def error_reply(self, call: Call, err: ServiceError) -> Reply:
        msg = error_response(call.request_id, err)
        return Reply(codec.encode(msg, call.wire), call.wire, final=True)

    # ---- a batch --------------------------------------------------------------------------------
    def serve(self, calls: Sequence[Call], on_partial: PartialSink | None = None
              ) -> list[Observation]:
        """Serve `calls` as one batch (see the module docstring). Returns the batch's own
        observations (`lvlm_batch_size`); each call carries its own."""
        requests = []
        for call in calls:
            if codec.is_describe(call.item):  # the gateway asking what is served: no request
                call.final, call.outcome = self.describe_reply(), "describe"
            else:
                requests.append(call)
        for call in requests:
            call._begin()
        try:
            valid = [c for c in requests if self._decode(c)]
            # One deadline for the whole batch (the largest its items ask for, never above the
            # server's): groups run one after the other and must all end before TorchServe's
            # responseTimeout, which is per batch.
            deadline = Deadline(max((c.job.deadline_s for c in valid), default=1.0))
            for group in _groups(valid):
                self._serve_group(group, deadline, on_partial or (lambda _c, _r: None))
        finally:
            for call in requests:
                call._finish()
        return [Observation("lvlm_batch_size", "histogram", float(len(requests)), {})
                ] if requests else []

    def _decode(self, call: Call) -> bool:
        try:
            with _timed(call.timings, "decode"):
                decoded = codec.decode(call.item, call.content_type)
                call.wire, call.request_id = decoded.wire, decoded.request.request_id
                job = validate(decoded.request, self.config, self.methods)
                self.engine.check_options(job.options)  # method settings: types, cost limits
            call.job = job
            call.answer_ids = self._answer_ids(job.answer) if job.answer is not None else None
        except Exception as err:
            call._fail(err)
            return False
        return True

    def _serve_group(self, group: list[Call], deadline: Deadline,
                     on_partial: PartialSink) -> None:
        """One engine batch: every call here has the same options."""
        options = group[0].job.options
        try:
            group, answered = self._answer(group, deadline)
            for call, one in zip(group, answered, strict=True):
                if call.stream:
                    on_partial(call, self._answer_reply(call, one.ids))
                    call.partial_sent = True
            explanations = self.engine.attribute(answered, options, deadline)
        except Exception as err:  # shared passes: the failure is every call's
            for call in group:
                call._fail(err)
            return
        for call, expl in zip(group, explanations, strict=True):
            try:
                call._succeed(self._encode(call, expl, deadline))
            except Exception as err:
                call._fail(err)

    def _answer(self, group: list[Call], deadline: Deadline) -> tuple[list[Call], list[Any]]:
        """engine.answer for the group; an item the engine refuses (InvalidInput naming
        items[i]) fails alone and the others are answered again without it."""
        while group:
            items = [BatchItem(c.job.image, c.job.question, answer_token_ids=c.answer_ids)
                     for c in group]
            try:
                answered = self.engine.answer(items, group[0].job.options, deadline)
            except ValueError as err:
                index, field_name = _item_of(getattr(err, "field", None), len(group))
                if index is None:
                    raise
                group[index]._fail(InvalidRequest(field_name, err.message))
                group = group[:index] + group[index + 1:]
                continue
            for call in group:
                call.timings.update(answered[0].timings)
            return group, answered
        return [], []

    def _encode(self, call: Call, expl: Any, deadline: Deadline) -> Reply:
        job = call.job
        audit = job.answer is not None
        with _timed(call.timings, "encode"):  # heatmaps and message; serializing is ~free
            deadline.check("encode")
            msg = full_response(job, expl, audit)
            if job.stream and not call.can_stream:
                msg.warnings.append(STREAM_UNAVAILABLE)
            if job.stream:  # the last (here perhaps the only) message of a stream
                msg.part = msg.PART_COMPLETE
        call.timings.update({k: v for k, v in expl.timings.items() if k not in call.timings})
        msg.timings.update(call.timings)
        msg.timings["total"] = time.perf_counter() - call.started
        body = codec.encode(msg, call.wire)
        self._check_size(len(body), job)
        call.observe("lvlm_answer_tokens", len(expl.tokens))
        call.observe("lvlm_visual_tokens", expl.grid[0] * expl.grid[1])
        if expl.grounding is not None:
            call.observe("lvlm_grounding_score", expl.grounding.score)
        return Reply(body, call.wire, final=True)

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

    def _answer_reply(self, call: Call, ids: list[int]) -> Reply:
        job = call.job
        audit = job.answer is not None
        answer = job.answer if audit else self.engine.decode(ids)
        texts = [self.engine.decode([i]) for i in ids]
        model = (self.engine.model_name, self.engine.model_version)
        msg = answer_part(job, answer or "", ids, texts, audit, model)
        return Reply(codec.encode(msg, call.wire), call.wire, final=False)


def _groups(calls: Sequence[Call]) -> list[list[Call]]:
    """Calls whose options are equal, in arrival order (one engine batch each)."""
    groups: dict[str, list[Call]] = {}
    for call in calls:
        opts = call.job.options
        key = json.dumps([opts.methods, opts.max_new_tokens, opts.per_token_maps, opts.llr,
                          opts.faithfulness,
                          opts.method_settings, opts.setting_limits], sort_keys=True, default=str)
        groups.setdefault(key, []).append(call)
    return list(groups.values())


def _item_of(field_name: str | None, n: int) -> tuple[int | None, str]:
    """(i, field) of an engine field "items[i].field" (or the only item's "field")."""
    if not field_name:
        return None, ""
    if field_name.startswith("items["):
        index, _, rest = field_name[len("items["):].partition("].")
        return (int(index), rest) if index.isdigit() and int(index) < n else (None, "")
    return (0, field_name) if n == 1 else (None, "")


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
