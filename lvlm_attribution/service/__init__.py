"""Transport-agnostic serving core: decode + validate a request, run the engine, encode the
response, and report what happened (outcome, stage timings) as metric observations.

Nothing here imports TorchServe: handlers/lvlm_handler.py adapts it to TorchServe, and the tests
call it directly.
"""

from .config import ServiceConfig
from .core import Call, ExplainService, Observation, Reply
from .errors import InternalError, InvalidRequest, OutOfMemory, ServiceError

__all__ = ["Call", "ExplainService", "InternalError", "InvalidRequest", "Observation",
           "OutOfMemory", "Reply", "ServiceConfig", "ServiceError"]
