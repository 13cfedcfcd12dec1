"""Test-only TorchServe handler: the production handler whose engine runs out of memory on
request (question containing "oom-cuda" or "oom-host"), to check end to end that out of memory
answers 413 / RESOURCE_EXHAUSTED and that the worker serves the next request."""

from __future__ import annotations

import torch
from lvlm_handler import LVLMHandler


class OOMProbeHandler(LVLMHandler):
    def initialize(self, context) -> None:
        super().initialize(context)
        engine = self.service.engine
        explain = engine.explain

        def explain_or_oom(image, question, *args, **kwargs):
            if "oom-cuda" in question:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if "oom-host" in question:
                raise MemoryError()
            return explain(image, question, *args, **kwargs)

        engine.explain = explain_or_oom
