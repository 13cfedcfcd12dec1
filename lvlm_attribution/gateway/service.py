"""lvlm.v1.Explainer: Explain, ExplainStream and Describe over TorchServe (`upstream.TorchServe`).

Per call: the caller's deadline becomes the upstream timeout and ExplainRequest.timeout_ms (the
remaining time minus a margin, so the handler's own DEADLINE_EXCEEDED, with its message, arrives
before the caller gives up); a busy refusal is asked again for a short while within that
deadline; failures are aborted with a google.rpc.Status (errors.Failure.to_status); each call is
timed into the metrics by RPC and status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from ..api.v1 import explain_pb2 as pb
from ..api.v1 import explainer_pb2 as api
from ..api.v1 import explainer_pb2_grpc
from .errors import Failure, from_part_error
from .metrics import Metrics
from .upstream import TorchServe

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    busy_retry_s: float = 2.0  # how long a busy refusal is asked again (0: never)
    deadline_margin_s: float = 0.05  # left to the reply's way back when the caller has a deadline
    upstream_timeout_s: float = 150.0  # when the caller sets no deadline (> responseTimeout)
    max_request_bytes: int = 8 * 1024 * 1024 - 4096  # reported by Describe


class Budget:
    """The time a call may take: the caller's deadline, or `Limits.upstream_timeout_s`."""

    def __init__(self, remaining_s: float | None, limits: Limits) -> None:
        self.caller_deadline = remaining_s is not None
        self.end = time.monotonic() + (remaining_s if remaining_s is not None
                                       else limits.upstream_timeout_s)
        self.margin = limits.deadline_margin_s if self.caller_deadline else 0.0

    def left(self) -> float:
        return self.end - time.monotonic()

    def bounded(self, request: pb.ExplainRequest, stream: bool) -> pb.ExplainRequest:
        """The request to forward: timeout_ms no longer than the time left (minus the margin).
        Raises DEADLINE_EXCEEDED when nothing is left."""
        usable_ms = int((self.left() - self.margin) * 1000)
        if usable_ms < 1:
            raise Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline leaves no "
                          "time for the request")
        out = pb.ExplainRequest()
        out.CopyFrom(request)
        out.stream = stream
        if self.caller_deadline:
            out.timeout_ms = min(request.timeout_ms or usable_ms, usable_ms)
        return out


class ExplainerService(explainer_pb2_grpc.ExplainerServicer):
    def __init__(self, upstream: TorchServe, metrics: Metrics, limits: Limits) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.limits = limits
        self._described: api.DescribeResponse | None = None
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- RPCs ----------------------------------------------------------------------------------
    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ExplainResponse:
        async with self._call("Explain", context) as budget:
            # A unary call is one message whatever `stream` says; ExplainStream streams.
            response = await self._retrying_busy("Explain", budget, lambda: self.upstream.explain(
                budget.bounded(request, stream=False), budget.left()))
            if request.stream:
                response.warnings.append("stream: Explain answers in one message; call "
                                         "ExplainStream for the answer first")
            if response.part == pb.ExplainResponse.PART_ERROR:
                # An item of a TorchServe batch failed: its gRPC reply is OK, the body says why.
                raise from_part_error(response.error)
            self._check_version(response.model)
            return response

    async def ExplainStream(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.ExplainResponse]:
        async with self._call("ExplainStream", context) as budget:
            started = time.monotonic()
            stream = await self._retrying_busy("ExplainStream", budget, lambda: (
                self.upstream.open_stream(budget.bounded(request, stream=True), budget.left())))
            try:
                last = None
                async for part in stream:
                    if part.part == pb.ExplainResponse.PART_ERROR:  # failed after the answer
                        raise from_part_error(part.error)
                    if part.part == pb.ExplainResponse.PART_ANSWER:
                        self.metrics.first_message.observe(time.monotonic() - started)
                    self._check_version(part.model)
                    last = part.part
                    yield part
                if last != pb.ExplainResponse.PART_COMPLETE:
                    raise Failure(grpc.StatusCode.INTERNAL, "the stream from TorchServe ended "
                                  "before PART_COMPLETE; its log has the cause")
            finally:
                stream.close()

    async def Describe(self, request: api.DescribeRequest, context: grpc.aio.ServicerContext
                       ) -> api.DescribeResponse:
        async with self._call("Describe", context) as budget:
            return await self.described(budget)

    # ---- the served model's description, cached -----------------------------------------------
    async def described(self, budget: Budget | None = None) -> api.DescribeResponse:
        """Asked of the handler once, then cached until the model's version changes."""
        if self._described is None:
            budget = budget or Budget(None, self.limits)
            msg = await self._retrying_busy("Describe", budget,
                                            lambda: self.upstream.describe(budget.left()))
            msg.limits.max_request_bytes = self.limits.max_request_bytes
            self._described = msg
        return self._described

    def forget_description(self) -> None:
        """A new worker may serve other weights (health went back to SERVING)."""
        self._described = None

    def _check_version(self, model: pb.ModelInfo) -> None:
        cached = self._described
        if cached is not None and model.version and model.version != cached.model.version:
            log.info("model version %s -> %s: Describe will ask again", cached.model.version,
                     model.version)
            self._described = None

    # ---- shutdown --------------------------------------------------------------------------------
    async def wait_idle(self) -> None:
        await self._idle.wait()

    # ---- helpers -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _call(self, rpc: str, context: grpc.aio.ServicerContext) -> AsyncIterator[Budget]:
        """Times the call by status code, counts it in flight, and turns a Failure into the
        call's status."""
        started, code = time.perf_counter(), "OK"
        self._enter(rpc)
        try:
            yield Budget(context.time_remaining(), self.limits)
        except Failure as failure:
            code = failure.code.name
            log.info("%s failed: %s", rpc, failure)
            await context.abort_with_status(failure.to_status())
        except (asyncio.CancelledError, GeneratorExit):  # the caller left or its deadline passed
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("%s: unexpected error", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the gateway; "
                                "see its log")
        finally:
            self.metrics.observe(rpc, code, time.perf_counter() - started)
            self._leave(rpc)

    def _enter(self, rpc: str) -> None:
        self._active += 1
        self._idle.clear()
        self.metrics.in_flight.labels(rpc=rpc).inc()

    def _leave(self, rpc: str) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()
        self.metrics.in_flight.labels(rpc=rpc).dec()

    async def _retrying_busy(self, rpc: str, budget: Budget,
                             attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, asked again while TorchServe refuses it as busy, with jittered backoff,
        for at most Limits.busy_retry_s and never past the call's deadline."""
        give_up = min(time.monotonic() + self.limits.busy_retry_s, budget.end - budget.margin)
        delay = 0.02  # a ticket is often free again within milliseconds (back-to-back requests)
        while True:
            try:
                return await attempt()
            except Failure as failure:
                if not failure.busy or time.monotonic() + delay > give_up:
                    raise
            self.metrics.busy_retries.labels(rpc=rpc).inc()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 0.25)
