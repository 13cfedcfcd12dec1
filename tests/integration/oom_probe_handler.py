"""Test-only TorchServe handler: the production handler whose engine runs out of memory on
request (question containing "oom-cuda" or "oom-host"), after the answer, so a streamed request
fails after its answer went out. Checks end to end that out of memory answers 413 /
RESOURCE_EXHAUSTED and that the worker serves the next request."""

from __future__ import annotations

import torch
from lvlm_handler import LVLMHandler


class OOMProbeHandler(LVLMHandler):
    def initialize(self, context) -> None:
        super().initialize(context)
        engine = self.service.engine
        answer, attribute = engine.answer, engine.attribute
        marked: dict[int, str] = {}  # id(Answered) -> "cuda" | "host"

        def answer_marking_oom(items, *args, **kwargs):
            answered = answer(items, *args, **kwargs)
            for item, one in zip(items, answered, strict=True):
                for kind in ("cuda", "host"):
                    if f"oom-{kind}" in item.question:
                        marked[id(one)] = kind
            return answered

        def attribute_or_oom(answered, *args, **kwargs):
            kinds = {marked.pop(id(a), None) for a in answered}
            if "cuda" in kinds:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if "host" in kinds:
                raise MemoryError()
            return attribute(answered, *args, **kwargs)

        engine.answer, engine.attribute = answer_marking_oom, attribute_or_oom
