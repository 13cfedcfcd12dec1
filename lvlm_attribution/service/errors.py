"""Service errors: each carries the HTTP status TorchServe answers with (and so the gRPC code) and
the outcome label counted in `lvlm_requests_total`."""

from __future__ import annotations

# TorchServe's own mapping of a handler's status to gRPC codes (GRPCUtils.getGRPCStatusCode).
GRPC_CODES = {400: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED", 504: "DEADLINE_EXCEEDED",
              503: "UNAVAILABLE", 500: "INTERNAL"}


class ServiceError(Exception):
    status = 500  # TorchServe maps it: 400 -> INVALID_ARGUMENT, 413 -> RESOURCE_EXHAUSTED, ...
    outcome = "error"
    field = ""  # the request field to blame, when there is one

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def grpc_code(self) -> str:
        return GRPC_CODES.get(self.status, "INTERNAL")


class InvalidRequest(ServiceError):
    """Bad input; the message starts with the offending field's name."""

    status = 400
    outcome = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class OutOfMemory(ServiceError):
    """The device or host ran out of memory for this request; the worker stays up.
    TorchServe 0.12 answers a handler's 413 with gRPC RESOURCE_EXHAUSTED and, over REST, with
    507 Insufficient Storage (RestJob.sendError rewrites 413 to 507: its own out-of-resources
    code). 429 would invite blind retries."""

    status = 413
    outcome = "out_of_memory"


class ResponseTooLarge(InvalidRequest):
    """The options ask for a response above the size budget (TorchServe's max_response_size
    would otherwise kill the worker on the oversized frame). A 400: the same request fails the
    same way again; the message names the option to drop."""

    outcome = "response_too_large"


class DeadlineExceeded(ServiceError):
    """The request ran past its deadline (the caller's timeout_ms or the server's budget) and was
    stopped; the worker goes on serving. HTTP 504 / gRPC DEADLINE_EXCEEDED."""

    status = 504
    outcome = "deadline_exceeded"


class InternalError(ServiceError):
    status = 500
    outcome = "error"
