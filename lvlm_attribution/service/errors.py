"""Service errors: each carries the HTTP status TorchServe answers with (and so the gRPC code) and
the outcome label counted in `lvlm_requests_total`."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500  # TorchServe maps it: 400 -> INVALID_ARGUMENT, 413 -> RESOURCE_EXHAUSTED, ...
    outcome = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class InternalError(ServiceError):
    status = 500
    outcome = "error"
