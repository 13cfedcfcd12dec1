"""The only code that knows how TorchServe is called: its wrapper message and which API each RPC
takes.

- Explain and Describe -> TorchServe's gRPC `InferenceAPIsService/Predictions`, with the
  serialized ExplainRequest in input["request"] (or an empty input["describe"]); the prediction
  is the serialized ExplainResponse (DescribeResponse).
- ExplainStream -> TorchServe's REST `POST /predictions/{model}` with the proto3 JSON of the
  request (stream=true): HTTP/1.1 chunked, one ExplainResponse JSON per line. Not gRPC
  `StreamPredictions`, because TorchServe 0.12's raw gRPC cannot stream (measured: the frontend
  hands the handler the same message for Predictions and StreamPredictions, and an intermediate
  reply to a unary call leaves the model with a dead worker; docs/api.md "Streaming"), so the
  handler answers every gRPC request in one message.

Failures come out as `errors.Failure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import urllib.parse
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from ..api.torchserve import inference_pb2, inference_pb2_grpc
from ..api.v1 import explain_pb2 as pb
from ..api.v1 import explainer_pb2 as api
from . import errors
from .errors import Failure

# Streams read their HTTP response in threads (http.client): at most this many at once.
MAX_STREAMS = 64


class TorchServe:
    def __init__(self, grpc_target: str, rest_url: str, model: str, max_send_bytes: int,
                 max_receive_bytes: int) -> None:
        self.model = model
        self.grpc_target = grpc_target
        self.channel = grpc.aio.insecure_channel(grpc_target, options=[
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.max_receive_message_length", max_receive_bytes)])
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        url = urllib.parse.urlsplit(rest_url)
        self.rest_host, self.rest_port = url.hostname or "127.0.0.1", url.port or 80
        self.rest_path = f"{url.path.rstrip('/')}/predictions/{urllib.parse.quote(model)}"
        self.threads = ThreadPoolExecutor(MAX_STREAMS, thread_name_prefix="rest-stream")

    async def explain(self, request: pb.ExplainRequest, timeout: float) -> pb.ExplainResponse:
        reply = await self._predict({"request": request.SerializeToString()}, timeout)
        return _parsed(pb.ExplainResponse, reply)

    async def describe(self, timeout: float) -> api.DescribeResponse:
        return _parsed(api.DescribeResponse, await self._predict({"describe": b""}, timeout))

    async def open_stream(self, request: pb.ExplainRequest, timeout: float) -> RestStream:
        """POST the request and wait for the status line: a refusal (busy, bad input, ...)
        raises here, before any part; `timeout` bounds each wait for TorchServe."""
        body = json.dumps(json_format.MessageToDict(request)).encode()
        conn = http.client.HTTPConnection(self.rest_host, self.rest_port, timeout=timeout)
        loop = asyncio.get_running_loop()
        try:
            resp = await loop.run_in_executor(self.threads, self._post, conn, body)
            if resp.status != 200:
                raise errors.from_http(resp.status, await loop.run_in_executor(
                    self.threads, resp.read), self.model)
        except BaseException:
            _abort(conn)
            raise
        return RestStream(conn, resp, self.threads)

    async def close(self) -> None:
        await self.channel.close()
        self.threads.shutdown(wait=False, cancel_futures=True)

    async def _predict(self, payload: dict[str, bytes], timeout: float) -> bytes:
        message = inference_pb2.PredictionsRequest(model_name=self.model, input=payload)
        try:
            reply = await self.stub.Predictions(message, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise errors.from_grpc(err.code(), err.details(), self.model) from None
        return reply.prediction

    def _post(self, conn: http.client.HTTPConnection, body: bytes) -> http.client.HTTPResponse:
        try:
            conn.request("POST", self.rest_path, body=body,
                         headers={"Content-Type": "application/json"})
            return conn.getresponse()
        except TimeoutError:
            raise _timed_out() from None
        except OSError as err:
            raise Failure(grpc.StatusCode.UNAVAILABLE, f"TorchServe's REST API at "
                          f"{self.rest_host}:{self.rest_port} is unreachable: {err}") from None


class RestStream:
    """The parts of one streamed response (PART_ANSWER, then PART_COMPLETE or PART_ERROR).
    `close()` ends it early, also waking a read still blocked in its thread."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 threads: ThreadPoolExecutor) -> None:
        self.conn, self.resp, self.threads = conn, resp, threads

    async def __aiter__(self) -> AsyncIterator[pb.ExplainResponse]:
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(self.threads, _readline, self.resp):
            if line.strip():
                yield _parsed_json(line)

    def close(self) -> None:
        _abort(self.conn)


def _readline(resp: http.client.HTTPResponse) -> bytes:
    try:
        return resp.readline()
    except TimeoutError:
        raise _timed_out() from None
    except (OSError, http.client.HTTPException) as err:
        # The 200 and perhaps the answer are out: the worker died or the connection broke.
        raise Failure(grpc.StatusCode.INTERNAL, f"the stream from TorchServe ended early "
                      f"({err or type(err).__name__}); its log has the cause") from None


def _abort(conn: http.client.HTTPConnection) -> None:
    if conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def _timed_out() -> Failure:
    return Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "TorchServe did not answer within the "
                   "call's deadline")


def _parsed(kind, raw: bytes):
    try:
        return kind.FromString(raw)
    except DecodeError:
        raise Failure(grpc.StatusCode.INTERNAL, f"TorchServe's reply ({len(raw)} bytes) is not "
                      f"a {kind.DESCRIPTOR.name}: does the model run handlers/lvlm_handler.py?"
                      ) from None


def _parsed_json(line: bytes) -> pb.ExplainResponse:
    try:
        return json_format.Parse(line, pb.ExplainResponse(), ignore_unknown_fields=True)
    except json_format.ParseError as err:
        raise Failure(grpc.StatusCode.INTERNAL, f"TorchServe streamed a line that is not an "
                      f"ExplainResponse: {err}") from None
