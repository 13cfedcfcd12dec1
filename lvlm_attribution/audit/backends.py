"""Two ways to explain one audit item, one interface: `Backend.explain(item, image, data)`.

- `LocalBackend` runs an `Explainer` in this process. Workers share the one model under a lock:
  the model runs one item at a time (a model is not safe to run from several threads at once,
  and on CPU torch already uses every core for one item), while image decoding, the overlay
  picture and the HTML of other items proceed in the other workers.
- `ServiceBackend` sends the item to a running service with the typed client
  (`lvlm_attribution.client`, REST or gRPC); requests run in parallel, one per worker thread.
  A busy service (HTTP 503 / no free worker: TorchServe with job tickets refuses at once rather
  than queueing) is retried with backoff; any other refusal is the item's error.

Both return the same `ItemRecord`; failures are `ItemError` with a kind and the server's message.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from .record import Grounding, ItemRecord, TokenRecord


@dataclass
class AuditItem:
    """One JSONL line: what was asked, what was answered, and where the image is."""

    id: str
    image_path: Path
    question: str
    answer: str
    truth: str | None = None
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ItemError(Exception):
    """A per-item failure that is recorded in the summary and never stops the batch."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Backend(Protocol):
    name: str

    def explain(self, item: AuditItem, image: Image.Image, data: bytes) -> ItemRecord: ...

    def close(self) -> None: ...


class LocalBackend:
    """An in-process Explainer (pass one, e.g. a test fixture, or a model directory)."""

    def __init__(self, explainer: Any, methods: Sequence[str] = ("glimpse", "dexar")) -> None:
        self.explainer = explainer
        self.methods = tuple(methods) or ("glimpse", "dexar")
        self.lock = threading.Lock()
        self.name = "local"
        self.model_version = getattr(explainer, "model_version", None)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, methods: Sequence[str] = ("glimpse", "dexar"),
                       device: str = "cpu") -> LocalBackend:
        from ..engine import Explainer

        return cls(Explainer.from_pretrained(model_dir, device=device), methods)

    def explain(self, item: AuditItem, image: Image.Image, data: bytes) -> ItemRecord:
        from ..engine import InvalidInput
        from ..schema import ExplainOptions

        options = ExplainOptions(methods=self.methods)
        try:
            with self.lock:
                expl = self.explainer.explain(image, item.question, answer=item.answer,
                                              options=options)
        except InvalidInput as err:  # what the service answers with HTTP 400
            raise ItemError("invalid_input", str(err)) from None
        tokens = [TokenRecord(t.index, t.text, float(t.probability),
                              None if t.llr is None else float(t.llr),
                              {k: float(v) for k, v in t.weights.items()}, t.grounded)
                  for t in expl.tokens]
        saliency = None
        for name, out in expl.methods.items():
            if out.prompt_saliency is not None:
                saliency = (name, list(expl.question_tokens),
                            [float(v) for v in out.prompt_saliency])
                break
        g = expl.grounding
        return ItemRecord(
            answer=expl.answer, tokens=tokens,
            maps={name: out.visual_map for name, out in expl.methods.items()},
            prompt_saliency=saliency,
            grounding=None if g is None else Grounding(float(g.score), list(g.flagged), g.rule),
            model_name=expl.model_name, model_version=expl.model_version,
            settings={name: _jsonable(out.settings) for name, out in expl.methods.items()},
            timings=dict(expl.timings), backend="local", image_size=tuple(expl.image_size),
            visual_box=expl.visual_box)

    def close(self) -> None:
        pass


class ServiceBackend:
    """The running service through the typed client; `client` may be injected (tests)."""

    def __init__(self, url: str, methods: Sequence[str] = (), model: str = "lvlm",
                 timeout: float = 300.0, client: Any = None, busy_retry_s: float = 600.0
                 ) -> None:
        from ..client import connect

        self.url = url
        self.methods = tuple(methods)
        self.client = client if client is not None else connect(url, model, timeout)
        self.name = url
        self.busy_retry_s = busy_retry_s
        self.busy_retries = 0  # how many times a busy service was asked again (all items)

    def _call(self, request):
        """One request; a busy service is asked again for up to `busy_retry_s` seconds
        (`client.retry_busy`: jittered exponential backoff)."""
        from ..client import retry_busy

        return retry_busy(lambda: self.client.explain(request), self.busy_retry_s,
                          on_retry=self._count_retry)

    def _count_retry(self) -> None:
        self.busy_retries += 1

    def explain(self, item: AuditItem, image: Image.Image, data: bytes) -> ItemRecord:
        from google.protobuf import json_format

        from ..client import ServiceCallError, decode_heatmap, make_request

        request = make_request(data, item.question, item.answer, methods=self.methods,
                               encoding="f16_zlib", request_id=item.id[:128])
        try:
            resp = self._call(request)
        except ServiceCallError as err:
            status = f"HTTP {err.status}" if isinstance(err.status, int) else str(err.status)
            kind = "service_unreachable" if err.status == "UNAVAILABLE" else "service"
            raise ItemError(kind, f"{status}: {err.message}") from None
        except OSError as err:  # connection refused, timeout, reset
            raise ItemError("service_unreachable", f"{self.url}: {err}") from None
        tokens = [TokenRecord(int(t.index), t.text, float(t.probability),
                              float(t.llr) if t.HasField("llr") else None,
                              {k: float(v) for k, v in t.weights.items()},
                              bool(t.grounded) if t.HasField("grounded") else None)
                  for t in resp.tokens]
        ps = resp.prompt_saliency
        saliency = ((ps.method, list(ps.tokens), [float(w) for w in ps.weights])
                    if resp.HasField("prompt_saliency") and len(ps.tokens) else None)
        grounding = (Grounding(float(resp.grounding.score), [int(i) for i in
                                                            resp.grounding.flagged_tokens],
                               resp.grounding.rule) if resp.HasField("grounding") else None)
        return ItemRecord(
            answer=resp.answer, tokens=tokens,
            maps={h.method: decode_heatmap(h) for h in resp.heatmaps},
            prompt_saliency=saliency, grounding=grounding,
            model_name=resp.model.name, model_version=resp.model.version,
            settings={k: json_format.MessageToDict(v) for k, v in resp.method_settings.items()},
            timings={k: float(v) for k, v in resp.timings.items()}, backend=self.url,
            image_size=(int(resp.image_size.width), int(resp.image_size.height)),
            visual_box=_box(resp))

    def close(self) -> None:
        self.client.close()


def _box(resp: Any) -> tuple[float, float, float, float] | None:
    """The response's visual_box; None when the service did not send one (whole image)."""
    if not resp.HasField("visual_box"):
        return None
    b = resp.visual_box
    return (float(b.left), float(b.top), float(b.right), float(b.bottom))


def _jsonable(value: Any) -> Any:
    """Settings as JSON values (tuples, enums and paths pass through str, like the service)."""
    import json

    return json.loads(json.dumps(value, default=str))
