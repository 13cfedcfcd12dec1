"""TorchServe handler for model `lvlm`: decode -> engine -> encode, nothing else.

All decoding, validation, method dispatch and encoding live in `lvlm_attribution.service`
(transport-agnostic, tested without TorchServe). This module only adapts TorchServe:

- settings: the `handler:` section of model-config.yaml -> ServiceConfig;
- transport: the worker's request headers hold one {"content-type": ...} dict per input plus, for
  REST only, the HTTP headers as strings (Host, User-Agent, explain, ...): the metric label is
  "rest" when any string header is present, else "grpc";
- streaming: every reply but the last goes out with send_intermediate_predict_response (gRPC
  StreamPredictions messages / REST HTTP chunks); the last is the return value;
- errors: ServiceError -> PredictionException(message, status): 400 -> HTTP 400 / gRPC
  INVALID_ARGUMENT, 413 (out of memory) -> HTTP 507 / RESOURCE_EXHAUSTED, 500 -> INTERNAL. The
  worker keeps serving either way;
- metrics: the core's observations -> TorchServe's metrics API (declared in deploy/metrics.yaml).
"""

from __future__ import annotations

import logging

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.metric_type_enum import MetricTypes
from ts.utils.util import PredictionException

from lvlm_attribution.engine import Explainer
from lvlm_attribution.service import ExplainService, ServiceConfig, ServiceError

log = logging.getLogger(__name__)
METRIC_TYPES = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}


class LVLMHandler:
    def __init__(self) -> None:
        self.service: ExplainService | None = None
        self.model_name = "lvlm"
        self.initialized = False

    def initialize(self, context) -> None:
        cfg = ServiceConfig.from_mapping((context.model_yaml_config or {}).get("handler"))
        props = context.system_properties
        model_dir = cfg.resolve_model_dir(props.get("model_dir") or ".")
        device = cfg.device
        if device.startswith("cuda") and props.get("gpu_id") is not None:
            device = f"cuda:{props['gpu_id']}"  # the GPU TorchServe assigned to this worker
        log.info("loading %s on %s (%s)", model_dir, device, cfg.dtype)
        engine = Explainer.from_pretrained(model_dir, device=device, dtype=cfg.dtype)
        self.service = ExplainService(engine, cfg)
        self.model_name = context.model_name
        self.initialized = True

    def handle(self, data: list[dict], context) -> list[bytes]:
        # model-config.yaml pins batchSize 1: an error fails the whole batch in TorchServe.
        return [self._one(idx, item, context) for idx, item in enumerate(data)]

    def _one(self, idx: int, item: dict, context) -> bytes:
        # Per-input entries are dicts ({"content-type": ...}); HTTP headers are strings.
        headers = {k.lower(): v for k, v in (context.get_all_request_header(idx) or {}).items()
                   if isinstance(v, str)}
        call = self.service.call(item, "rest" if headers else "grpc",
                                 headers.get("content-type", ""))
        try:
            for reply in call.replies():
                if not reply.final:  # sent now: the caller sees the answer before attributions
                    send_intermediate_predict_response([reply.body], context.request_ids,
                                                       "Intermediate response", 200, context)
        except ServiceError as err:
            raise PredictionException(err.message, err.status) from err
        finally:
            self._emit(call.observations, context)
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
