"""End to end over a real TorchServe (CPU, embedded model), REST and gRPC alike."""

from __future__ import annotations

import io
import json
import struct
import time
import urllib.error
import urllib.request
import zlib

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from lvlm_attribution.api.torchserve import inference_pb2, inference_pb2_grpc
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.client import (
    GrpcClient,
    RestClient,
    ServiceCallError,
    decode_heatmap,
    is_busy,
    make_request,
    retry_busy,
)
from lvlm_attribution.world.scenes import generate

pytestmark = pytest.mark.integration
METHODS = ["glimpse", "dexar"]
TRANSPORTS = ["rest", "grpc"]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


SCENE = generate(7, "color")
IMAGE = png_bytes(SCENE.image)


# With useJobTicket, TorchServe frees a worker's ticket only after the previous response went out,
# so a request sent right behind another can be refused as busy (REST 503, gRPC INTERNAL "no
# worker"; seen in CI). Callers retry those (client.retry_busy, docs/api.md); so do the tests.
BUSY_RETRY_S, BUSY_RETRIES, BUSY_SLEEP_S = 10.0, 50, 0.1


def _busy(status: int | str, message: str) -> bool:
    return is_busy(ServiceCallError(status, message))


class RetryBusy:
    """A typed client whose explain() and explain_stream() ask again while the service is busy."""

    def __init__(self, client) -> None:
        self.client = client

    def explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        return retry_busy(lambda: self.client.explain(request), BUSY_RETRY_S)

    def explain_stream(self, request: pb.ExplainRequest):
        """Asked again only while nothing has arrived: a busy refusal precedes the first part."""
        for attempt in range(BUSY_RETRIES + 1):
            started = False
            try:
                for part in self.client.explain_stream(request):
                    started = True
                    yield part
                return
            except ServiceCallError as err:
                if started or attempt == BUSY_RETRIES or not is_busy(err):
                    raise
            time.sleep(BUSY_SLEEP_S)

    def __getattr__(self, name: str):
        return getattr(self.client, name)


@pytest.fixture(scope="module")
def clients(torchserve):
    rest, grpc_client = RestClient(torchserve.rest), GrpcClient(torchserve.grpc)
    yield {"rest": RetryBusy(rest), "grpc": RetryBusy(grpc_client)}
    grpc_client.close()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_answer_with_glimpse_and_dexar(clients, transport) -> None:
    resp = clients[transport].explain(make_request(IMAGE, SCENE.question, methods=METHODS,
                                                   request_id=f"it-{transport}"))
    assert resp.answer and resp.request_id == f"it-{transport}" and not resp.audit_mode
    assert [h.method for h in resp.heatmaps] == METHODS
    for h in resp.heatmaps:
        grid = decode_heatmap(h)
        assert grid.shape == (h.height, h.width) == (8, 8) and np.isfinite(grid).all()
        assert h.encoding == pb.HEATMAP_ENCODING_PNG_U8 and len(h.data) <= 2048
    assert resp.tokens and all(0.0 <= t.probability <= 1.0 for t in resp.tokens)
    for method in METHODS:
        assert any(k.startswith(f"{method}.") for k in resp.tokens[0].weights), method
    assert resp.prompt_saliency.tokens and len(resp.prompt_saliency.weights) == len(
        resp.prompt_saliency.tokens)
    assert set(METHODS) <= set(resp.method_settings)
    assert {"decode", "generate", "encode", "total", *METHODS} <= set(resp.timings)
    assert resp.model.name and resp.model.version
    if resp.HasField("grounding"):  # flags on content tokens; stop words may have none
        assert any(t.HasField("grounded") for t in resp.tokens)
        assert set(resp.grounding.flagged_tokens) == {
            t.index for t in resp.tokens if t.HasField("grounded") and not t.grounded}


def test_default_response_size_limits(torchserve) -> None:
    body = json.dumps(json_format.MessageToDict(make_request(IMAGE, SCENE.question))).encode()
    status, text = _post(f"{torchserve.rest}/predictions/lvlm", body, "application/json")
    assert status == 200, text
    raw = text.encode()
    resp = json_format.ParseDict(json.loads(raw), pb.ExplainResponse())
    assert [h.method for h in resp.heatmaps] == METHODS  # the server's defaults
    binary = resp.SerializeToString()
    print(f"default response: JSON {len(raw)} B, protobuf {len(binary)} B, heatmaps "
          f"{[len(h.data) for h in resp.heatmaps]} B")
    assert len(raw) <= 16 * 1024 and len(binary) <= 16 * 1024
    assert all(len(h.data) <= 2 * 1024 for h in resp.heatmaps)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_audit_mode_matches_generate_then_explain(clients, transport) -> None:
    client = clients[transport]
    opts = {"methods": METHODS, "encoding": "f16_zlib"}
    generated = client.explain(make_request(IMAGE, SCENE.question, **opts))
    audited = client.explain(make_request(IMAGE, SCENE.question, generated.answer, **opts))
    assert audited.audit_mode and audited.answer == generated.answer
    assert [t.id for t in audited.tokens] == [t.id for t in generated.tokens]
    for a, g in zip(audited.heatmaps, generated.heatmaps, strict=True):
        np.testing.assert_allclose(decode_heatmap(a), decode_heatmap(g), rtol=1e-3, atol=1e-6)


def test_raw_grpc_stream_is_one_complete_message_with_a_warning(clients) -> None:
    parts = list(clients["grpc"].explain_stream(make_request(IMAGE, SCENE.question,
                                                             methods=METHODS)))
    assert [p.part for p in parts] == [pb.ExplainResponse.PART_COMPLETE]
    assert [h.method for h in parts[0].heatmaps] == METHODS
    assert "cannot stream" in parts[0].warnings[0]


def test_rest_streaming_delivers_the_answer_first(clients) -> None:
    arrivals = []
    for part in clients["rest"].explain_stream(make_request(IMAGE, SCENE.question,
                                                            methods=METHODS)):
        arrivals.append((time.perf_counter(), part))
    assert [p.part for _, p in arrivals] == [pb.ExplainResponse.PART_ANSWER,
                                            pb.ExplainResponse.PART_COMPLETE]
    (t0, first), (t1, last) = arrivals
    assert first.answer == last.answer and first.tokens and not first.heatmaps
    assert [h.method for h in last.heatmaps] == METHODS
    # The answer left the server before the attributions were computed, not with them.
    attribution = sum(last.timings[k] for k in ("forward", *METHODS))
    assert t1 - t0 >= 0.5 * attribution, (t1 - t0, attribution)


def _request(**fields) -> pb.ExplainRequest:
    fields.setdefault("image", IMAGE)
    fields.setdefault("question", SCENE.question)
    return pb.ExplainRequest(**fields)


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    return buf.getvalue()


def _big_png() -> bytes:  # 2001 x 2000 = 4,002,000 pixels, compresses to a few KB
    return png_bytes(np.zeros((2000, 2001, 3), dtype=np.uint8))


BAD_REQUESTS = {
    "missing image": (_request(image=b""), "image"),
    "missing question": (_request(question=""), "question"),
    "image too many bytes": (_request(image=IMAGE + b"\0" * 4_000_000), "4000000 bytes"),
    "image too many pixels": (_request(image=_big_png()), "4000000 pixels"),
    "decompression bomb": (_request(image=header_only_png(100_000, 100_000)), "pixels"),
    "unsupported format": (_request(image=_tiff()), "unsupported or corrupt"),
    "corrupt image": (_request(image=IMAGE[:40]), "image"),
    "blank question": (_request(question="   "), "question"),
    "oversized question": (_request(question="what " * 101), "limit of 500"),
    "unknown method": (_request(methods=["nope"]), "methods"),
    "max_new_tokens above cap": (_request(generation=pb.GenerationOptions(max_new_tokens=33)),
                                 "cap of 32"),
    "empty answer": (_request(answer=" "), "answer"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_rejected_with_the_field_named(clients, transport, case) -> None:
    request, expected = BAD_REQUESTS[case]
    with pytest.raises(ServiceCallError) as info:
        clients[transport].explain(request)
    assert info.value.status == (400 if transport == "rest" else "INVALID_ARGUMENT")
    assert expected in info.value.message


def _post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    """One raw POST; a busy 503 (see RetryBusy) is asked again."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    for _ in range(BUSY_RETRIES):
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        if not _busy(status, text):
            return status, text
        time.sleep(BUSY_SLEEP_S)
    return status, text


def test_malformed_rest_bodies(torchserve) -> None:
    url = f"{torchserve.rest}/predictions/lvlm"
    status, text = _post(url, b'{"image": "AA==", "question": ', "application/json")
    assert status == 400 and "malformed JSON" in text
    status, text = _post(url, b'{"imagez": "AA=="}', "application/json")
    assert status == 400 and "imagez" in text
    status, text = _post(url, b"\xff\x00garbage", "application/x-protobuf")
    assert status == 400 and "malformed protobuf" in text


def test_malformed_grpc_payloads(torchserve) -> None:
    with grpc.insecure_channel(torchserve.grpc) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        for inputs, expected in (({"request": b"\xff\xff\xff"}, "malformed protobuf"),
                                 ({"other": b"x"}, "request: missing")):
            for _ in range(BUSY_RETRIES):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Predictions(inference_pb2.PredictionsRequest(model_name="lvlm",
                                                                      input=inputs), timeout=60)
                if not _busy(info.value.code().name, info.value.details() or ""):
                    break
                time.sleep(BUSY_SLEEP_S)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in info.value.details()


def test_multipart_upload(torchserve) -> None:
    boundary = "lvlmboundary"
    parts = [("image", "scene.png", "image/png", IMAGE),
             ("question", None, None, SCENE.question.encode()),
             ("methods", None, None, b"dexar")]
    body = b""
    for name, filename, ctype, data in parts:
        body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode()
        body += f"; filename=\"{filename}\"\r\nContent-Type: {ctype}".encode() if filename else b""
        body += b"\r\n\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    status, text = _post(f"{torchserve.rest}/predictions/lvlm", body,
                         f"multipart/form-data; boundary={boundary}")
    assert status == 200, text
    doc = json.loads(text)
    assert doc["answer"] and [h["method"] for h in doc["heatmaps"]] == ["dexar"]


def _scrape(torchserve) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{torchserve.metrics}/metrics", timeout=30) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "Hostname"))
            samples[(s.name, labels)] = s.value
    return samples


def _value(samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_move_for_both_transports(torchserve, clients) -> None:
    before = _scrape(torchserve)
    grounded = False
    for transport in TRANSPORTS:
        resp = clients[transport].explain(make_request(IMAGE, SCENE.question, methods=METHODS))
        grounded = grounded or resp.HasField("grounding")
        with pytest.raises(ServiceCallError):
            clients[transport].explain(_request(question=""))
    checks = [("lvlm_requests_total", {"outcome": o, "transport": t})
              for o in ("ok", "invalid_input") for t in TRANSPORTS]
    checks += [("lvlm_stage_latency_seconds_count", {"stage": s, "transport": t, "method": m})
               for t in TRANSPORTS for s, m in (("decode", "-"), ("generate", "-"),
                                                ("encode", "-"), ("total", "-"))]
    checks += [("lvlm_stage_latency_seconds_count", {"stage": "attribute", "method": m,
                                                     "transport": t})
               for t in TRANSPORTS for m in METHODS]
    checks += [(f"{n}_count", {}) for n in ("lvlm_answer_tokens", "lvlm_visual_tokens")]
    if grounded:  # the engine reports grounding once its rule is in place
        checks.append(("lvlm_grounding_score_count", {}))
    deadline = time.time() + 30  # the frontend reads the worker's metric lines asynchronously
    while True:
        after = _scrape(torchserve)
        stale = [(n, ls) for n, ls in checks if _value(after, n, **ls) <= _value(before, n, **ls)]
        if not stale or time.time() > deadline:
            break
        time.sleep(1)
    assert not stale, f"metrics did not move: {stale}"
    assert _value(after, "lvlm_requests_total", outcome="ok", transport="grpc") - _value(
        before, "lvlm_requests_total", outcome="ok", transport="grpc") == 1
    for (name, labels) in after:  # no request ids or text in labels
        assert not any(k in ("request_id", "question", "answer") for k, _ in labels), name


def test_server_still_serves_after_errors(clients) -> None:
    for transport in TRANSPORTS:
        assert clients[transport].explain(make_request(IMAGE, SCENE.question,
                                                       methods=["dexar"])).answer


@pytest.mark.parametrize(("transport", "trigger"), [("rest", "oom-host"), ("grpc", "oom-cuda")])
def test_out_of_memory_is_resource_exhausted_and_the_worker_survives(torchserve, transport,
                                                                     trigger) -> None:
    from .conftest import OOM_PROBE

    client = RetryBusy(RestClient(torchserve.rest, OOM_PROBE) if transport == "rest"
                       else GrpcClient(torchserve.grpc, OOM_PROBE))
    before = _scrape(torchserve)
    with pytest.raises(ServiceCallError) as info:
        client.explain(make_request(IMAGE, f"{trigger} {SCENE.question}", methods=["dexar"]))
    # TorchServe rewrites the handler's 413 to 507 on REST; gRPC gets RESOURCE_EXHAUSTED.
    assert info.value.status == (507 if transport == "rest" else "RESOURCE_EXHAUSTED")
    assert "out of memory" in info.value.message
    assert client.explain(make_request(IMAGE, SCENE.question, methods=["dexar"])).answer
    deadline = time.time() + 30
    while True:
        after = _scrape(torchserve)
        moved = _value(after, "lvlm_requests_total", outcome="out_of_memory",
                       transport=transport) > _value(before, "lvlm_requests_total",
                                                     outcome="out_of_memory", transport=transport)
        if moved or time.time() > deadline:
            break
        time.sleep(1)
    assert moved


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failure_after_the_streamed_answer_ends_the_stream(torchserve, transport) -> None:
    from .conftest import OOM_PROBE

    client = RetryBusy(RestClient(torchserve.rest, OOM_PROBE, timeout=60) if transport == "rest"
                       else GrpcClient(torchserve.grpc, OOM_PROBE, timeout=60))
    parts = []
    with pytest.raises(ServiceCallError) as info:
        for part in client.explain_stream(make_request(IMAGE, f"oom-host {SCENE.question}",
                                                       methods=["dexar"])):
            parts.append(part)
    # REST already sent 200 and the answer: the stream's last message is PART_ERROR with the
    # status the request would have had. Raw gRPC does not stream: a plain error status.
    if transport == "rest":
        assert [p.part for p in parts] == [pb.ExplainResponse.PART_ANSWER]
        assert info.value.status == 413 and "out of memory" in info.value.message
    else:
        assert not parts and info.value.status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_request_over_max_request_size_is_refused_by_torchserve(clients, transport) -> None:
    """deploy/config.properties sets max_request_size=8 MiB (REST body and gRPC inbound)."""
    big = _request(image=b"\0" * (9 * 1024 * 1024))
    # Measured: REST resets the connection while the body is still being sent (or answers 413);
    # gRPC (grpc-java's inbound limit) resets the stream: CANCELLED, "RST_STREAM ... code 8".
    with pytest.raises((ServiceCallError, OSError)) as info:
        clients[transport].explain(big)
    if transport == "grpc":
        assert info.value.status == "CANCELLED" and "RST_STREAM" in info.value.message
    elif isinstance(info.value, ServiceCallError):
        assert info.value.status == 413
    assert clients[transport].explain(make_request(IMAGE, SCENE.question,
                                                   methods=["dexar"])).answer
