"""Client helpers that need no server: request building, URL routing, heatmap decoding."""

from __future__ import annotations

import numpy as np
import pytest

from lvlm_attribution import heatmaps
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.client import (
    GrpcClient,
    RestClient,
    connect,
    decode_heatmap,
    decode_token_maps,
    make_request,
    summarize,
)


def test_make_request_fills_every_option(tmp_path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"png-bytes")
    req = make_request(path, "q ?", "red", methods=["glimpse"], max_new_tokens=4,
                       per_token_maps=True, encoding="f16_zlib", overlay=True, request_id="r",
                       method_settings={"glimpse": {"tau": 0.5}})
    assert req.image == b"png-bytes" and req.answer == "red" and list(req.methods) == ["glimpse"]
    assert req.generation.max_new_tokens == 4 and req.heatmaps.per_token_maps
    assert req.heatmaps.encoding == pb.HEATMAP_ENCODING_F16_ZLIB and req.heatmaps.overlay
    assert req.method_settings["glimpse"]["tau"] == 0.5
    assert not make_request(b"x", "q").HasField("answer")


def test_connect_routes_by_scheme() -> None:
    rest = connect("http://127.0.0.1:1", model="m")
    assert isinstance(rest, RestClient) and rest.endpoint == "http://127.0.0.1:1/predictions/m"
    with connect("torchserve-grpc://127.0.0.1:1") as grpc_client:  # grpc://: the gateway
        assert isinstance(grpc_client, GrpcClient)
    with pytest.raises(ValueError, match="url must start"):
        connect("127.0.0.1:7070")


def test_stream_flag_needs_the_stream_call() -> None:
    with pytest.raises(ValueError, match="explain_stream"):
        RestClient("http://127.0.0.1:1").explain(make_request(b"x", "q", stream=True))


def test_decode_heatmaps_and_summary() -> None:
    grid = np.arange(12, dtype=np.float32).reshape(3, 4)
    enc = heatmaps.encode(grid, "f16_zlib")
    h = pb.Heatmap(method="m", height=3, width=4, encoding=pb.HEATMAP_ENCODING_F16_ZLIB,
                   min_value=enc.min_value, max_value=enc.max_value, data=enc.data)
    h.per_token.add(data=enc.data, min_value=enc.min_value, max_value=enc.max_value)
    np.testing.assert_array_equal(decode_heatmap(h), grid)
    assert len(decode_token_maps(h)) == 1
    resp = pb.ExplainResponse(answer="red", heatmaps=[h])
    resp.tokens.add(index=0, id=1, text="red", probability=0.5, grounded=False)
    text = summarize(resp)
    assert "answer: red" in text and "FLAGGED" in text and "peak at row 2 col 3" in text


def test_retry_busy_asks_again_only_while_busy(monkeypatch):
    from lvlm_attribution import client as client_mod
    from lvlm_attribution.client import ServiceCallError, is_busy, retry_busy

    monkeypatch.setattr(client_mod.time, "sleep", lambda s: None)
    assert is_busy(ServiceCallError(503, "Model lvlm has no worker to serve inference request"))
    assert is_busy(ServiceCallError("INTERNAL", "Model \"lvlm\" has no worker to serve ..."))
    assert not is_busy(ServiceCallError("UNAVAILABLE", "failed to connect"))
    assert not is_busy(ServiceCallError(400, "question: missing"))
    failures = [ServiceCallError(503, "busy"), ServiceCallError("INTERNAL", "no worker")]
    retried = []

    def call():
        if failures:
            raise failures.pop(0)
        return "response"

    assert retry_busy(call, 60, on_retry=lambda: retried.append(1)) == "response"
    assert len(retried) == 2
    bad = [ServiceCallError(400, "question: missing"), ServiceCallError(503, "busy")]
    with pytest.raises(ServiceCallError) as info:
        retry_busy(lambda: (_ for _ in ()).throw(bad.pop(0)), 60)
    assert info.value.status == 400 and len(bad) == 1  # not retried
    with pytest.raises(ServiceCallError) as info:  # past the deadline: the busy error itself
        retry_busy(lambda: (_ for _ in ()).throw(ServiceCallError(503, "busy")), 0)
    assert info.value.status == 503
