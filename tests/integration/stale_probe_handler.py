"""Test-only TorchServe handler: the production handler as it was before it learned that gRPC
cannot stream through TorchServe. It sends an intermediate reply on every transport, so a unary
gRPC Predictions call makes TorchServe's frontend throw "Stream is already completed"; the worker
exits, is never restarted, and stays listed READY with its old pid while /ping says Healthy.
tests/integration/test_worker_health.py uses it to show that our probe sees that state."""

from __future__ import annotations

from lvlm_handler import LVLMHandler
from ts.handler_utils.utils import send_intermediate_predict_response


class StaleProbeHandler(LVLMHandler):
    def handle(self, data, context):
        send_intermediate_predict_response([b"partial"], context.request_ids,
                                           "Intermediate response", 200, context)
        return super().handle(data, context)
