"""Typed Python client for the LVLM Attribution Service, over REST or gRPC.

    from lvlm_attribution.client import connect, make_request, decode_heatmap

    with connect("grpc://127.0.0.1:50051") as client:   # the gateway; or "http://127.0.0.1:8080"
        resp = client.explain(make_request("scene.png", "what color is the circle ?"))
        print(resp.answer, [t.probability for t in resp.tokens])
        grid = decode_heatmap(resp.heatmaps[0])         # float32 (h, w) at the patch grid
        for part in client.explain_stream(make_request("scene.png", "...")):
            ...                                         # PART_ANSWER, then PART_COMPLETE

Every client returns `lvlm_attribution.api.v1.explain_pb2.ExplainResponse` (typed, with .pyi
stubs) and raises `ServiceCallError` with the HTTP status or gRPC code and the server's message.
A busy refusal (`is_busy`) is worth repeating: `retry_busy(lambda: client.explain(req), 60)`.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from . import heatmaps
from .api.v1 import explain_pb2 as pb

T = TypeVar("T")
DEFAULT_MODEL = "lvlm"
STREAM_INTERRUPTED = "STREAM_INTERRUPTED"  # ServiceCallError.status when a REST stream is cut
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # well above gRPC's 4 MiB default receive limit
ENCODINGS = {"png_u8": pb.HEATMAP_ENCODING_PNG_U8, "f16_zlib": pb.HEATMAP_ENCODING_F16_ZLIB}
ENCODING_NAMES = {pb.HEATMAP_ENCODING_UNSPECIFIED: "png_u8", pb.HEATMAP_ENCODING_PNG_U8: "png_u8",
                  pb.HEATMAP_ENCODING_F16_ZLIB: "f16_zlib"}


@dataclass
class ServiceCallError(Exception):
    """The service refused or failed a request. `status` is the HTTP status (REST), the gRPC
    status code name (e.g. "INVALID_ARGUMENT"), or STREAM_INTERRUPTED when a REST stream broke
    after its first part; `message` names the field and the limit."""

    status: int | str
    message: str

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


def make_request(image: bytes | str | Path, question: str, answer: str | None = None, *,
                 methods: Iterable[str] = (), max_new_tokens: int = 0,
                 per_token_maps: bool = False, encoding: str = "png_u8", overlay: bool = False,
                 request_id: str = "", stream: bool = False,
                 method_settings: Mapping[str, Mapping[str, Any]] | None = None,
                 ) -> pb.ExplainRequest:
    """Build an ExplainRequest; `image` is the file's bytes or its path."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    req = pb.ExplainRequest(image=data, question=question, methods=list(methods),
                            request_id=request_id, stream=stream)
    if answer is not None:
        req.answer = answer
    req.generation.max_new_tokens = max_new_tokens
    req.heatmaps.per_token_maps = per_token_maps
    req.heatmaps.encoding = ENCODINGS[encoding]
    req.heatmaps.overlay = overlay
    for name, settings in (method_settings or {}).items():
        req.method_settings[name].update(dict(settings))
    return req


def decode_heatmap(h: pb.Heatmap) -> np.ndarray:
    """The sequence-level map as float32 (height, width)."""
    return heatmaps.decode(h.data, ENCODING_NAMES[h.encoding], (h.height, h.width), h.min_value,
                           h.max_value)


def decode_token_maps(h: pb.Heatmap) -> list[np.ndarray]:
    """Per-token maps (present when requested with per_token_maps)."""
    return [heatmaps.decode(m.data, ENCODING_NAMES[h.encoding], (h.height, h.width), m.min_value,
                            m.max_value) for m in h.per_token]


class RestClient:
    """POST /predictions/{model} with the proto3 JSON mapping of ExplainRequest."""

    def __init__(self, url: str = "http://127.0.0.1:8080", model: str = DEFAULT_MODEL,
                 timeout: float = 120.0) -> None:
        self.endpoint = f"{url.rstrip('/')}/predictions/{model}"
        self.timeout = timeout

    def explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        if request.stream:
            raise ValueError("use explain_stream() for stream=True")
        with self._post(request) as resp:
            return _parse_json(resp.read())

    def explain_stream(self, request: pb.ExplainRequest) -> Iterator[pb.ExplainResponse]:
        """Chunked response, one JSON document per line: the answer first, then everything."""
        stream = pb.ExplainRequest()
        stream.CopyFrom(request)
        stream.stream = True
        complete = False
        with self._post(stream) as resp:
            try:
                for line in resp:
                    if line.strip():
                        part = _parse_json(line)
                        if part.part == pb.ExplainResponse.PART_ERROR:  # after the 200
                            raise ServiceCallError(part.error.http_status, part.error.message)
                        complete = part.part == pb.ExplainResponse.PART_COMPLETE
                        yield part
            except (OSError, http.client.HTTPException) as err:
                # HTTP 200 and the answer are already out: a later failure can only cut the stream.
                raise ServiceCallError(STREAM_INTERRUPTED, f"the stream ended early ({err}); "
                                       "the server log has the cause") from None
        if not complete:
            raise ServiceCallError(STREAM_INTERRUPTED, "the stream ended before PART_COMPLETE")

    def close(self) -> None:
        pass

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, request: pb.ExplainRequest):
        body = json.dumps(json_format.MessageToDict(request)).encode()
        req = urllib.request.Request(self.endpoint, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw).get("message", "")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")
            raise ServiceCallError(err.code, message) from None


class GrpcClient:
    """TorchServe's InferenceAPIsService; the ExplainRequest travels in input["request"]."""

    def __init__(self, target: str = "127.0.0.1:7070", model: str = DEFAULT_MODEL,
                 timeout: float = 120.0, max_message_bytes: int = GRPC_MAX_MESSAGE_BYTES) -> None:
        import grpc

        from .api.torchserve import inference_pb2_grpc

        self._grpc = grpc
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.model = model
        self.timeout = timeout

    def explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        if request.stream:
            raise ValueError("use explain_stream() for stream=True")
        try:
            reply = self.stub.Predictions(self._wrap(request), timeout=self.timeout)
        except self._grpc.RpcError as err:
            raise _grpc_error(err) from None
        return _parse_protobuf(reply.prediction)

    def explain_stream(self, request: pb.ExplainRequest) -> Iterator[pb.ExplainResponse]:
        """TorchServe's raw gRPC cannot stream (docs/reliability.md): one PART_COMPLETE message
        with a warning. lvlm.v1.Explainer/ExplainStream on the gateway streams."""
        stream = pb.ExplainRequest()
        stream.CopyFrom(request)
        stream.stream = True
        try:
            for reply in self.stub.StreamPredictions(self._wrap(stream), timeout=self.timeout):
                yield _parse_protobuf(reply.prediction)
        except self._grpc.RpcError as err:
            raise _grpc_error(err) from None

    def ping(self) -> str:
        from google.protobuf import empty_pb2

        return json.loads(self.stub.Ping(empty_pb2.Empty(), timeout=self.timeout).health)["status"]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wrap(self, request: pb.ExplainRequest):
        from .api.torchserve import inference_pb2

        return inference_pb2.PredictionsRequest(model_name=self.model,
                                                input={"request": request.SerializeToString()})


class ExplainerClient:
    """The typed service lvlm.v1.Explainer (the gateway, `connect("grpc://host:50051")`):
    Explain, ExplainStream (really streamed: the answer, then everything), Describe, and the
    gateway's grpc.health.v1. Errors raise ServiceCallError(code name, message); the rich details
    (BadRequest, RetryInfo) are on the gRPC status: `grpc_status.rpc_status.from_call`."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = 120.0,
                 max_message_bytes: int = GRPC_MAX_MESSAGE_BYTES) -> None:
        import grpc

        from .api.v1 import explainer_pb2_grpc

        self._grpc = grpc
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self.stub = explainer_pb2_grpc.ExplainerStub(self.channel)
        self.timeout = timeout

    def explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        if request.stream:
            raise ValueError("use explain_stream() for stream=True")
        try:
            return self.stub.Explain(request, timeout=self.timeout)
        except self._grpc.RpcError as err:
            raise _grpc_error(err) from None

    def explain_stream(self, request: pb.ExplainRequest) -> Iterator[pb.ExplainResponse]:
        """PART_ANSWER as soon as the answer is generated, then PART_COMPLETE."""
        try:
            yield from self.stub.ExplainStream(request, timeout=self.timeout)
        except self._grpc.RpcError as err:
            raise _grpc_error(err) from None

    def describe(self):
        """lvlm.v1.DescribeResponse: the model, the methods (defaults, cost limits), limits."""
        from .api.v1 import explainer_pb2

        try:
            return self.stub.Describe(explainer_pb2.DescribeRequest(), timeout=self.timeout)
        except self._grpc.RpcError as err:
            raise _grpc_error(err) from None

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status name: SERVING while the model has a live worker."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ExplainerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_busy(err: ServiceCallError) -> bool:
    """TorchServe refused because no worker was free: with job tickets it answers at once, HTTP
    503 / gRPC INTERNAL "... no worker ..." — also right behind another request, before the
    worker's ticket is released. Worth asking again. The gateway says UNAVAILABLE "busy: ... no
    worker ..." (with RetryInfo) once its own short retries are spent. (A bare gRPC UNAVAILABLE
    is not busy: it is what an unreachable server gives.)"""
    return err.status == 503 or (err.status in ("INTERNAL", "UNAVAILABLE")
                                 and "no worker" in err.message.lower())


def retry_busy(call: Callable[[], T], busy_retry_s: float,
               on_retry: Callable[[], None] | None = None) -> T:
    """`call()`, asked again while it raises a busy ServiceCallError (`is_busy`), with jittered
    exponential backoff (0.2 s doubling to 1 s) for up to `busy_retry_s` seconds; any other error,
    or a busy one past the deadline, is raised. `on_retry` is called before each new attempt.

        resp = retry_busy(lambda: client.explain(request), busy_retry_s=60)
    """
    deadline = time.monotonic() + busy_retry_s
    delay = 0.2
    while True:
        try:
            return call()
        except ServiceCallError as err:
            if not is_busy(err) or time.monotonic() + delay > deadline:
                raise
        if on_retry is not None:
            on_retry()
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 1.0)  # a busy answer is instant: asking often is cheap


def connect(url: str, model: str = DEFAULT_MODEL, timeout: float = 120.0
            ) -> RestClient | GrpcClient | ExplainerClient:
    """`http(s)://host:port` -> REST; `grpc://host:port` -> the typed service lvlm.v1.Explainer
    (the gateway, which serves one model: `model` is its business); `torchserve-grpc://host:port`
    -> TorchServe's raw InferenceAPIsService (in-pod only; it cannot stream)."""
    if url.startswith("grpc://"):
        return ExplainerClient(url.removeprefix("grpc://"), timeout)
    if url.startswith("torchserve-grpc://"):
        return GrpcClient(url.removeprefix("torchserve-grpc://"), model, timeout)
    if url.startswith(("http://", "https://")):
        return RestClient(url, model, timeout)
    raise ValueError(f"url must start with http://, https://, grpc:// (the typed gateway) or "
                     f"torchserve-grpc://, got {url!r}")


def _parse_json(raw: bytes) -> pb.ExplainResponse:
    return json_format.ParseDict(json.loads(raw), pb.ExplainResponse(), ignore_unknown_fields=True)


def _parse_protobuf(raw: bytes) -> pb.ExplainResponse:
    """A raw TorchServe gRPC reply. In a batch of several, TorchServe sends a failed item as OK
    (its gRPC path drops per-item statuses): the body is then a PART_ERROR saying what failed."""
    try:
        msg = pb.ExplainResponse.FromString(raw)
    except DecodeError:
        raise ServiceCallError("BAD_RESPONSE", f"the server's reply ({len(raw)} bytes) is not an "
                               "ExplainResponse: is this the lvlm model?") from None
    if msg.part == pb.ExplainResponse.PART_ERROR:
        raise ServiceCallError(msg.error.grpc_code or "INTERNAL", msg.error.message)
    return msg


def _grpc_error(err) -> ServiceCallError:
    details = (err.details() or "").split("\norg.pytorch.serve")[0]  # TorchServe's suffix
    return ServiceCallError(err.code().name, details)


def summarize(resp: pb.ExplainResponse) -> str:
    """A short human-readable view (used by `lvlm-attribution call`)."""
    lines = [f"answer: {resp.answer}" + ("  (audit mode)" if resp.audit_mode else "")]
    for t in resp.tokens:
        weights = " ".join(f"{k}={v:.3g}" for k, v in sorted(t.weights.items()))
        flag = "" if not t.HasField("grounded") else (" grounded" if t.grounded else " FLAGGED")
        lines.append(f"  [{t.index}] {t.text!r} p={t.probability:.3f} {weights}{flag}")
    for h in resp.heatmaps:
        grid = decode_heatmap(h)
        r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
        lines.append(f"heatmap {h.method}: {h.height}x{h.width} {ENCODING_NAMES[h.encoding]} "
                     f"{len(h.data)} B, peak at row {r} col {c}")
    if resp.HasField("grounding"):
        lines.append(f"grounding: {resp.grounding.score:.3f} ({resp.grounding.rule})")
    if resp.timings:
        lines.append(f"total: {resp.timings.get('total', 0.0):.3f} s; model "
                     f"{resp.model.name}@{resp.model.version}")
    return "\n".join(lines)


def run_call(args: Any) -> int:
    """`lvlm-attribution call`: one request; prints a summary or the response's JSON."""
    request = make_request(args.image, args.question, args.answer,
                           methods=[m for m in (args.methods or "").split(",") if m],
                           max_new_tokens=args.max_new_tokens, encoding=args.encoding,
                           overlay=args.overlay, per_token_maps=args.per_token_maps,
                           method_settings=getattr(args, "method_settings", None))
    try:
        with connect(args.url, args.model) as client:
            parts = client.explain_stream(request) if args.stream else [client.explain(request)]
            for resp in parts:
                print(json.dumps(json_format.MessageToDict(resp)) if args.json
                      else summarize(resp), flush=True)
    except ServiceCallError as err:
        print(f"error: {err}", flush=True)
        return 2
    return 0
