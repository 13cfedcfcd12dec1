"""TorchServe's ways of failing -> one `Failure` -> a google.rpc.Status with details.

TorchServe reports the handler's status as a gRPC code (400 -> INVALID_ARGUMENT, 413 ->
RESOURCE_EXHAUSTED, 504 -> DEADLINE_EXCEEDED, 500 -> INTERNAL) or an HTTP status (507 for out of
memory), and its own refusals as INTERNAL with a message: "... has no worker to serve inference
request ..." (job tickets: busy) and "Model not found: <name>". Messages carry a suffix line naming
a Java exception class. Callers of lvlm.v1.Explainer get instead:

| condition                        | code               | details                         |
|----------------------------------|--------------------|---------------------------------|
| bad input ("<field>: <why>")     | INVALID_ARGUMENT   | BadRequest{field, description}  |
| out of memory, request too large | RESOURCE_EXHAUSTED |                                 |
| deadline                         | DEADLINE_EXCEEDED  |                                 |
| no free worker (busy)            | UNAVAILABLE        | RetryInfo{retry_delay}          |
| TorchServe unreachable           | UNAVAILABLE        |                                 |
| wrong model name                 | NOT_FOUND          |                                 |
| anything else                    | INTERNAL           |                                 |
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..api.v1 import explain_pb2 as pb

TORCHSERVE_SUFFIX = "\norg.pytorch.serve"  # the exception class TorchServe appends to details
BUSY_RETRY_DELAY_S = 0.5  # RetryInfo: a busy worker frees up between requests, not in 10 ms
# "<field.path>: <what and the limit>" (service/errors.py InvalidRequest)
FIELD_MESSAGE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): (.+)$", re.S)
# TorchServe's HTTP statuses -> gRPC codes: its own GRPCUtils mapping, plus 507 (its REST code
# for the handler's 413, out of memory) and 503 (busy over REST).
HTTP_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
              413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
              507: grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class Failure(Exception):
    """Why an RPC failed, in gRPC terms. `field` is set for INVALID_ARGUMENT when the message
    names one; `retry_after_s` when asking again is the remedy (busy)."""

    code: grpc.StatusCode
    message: str
    field: str = ""
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @property
    def busy(self) -> bool:
        return self.retry_after_s is not None

    def to_status(self) -> grpc.Status:
        """The status to abort with: code, message and google.rpc details (grpc-status-details)."""
        status = status_pb2.Status(code=_rpc_code(self.code), message=self.message)
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=_description(self.message, self.field))
            status.details.append(_packed(error_details_pb2.BadRequest(
                field_violations=[violation])))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(round(self.retry_after_s * 1e9))
            status.details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
        return rpc_status.to_status(status)


def invalid(message: str) -> Failure:
    """INVALID_ARGUMENT; the field comes from the message's "<field>: ..." prefix, if any."""
    match = FIELD_MESSAGE.match(message)
    return Failure(grpc.StatusCode.INVALID_ARGUMENT, message, match.group(1) if match else "")


def busy(model: str) -> Failure:
    return Failure(grpc.StatusCode.UNAVAILABLE,
                   f"busy: model {model} has no worker free to serve this request right now "
                   f"(TorchServe refuses instead of queueing); retry in {BUSY_RETRY_DELAY_S} s",
                   retry_after_s=BUSY_RETRY_DELAY_S)


def from_grpc(code: grpc.StatusCode, details: str | None, model: str) -> Failure:
    """A failed call to TorchServe's InferenceAPIsService."""
    message = (details or "").split(TORCHSERVE_SUFFIX)[0]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid(message)
    if code == grpc.StatusCode.INTERNAL and "no worker" in message.lower():
        return busy(model)
    if code == grpc.StatusCode.INTERNAL and message.startswith("Model not found"):
        return Failure(grpc.StatusCode.NOT_FOUND, f"{message} (the gateway serves --model "
                       f"{model}; TorchServe does not know it)")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Failure(code, f"TorchServe's gRPC is unreachable: {message}")
    return Failure(code, message or code.name)


def from_http(status: int, body: bytes, model: str) -> Failure:
    """A failed POST /predictions/{model} (TorchServe's body: {"code", "type", "message"})."""
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body.decode(errors="replace").strip()
    if status == 503:
        return busy(model)
    if status == 400:
        return invalid(message)
    if status == 413 and not message:  # Netty's aggregator: the JSON body is over the limit
        message = ("request: too large once JSON-encoded for streaming (TorchServe's "
                   "max_request_size); see Describe's limits.max_image_bytes")
    code = HTTP_CODES.get(status, grpc.StatusCode.FAILED_PRECONDITION if 400 <= status < 500
                          else grpc.StatusCode.INTERNAL)
    return Failure(code, message or f"HTTP {status} from TorchServe")


def from_part_error(error: pb.Error) -> Failure:
    """A stream's PART_ERROR: the request failed after its answer had been sent."""
    if error.grpc_code == "INVALID_ARGUMENT":
        failure = invalid(error.message)
        failure.field = error.field or failure.field
        return failure
    code = getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL)
    return Failure(code, error.message)


def _rpc_code(code: grpc.StatusCode) -> int:
    return getattr(code_pb2, code.name)


def _description(message: str, field: str) -> str:
    prefix = f"{field}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _packed(detail) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed
