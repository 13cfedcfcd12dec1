"""TorchServe handler for model `lvlm`: decode -> engine -> encode, nothing else.

All decoding, validation, budgets, method dispatch and encoding live in `lvlm_attribution.service`
(transport-agnostic, tested without TorchServe). This module only adapts TorchServe 0.12:

- settings: the `handler:` section of model-config.yaml -> ServiceConfig, checked against the
  model's responseTimeout (the service's deadline must end a request before TorchServe kills the
  worker for it);
- transport: the worker's request headers hold one {"content-type": ...} dict per input plus, for
  REST only, the HTTP headers as strings (Host, User-Agent, explain, ...): "rest" when any string
  header is present, else "grpc";
- batches: the whole batch goes to the service (`ExplainService.serve`), which groups items by
  their options and runs each group in shared passes; a bad item fails only itself. A failed item
  of a larger batch gets its own status (REST) or a PART_ERROR body (gRPC, whose per-item status
  TorchServe drops); a batch of one raises PredictionException so TorchServe sets the status;
- streaming: only REST streams (HTTP chunks via send_intermediate_predict_response). TorchServe's
  frontend sends the backend the same message for gRPC Predictions and StreamPredictions
  (InferenceImpl.prediction -> ModelRequestEncoder: no command, no header tells them apart), and
  an intermediate reply to a unary Predictions throws "Stream is already completed" in the
  frontend's worker thread, which then never restarts the worker. So a gRPC request is always
  answered with exactly one message, marked `ts_stream_next: false` so that StreamPredictions
  completes (GRPCJob.response reads that header without a null check: "Worker died." without it);
- errors: ServiceError -> PredictionException(message, status): 400 -> HTTP 400 / gRPC
  INVALID_ARGUMENT, 413 (out of memory) -> HTTP 507 / RESOURCE_EXHAUSTED, 504 (deadline) ->
  DEADLINE_EXCEEDED, 500 -> INTERNAL. The worker keeps serving either way. Caller mistakes are
  logged as one line, not as TorchServe's traceback;
- metrics: the core's observations -> TorchServe's metrics API (declared in deploy/metrics.yaml),
  including, at start-up, the requests a dead predecessor left unanswered (outcome worker_died).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.metric_type_enum import MetricTypes
from ts.utils.util import PredictionException

from lvlm_attribution.engine import Explainer
from lvlm_attribution.service import ExplainService, ServiceConfig
from lvlm_attribution.service.inflight import InflightJournal

log = logging.getLogger(__name__)
METRIC_TYPES = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}
TS_DEFAULT_RESPONSE_TIMEOUT_S = 120  # TorchServe's default_response_timeout


class LVLMHandler:
    def __init__(self) -> None:
        self.service: ExplainService | None = None
        self.model_name = "lvlm"
        self.initialized = False

    def initialize(self, context) -> None:
        model_yaml = context.model_yaml_config or {}
        cfg = ServiceConfig.from_mapping(model_yaml.get("handler"))
        cfg.check_server_limits(model_yaml.get("responseTimeout", TS_DEFAULT_RESPONSE_TIMEOUT_S))
        props = context.system_properties
        model_dir = cfg.resolve_model_dir(props.get("model_dir") or ".")
        device = cfg.device
        if device.startswith("cuda") and props.get("gpu_id") is not None:
            device = f"cuda:{props['gpu_id']}"  # the GPU TorchServe assigned to this worker
        log.info("loading %s on %s (%s)", model_dir, device, cfg.dtype)
        engine = Explainer.from_pretrained(model_dir, device=device, dtype=cfg.dtype)
        self.model_name = context.model_name
        journal_dir = cfg.inflight_dir or Path(tempfile.gettempdir()) / (
            f"lvlm-inflight-{self.model_name}")
        self.service = ExplainService(engine, cfg, InflightJournal(journal_dir))
        self._emit(self.service.recovered_observations(), context)
        _log_caller_errors_briefly()
        self.initialized = True

    def handle(self, data: list[dict], context) -> list[bytes]:
        """One TorchServe batch: the service answers it in shared passes (grouped by options);
        every item gets its own reply or its own error."""
        calls = [self._call(idx, item, context) for idx, item in enumerate(data)]
        index = {id(call): idx for idx, call in enumerate(calls)}

        def send_partial(call, reply) -> None:  # sent now: the answer before the attributions
            idx = index[id(call)]
            send_intermediate_predict_response({idx: reply.body},
                                               {idx: context.request_ids[idx]},
                                               "Intermediate response", 200, context)

        self._emit(self.service.serve(calls, send_partial), context)
        for call in calls:
            self._emit(call.observations, context)
        return [self._reply(idx, call, context, len(calls)) for idx, call in enumerate(calls)]

    def _call(self, idx: int, item: dict, context):
        # Per-input entries are dicts ({"content-type": ...}); HTTP headers are strings.
        headers = {k.lower(): v for k, v in (context.get_all_request_header(idx) or {}).items()
                   if isinstance(v, str)}
        transport = "rest" if headers else "grpc"
        return self.service.call(item, transport, headers.get("content-type", ""),
                                 can_stream=transport == "rest")

    def _reply(self, idx: int, call, context, batch_size: int) -> bytes:
        if call.final is None:
            if batch_size == 1:  # TorchServe maps the status to HTTP and gRPC codes
                raise PredictionException(call.error.message, call.error.status)
            return self._item_error(idx, call, context)
        if call.transport == "grpc":
            context.set_response_header(idx, "ts_stream_next", "false")
        context.set_response_content_type(idx, call.final.content_type)
        return call.final.body

    def _item_error(self, idx: int, call, context) -> bytes:
        """One failed item of a larger batch: its own status (REST) or, over gRPC, whose
        per-item status TorchServe drops, a PART_ERROR body (ExplainService.item_error)."""
        status, reply = self.service.item_error(call)
        if status is None:
            context.set_response_header(idx, "ts_stream_next", "false")
        else:
            context.set_response_status(status, type(call.error).__name__, idx)
        context.set_response_content_type(idx, reply.content_type)
        return reply.body

    def _emit(self, observations, context) -> None:
        """Never lets a metric problem fail a request."""
        for obs in observations:
            try:
                metric = context.metrics.get_metric(obs.name, METRIC_TYPES[obs.kind])
                labels = {**obs.labels, "ModelName": self.model_name, "Level": "Model"}
                metric.add_or_update(obs.value, [labels[d] for d in metric.dimension_names])
            except Exception:
                log.warning("could not emit metric %s", obs.name, exc_info=True)


def _brief_caller_errors(record: logging.LogRecord) -> bool:
    """A logging filter (a function: TorchServe wants exactly one class in a handler module).
    TorchServe logs every PredictionException with a full traceback (ts.service.predict); for a
    caller's mistake (status < 500) one line is enough; server errors keep the traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, PredictionException) and exc.error_code < 500:
        record.msg, record.args = "request refused (%s): %s", (exc.error_code, exc.message)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def _log_caller_errors_briefly() -> None:
    logger = logging.getLogger("ts.service")
    if _brief_caller_errors not in logger.filters:
        logger.addFilter(_brief_caller_errors)
