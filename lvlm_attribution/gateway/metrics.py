"""The gateway's Prometheus metrics (its own port, /metrics): what callers of lvlm.v1.Explainer
see end to end, per RPC and status code. No request ids or text in labels.

| metric                                      | type      | labels     |
|---------------------------------------------|-----------|------------|
| lvlm_gateway_rpc_duration_seconds           | histogram | rpc, code  |
| lvlm_gateway_stream_first_message_seconds   | histogram |            |
| lvlm_gateway_in_flight_rpcs                 | gauge     | rpc        |
| lvlm_gateway_busy_retries_total             | counter   | rpc        |
| lvlm_gateway_model_serving                  | gauge     |            |
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

# From a busy refusal (ms) to the server's deadline (60 s) and TorchServe's responseTimeout.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # private: two gateways in one process stay apart
        ProcessCollector(registry=self.registry)
        self.duration = Histogram("lvlm_gateway_rpc_duration_seconds",
                                  "lvlm.v1.Explainer calls, start to status, in seconds",
                                  ["rpc", "code"], buckets=BUCKETS, registry=self.registry)
        self.first_message = Histogram("lvlm_gateway_stream_first_message_seconds",
                                       "ExplainStream: seconds until the answer (PART_ANSWER)",
                                       buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("lvlm_gateway_in_flight_rpcs", "lvlm.v1.Explainer calls running",
                               ["rpc"], registry=self.registry)
        self.busy_retries = Counter("lvlm_gateway_busy_retries",
                                    "Requests asked again after TorchServe refused them as busy",
                                    ["rpc"], registry=self.registry)
        self.serving = Gauge("lvlm_gateway_model_serving",
                             "1 while the health service says SERVING (a live READY worker)",
                             registry=self.registry)
        self._http = None

    def observe(self, rpc: str, code: str, seconds: float) -> None:
        self.duration.labels(rpc=rpc, code=code).observe(seconds)

    def serve(self, host: str, port: int) -> None:
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
