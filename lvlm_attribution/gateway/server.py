"""The gateway's gRPC server: lvlm.v1.Explainer + grpc.health.v1 + reflection, health polling,
metrics, graceful shutdown.

Health: grpc.health.v1 says SERVING for "" and "lvlm.v1.Explainer" only while the model has a live
READY worker (`lvlm_attribution.health.check`, polled every `health_interval_s`), NOT_SERVING
otherwise; the service "liveness" is SERVING while this process answers (Kubernetes' liveness
probe: a dead model worker is TorchServe's container's business, not a reason to restart this
one).

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING at once (readiness fails, Watch callers are
told), new calls are still accepted for `drain_delay_s` (while Kubernetes removes the endpoint),
then the server stops accepting and waits up to `grace_s` for the Explainer calls in flight;
whatever is left then (Watch streams, calls past the grace) is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .. import health
from ..api.v1 import explainer_pb2, explainer_pb2_grpc
from .metrics import Metrics
from .service import ExplainerService, Limits
from .upstream import TorchServe

log = logging.getLogger(__name__)
SERVICE = explainer_pb2.DESCRIPTOR.services_by_name["Explainer"].full_name  # lvlm.v1.Explainer
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # above TorchServe's max_response_size (16 MiB here)


@dataclass(frozen=True)
class GatewayConfig:
    torchserve_grpc: str = "127.0.0.1:7070"
    torchserve_rest: str = "http://127.0.0.1:8080"
    management: str = "http://127.0.0.1:8081"
    model: str = "lvlm"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9095  # 0: no metrics endpoint
    health_interval_s: float = 1.0
    check_pid: bool = True
    drain_delay_s: float = 0.0
    grace_s: float = 30.0
    max_response_bytes: int = MAX_RESPONSE_BYTES
    limits: Limits = field(default_factory=Limits)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.health = HealthServicer()
        limits = config.limits
        self.upstream = TorchServe(config.torchserve_grpc, config.torchserve_rest, config.model,
                                   max_send_bytes=limits.max_request_bytes + 4096,
                                   max_receive_bytes=config.max_response_bytes)
        self.service = ExplainerService(self.upstream, self.metrics, limits)
        self.server = grpc.aio.server(options=[
            # A request over TorchServe's max_request_size would be reset by its frontend
            # (CANCELLED); refused here instead, with RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_send_message_length", config.max_response_bytes)])
        explainer_pb2_grpc.add_ExplainerServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        self._poller: asyncio.Task | None = None
        self._serving: int | None = None

    async def start(self) -> None:
        await self.health.set("", NOT_SERVING)  # until the first check says otherwise
        await self.health.set(SERVICE, NOT_SERVING)
        await self.health.set(LIVENESS, SERVING)
        await self.server.start()
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        self._poller = asyncio.create_task(self._poll_health())
        log.info("lvlm.v1.Explainer on %s:%d -> TorchServe gRPC %s, REST %s (model %s)",
                 self.config.host, self.port, self.config.torchserve_grpc,
                 self.config.torchserve_rest, self.config.model)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()
        if self.config.drain_delay_s > 0:
            log.info("draining: still accepting calls for %.0f s", self.config.drain_delay_s)
            await asyncio.sleep(self.config.drain_delay_s)
        # Stop accepting; the calls in flight get up to grace_s. Health Watch streams never end
        # by themselves, so once the Explainer calls are done the rest is cancelled at once.
        stopping = asyncio.create_task(self.server.stop(self.config.grace_s))
        try:
            await asyncio.wait_for(self.service.wait_idle(), self.config.grace_s)
        except TimeoutError:
            log.warning("calls still running after the %.0f s grace period: cancelled",
                        self.config.grace_s)
        await self.server.stop(0)
        await stopping
        await self.upstream.close()
        self.metrics.close()
        log.info("stopped")

    async def _poll_health(self) -> None:
        while True:
            try:
                state = await asyncio.to_thread(
                    health.check, self.config.management, self.config.model,
                    timeout=max(self.config.health_interval_s, 1.0),
                    check_pid=self.config.check_pid)
                await self._set_serving(SERVING if state.ok else NOT_SERVING, state.reason)
            except Exception:  # a bug here must not leave a stale SERVING behind
                log.exception("health check failed")
                await self._set_serving(NOT_SERVING, "health check failed")
            await asyncio.sleep(self.config.health_interval_s)

    async def _set_serving(self, status: int, reason: str) -> None:
        if status == self._serving:
            return
        was_serving, self._serving = self._serving, status
        await self.health.set("", status)
        await self.health.set(SERVICE, status)
        self.metrics.serving.set(1 if status == SERVING else 0)
        if status == SERVING:
            log.info("model %s: SERVING", self.config.model)
            if was_serving is not None:  # a new worker: perhaps other weights
                self.service.forget_description()
            asyncio.create_task(self._prefetch_description())
        else:
            log.warning("model %s: NOT_SERVING (%s)", self.config.model, reason)

    async def _prefetch_description(self) -> None:
        """Describe's content, asked once the model serves, so the first Describe is instant."""
        try:
            await self.service.described()
        except Exception as err:  # asked again on the first Describe call
            log.info("could not prefetch Describe: %s", err)


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    gateway = Gateway(config)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: shutting down")
    await gateway.stop()
