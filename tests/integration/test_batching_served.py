"""The monitoring profile on a real TorchServe (deploy/model-config.monitoring.yaml: batchSize 8,
maxBatchDelay 20 ms, a bounded queue): TorchServe really delivers batches (lvlm_batch_size), a
bad item in a batch of good ones fails alone (REST: its own 400; gRPC: TorchServe drops per-item
statuses, so the typed client raises from the PART_ERROR body), and batched answers equal the
answers the same requests get one at a time."""

from __future__ import annotations

import io
import threading
import urllib.request

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from loadtests.server import local_torchserve
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.client import (
    GrpcClient,
    RestClient,
    ServiceCallError,
    decode_heatmap,
    make_request,
)
from lvlm_attribution.world.scenes import generate

pytestmark = pytest.mark.integration
N = 8


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(generate(seed).image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def monitoring():
    with local_torchserve(profile="model-config.monitoring.yaml") as server:
        yield server


def batch_sizes(server) -> tuple[float, float]:
    """(sum, count) of lvlm_batch_size: requests handled, batches handled."""
    with urllib.request.urlopen(f"{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lvlm_batch_size_sum":
                total += sample.value
            elif sample.name == "lvlm_batch_size_count":
                count += sample.value
    return total, count


def concurrently(calls) -> list:
    """Run the calls at the same moment (a barrier), return results or the exceptions raised."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_bad_item_in_a_batch_fails_alone(monitoring, transport) -> None:
    client = RestClient(monitoring.rest) if transport == "rest" else GrpcClient(monitoring.grpc)
    requests = [make_request(png(seed), generate(seed).question, request_id=f"r{seed}")
                for seed in range(N)]
    requests[3] = make_request(png(3), "what <image> is this ?", request_id="bad")
    before = batch_sizes(monitoring)
    results = concurrently([lambda r=r: client.explain(r) for r in requests])
    after = batch_sizes(monitoring)
    requests_handled, batches = after[0] - before[0], after[1] - before[1]
    assert requests_handled == N and batches < N, (requests_handled, batches)  # really batched
    bad = results[3]
    assert isinstance(bad, ServiceCallError), bad
    assert bad.status == (400 if transport == "rest" else "INVALID_ARGUMENT")
    assert "special token" in bad.message
    for i, resp in enumerate(results):
        if i != 3:
            assert isinstance(resp, pb.ExplainResponse), resp
            assert resp.request_id == f"r{i}" and resp.heatmaps


def test_batched_answers_equal_one_at_a_time(monitoring) -> None:
    client = GrpcClient(monitoring.grpc)
    requests = [make_request(png(seed), generate(seed).question) for seed in range(N)]
    batched = concurrently([lambda r=r: client.explain(r) for r in requests])
    alone = [client.explain(r) for r in requests]
    for b, a in zip(batched, alone, strict=True):
        assert b.answer == a.answer
        assert [t.id for t in b.tokens] == [t.id for t in a.tokens]
        assert [round(t.probability, 4) for t in b.tokens] == \
            [round(t.probability, 4) for t in a.tokens]
        for hb, ha in zip(b.heatmaps, a.heatmaps, strict=True):  # PNG u8: one grey level
            np.testing.assert_allclose(decode_heatmap(hb), decode_heatmap(ha),
                                       atol=1.01 * (ha.max_value - ha.min_value) / 255)


def test_rest_streaming_inside_a_batch(monitoring) -> None:
    """A streamed REST request batched with plain ones: its answer arrives first, then all."""
    rest = RestClient(monitoring.rest)
    streamed = make_request(png(1), generate(1).question, stream=True)
    plain = [make_request(png(seed), generate(seed).question) for seed in range(2, 5)]
    calls = [lambda: list(rest.explain_stream(streamed))]
    calls += [lambda r=r: rest.explain(r) for r in plain]
    results = concurrently(calls)
    parts = results[0]
    assert [p.part for p in parts] == [pb.ExplainResponse.PART_ANSWER,
                                       pb.ExplainResponse.PART_COMPLETE], parts
    assert all(isinstance(r, pb.ExplainResponse) and r.heatmaps for r in results[1:]), results
