"""The gateway's error mapping and deadline arithmetic (no server needed): TorchServe's failures
as callers of lvlm.v1.Explainer see them, and the time budget passed on as timeout_ms."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.api.v1 import explainer_pb2
from lvlm_attribution.gateway import errors
from lvlm_attribution.gateway.service import Budget, Limits

SUFFIX = "\norg.pytorch.serve.http.InternalServerException"


def details(status: grpc.Status) -> tuple[status_pb2.Status, dict[str, object]]:
    """The google.rpc.Status behind a grpc.Status, and its details by type name."""
    (key, raw), = status.trailing_metadata
    assert key == "grpc-status-details-bin"  # where gRPC carries google.rpc.Status
    msg = status_pb2.Status.FromString(raw)
    found: dict[str, object] = {}
    for any_ in msg.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if any_.Is(kind.DESCRIPTOR):
                value = kind()
                any_.Unpack(value)
                found[kind.DESCRIPTOR.name] = value
    return msg, found


def test_invalid_argument_becomes_a_bad_request_naming_the_field() -> None:
    failure = errors.from_grpc(grpc.StatusCode.INVALID_ARGUMENT,
                               "generation.max_new_tokens: 33 exceeds the cap of 32" + SUFFIX,
                               "lvlm")
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.message == "generation.max_new_tokens: 33 exceeds the cap of 32"
    status = failure.to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and status.details == failure.message
    msg, found = details(status)
    assert msg.code == code_pb2.INVALID_ARGUMENT
    (violation,) = found["BadRequest"].field_violations
    assert violation.field == "generation.max_new_tokens"
    assert violation.description == "33 exceeds the cap of 32"
    assert "RetryInfo" not in found


def test_a_message_without_a_field_has_no_violation() -> None:
    failure = errors.invalid("something went wrong, no field here")
    assert failure.field == ""
    assert "BadRequest" not in details(failure.to_status())[1]


def test_busy_is_unavailable_with_retry_info() -> None:
    message = ('Model "lvlm" has no worker to serve inference request. Please use scale workers '
               'API to add workers.' + SUFFIX)
    failure = errors.from_grpc(grpc.StatusCode.INTERNAL, message, "lvlm")
    assert failure.code == grpc.StatusCode.UNAVAILABLE and failure.busy
    assert "no worker" in failure.message and "scale workers" not in failure.message
    _, found = details(failure.to_status())
    assert found["RetryInfo"].retry_delay.ToMilliseconds() == errors.BUSY_RETRY_DELAY_S * 1000
    assert errors.from_http(503, b'{"code": 503, "message": "no worker"}', "lvlm").busy


@pytest.mark.parametrize(("code", "message", "expected"), [
    (grpc.StatusCode.INTERNAL, "Model not found: nope\norg.pytorch.serve.archive.model."
                               "ModelNotFoundException", grpc.StatusCode.NOT_FOUND),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory while serving this request" + SUFFIX,
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "stopped after 0.5 s at stage 'igos'" + SUFFIX,
     grpc.StatusCode.DEADLINE_EXCEEDED),
    (grpc.StatusCode.INTERNAL, "Worker died." + SUFFIX, grpc.StatusCode.INTERNAL),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses",
     grpc.StatusCode.UNAVAILABLE),
])
def test_torchserve_grpc_codes(code, message, expected) -> None:
    failure = errors.from_grpc(code, message, "lvlm")
    assert failure.code == expected and "org.pytorch" not in failure.message
    assert not failure.busy


@pytest.mark.parametrize(("status", "body", "expected"), [
    (400, b'{"code": 400, "message": "question: is required"}', grpc.StatusCode.INVALID_ARGUMENT),
    (404, b'{"code": 404, "message": "Model not found: nope"}', grpc.StatusCode.NOT_FOUND),
    (413, b"", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (504, b'{"code": 504, "message": "stopped after 1 s"}', grpc.StatusCode.DEADLINE_EXCEEDED),
    (507, b'{"code": 507, "message": "out of memory"}', grpc.StatusCode.RESOURCE_EXHAUSTED),
    (500, b"<html>oops</html>", grpc.StatusCode.INTERNAL),
])
def test_torchserve_http_statuses(status, body, expected) -> None:
    failure = errors.from_http(status, body, "lvlm")
    assert failure.code == expected and failure.message
    if status == 400:
        assert failure.field == "question"


def test_part_error_after_the_answer_keeps_code_and_field() -> None:
    err = pb.Error(http_status=400, grpc_code="INVALID_ARGUMENT", field="heatmaps.overlay",
                   message="heatmaps.overlay: the response would be 24.0 MB")
    failure = errors.from_part_error(err)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and failure.field == "heatmaps.overlay"
    oom = errors.from_part_error(pb.Error(http_status=413, grpc_code="RESOURCE_EXHAUSTED",
                                          message="out of memory"))
    assert oom.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_budget_passes_the_caller_deadline_on_as_timeout_ms() -> None:
    limits = Limits(deadline_margin_s=0.05)
    request = pb.ExplainRequest(question="q", timeout_ms=60_000)
    bounded = Budget(2.0, limits).bounded(request, stream=True)
    assert 1900 <= bounded.timeout_ms <= 1950 and bounded.stream
    assert request.timeout_ms == 60_000 and not request.stream  # the caller's copy is untouched
    shorter = pb.ExplainRequest(question="q", timeout_ms=500)
    assert Budget(2.0, limits).bounded(shorter, stream=False).timeout_ms == 500
    # No caller deadline: the server's own budget applies, timeout_ms is left as sent.
    assert Budget(None, limits).bounded(request, stream=False).timeout_ms == 60_000
    assert Budget(None, limits).left() == pytest.approx(limits.upstream_timeout_s, abs=1)


def test_budget_refuses_when_no_time_is_left() -> None:
    budget = Budget(0.04, Limits(deadline_margin_s=0.05))
    with pytest.raises(errors.Failure) as failed:
        budget.bounded(pb.ExplainRequest(), stream=False)
    assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    late = Budget(0.2, Limits(deadline_margin_s=0.0))
    time.sleep(0.25)
    with pytest.raises(errors.Failure):
        late.bounded(pb.ExplainRequest(), stream=False)


def test_the_service_reuses_the_payload_messages() -> None:
    """Callers learn one set of messages: lvlm.v1.Explainer takes explain.proto's."""
    service = explainer_pb2.DESCRIPTOR.services_by_name["Explainer"]
    assert service.full_name == "lvlm.v1.Explainer"
    assert service.methods_by_name["Explain"].input_type is pb.ExplainRequest.DESCRIPTOR
    stream = service.methods_by_name["ExplainStream"]
    assert stream.output_type is pb.ExplainResponse.DESCRIPTOR and stream.server_streaming
