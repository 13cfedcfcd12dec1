"""Bounded asyncio load generator for the LVLM Attribution Service (REST and gRPC).

One thread, one event loop: REST through a minimal HTTP/1.1 client on asyncio streams (so that a
test can also send a body slowly, read a response slowly, and time the first chunk of a streamed
response), gRPC through grpc.aio on TorchServe's InferenceAPIsService.

Every request ends as exactly one `Result`: `kind == "ok"` or an error kind
`<transport>_<status>:<class>` (e.g. `http_503:no_free_worker`, `grpc_INVALID_ARGUMENT:image`,
`http_conn:ConnectionResetError`), so a run can prove that nothing was silently dropped:
`sent == ok + errors` and every error has a kind.

Traffic goes to loopback addresses only unless `allow_non_loopback` is set explicitly, and every
loop is bounded by a request count and a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import random
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from lvlm_attribution.api.v1 import explain_pb2 as pb

MODEL = "lvlm"
GRPC_MAX_MESSAGE = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 130.0  # just above the shipped responseTimeout (120 s)

# Message classes, first match wins. TorchServe's own messages first, then the handler's
# "<field>: <what and the limit>" convention (docs/api.md, Errors).
_CLASSES: list[tuple[str, re.Pattern]] = [
    ("no_free_worker", re.compile(r"has no worker|no worker|job queue|queue is full", re.I)),
    ("worker_died", re.compile(r"worker died", re.I)),
    ("timeout", re.compile(r"timed? ?out|deadline", re.I)),
    ("too_large", re.compile(r"too large|exceeds maximum|message size|larger than max|"
                             r"request entity", re.I)),
    ("out_of_memory", re.compile(r"out of memory", re.I)),
    # grpc-java resets the stream of a message over max_request_size (seen as CANCELLED).
    ("stream_reset", re.compile(r"RST_STREAM", re.I)),
]
_FIELD = re.compile(r"^\s*([A-Za-z_][\w.]*):")


def message_class(message: str) -> str:
    for name, pattern in _CLASSES:
        if pattern.search(message or ""):
            return name
    m = _FIELD.match(message or "")
    if m:
        return m.group(1)  # the handler names the field: image, question, body, request, ...
    return "other"


_EMPTY_MESSAGE_CLASS = {413: "too_large", 408: "timeout", 504: "timeout"}


def error_kind(transport: str, status: int | str, message: str) -> str:
    prefix = "http" if transport == "rest" else "grpc"
    cls = message_class(message) if message.strip() else _EMPTY_MESSAGE_CLASS.get(status,
                                                                                    "no_message")
    return f"{prefix}_{status}:{cls}"


def is_rejection(kind: str) -> bool:
    """A request refused because no worker was free (job ticket / full queue): retryable."""
    return kind.startswith(("http_503:", "grpc_UNAVAILABLE:")) or kind.endswith(":no_free_worker")


def check_loopback(host: str, allow_non_loopback: bool = False) -> None:
    if allow_non_loopback:
        return
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"refusing to send load to {host!r}: loopback only (127.0.0.1, "
                         "::1, localhost; kubectl port-forward for a cluster) unless "
                         "--allow-non-loopback is given")


# ------------------------------------------------------------------------------------------------
# Payloads
# ------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """One request to send: the same ExplainRequest for REST (JSON) and gRPC (protobuf)."""

    label: str  # "normal" or the malformation's name
    rest_body: bytes | None = None
    rest_content_type: str = "application/json"
    grpc_input: dict[str, bytes] | None = None
    expect: str = "ok"  # "ok", "4xx" (any client-error class) or an error-kind prefix
    expect_grpc: str = ""  # a different expectation over gRPC, when needed
    methods: int = 2  # heatmaps expected in a successful response
    stream: bool = False


def png_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def request_specs(n: int, methods: Sequence[str] = (), stream: bool = True, seed: int = 0,
                  default_methods: int = 2,
                  images: Sequence[tuple[bytes, str]] = ()) -> list[Spec]:
    """n realistic requests about distinct scenes of the embedded model's world, or about the
    given (image file bytes, question) pairs (for a real model on a GPU pod)."""
    from google.protobuf import json_format

    from lvlm_attribution.world.scenes import generate

    specs = []
    for i in range(n):
        if images:
            image, question = images[i % len(images)]
        else:
            sample = generate(seed + i)
            image, question = png_bytes(sample.image), sample.question
        req = pb.ExplainRequest(image=image, question=question, methods=list(methods),
                                stream=stream, request_id=f"load-{seed + i}")
        specs.append(Spec("normal", json.dumps(json_format.MessageToDict(req)).encode(),
                          grpc_input={"request": req.SerializeToString()},
                          methods=len(methods) or default_methods, stream=stream))
    return specs


def malformed_specs(max_request_size: int = 8388608, max_image_bytes: int = 4000000,
                    include_large: bool = True) -> list[Spec]:
    """Requests the service must reject with a 4xx / INVALID_ARGUMENT-class status."""
    from lvlm_attribution.world.scenes import generate

    sample = generate(12345, "color")
    good = png_bytes(sample.image)

    def rest(req: dict) -> bytes:
        return json.dumps(req).encode()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    def grpc(req: pb.ExplainRequest) -> dict[str, bytes]:
        return {"request": req.SerializeToString()}

    q = sample.question
    specs = [
        Spec("bad_json", b'{"image": "', expect="http_400"),
        Spec("not_an_object", b"[1, 2, 3]", expect="http_400"),
        Spec("unknown_field", rest({"image": b64(good), "question": q, "bogus": 1}),
             expect="http_400"),
        Spec("corrupt_image", rest({"image": b64(b"GIF89a-not-really"), "question": q}),
             grpc_input=grpc(pb.ExplainRequest(image=b"GIF89a-not-really", question=q)),
             expect="4xx"),
        Spec("blank_question", rest({"image": b64(good), "question": "   "}),
             grpc_input=grpc(pb.ExplainRequest(image=good, question="   ")), expect="4xx"),
        Spec("unknown_method", rest({"image": b64(good), "question": q, "methods": ["nope"]}),
             grpc_input=grpc(pb.ExplainRequest(image=good, question=q, methods=["nope"])),
             expect="4xx"),
        Spec("too_many_tokens", rest({"image": b64(good), "question": q,
                                      "generation": {"maxNewTokens": 10_000}}),
             grpc_input=grpc(pb.ExplainRequest(image=good, question=q,
                                               generation=pb.GenerationOptions(
                                                   max_new_tokens=10_000))),
             expect="4xx"),
        Spec("malformed_protobuf", None, grpc_input={"request": b"\xff\xff\xff\xff garbage"},
             expect="grpc_INVALID_ARGUMENT"),
        Spec("missing_request_key", None, grpc_input={"data": b"x"},
             expect="grpc_INVALID_ARGUMENT"),
        Spec("empty_body", b"", expect="http_400"),
    ]
    if include_large:
        # A valid-looking image just over max_image_bytes (inside max_request_size as base64).
        big = b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(max_image_bytes - 7)
        specs.append(Spec("image_over_limit", rest({"image": b64(big), "question": q}),
                          grpc_input=grpc(pb.ExplainRequest(image=big, question=q)),
                          expect="4xx"))
        # Over max_request_size: refused by TorchServe's frontend before any worker sees it:
        # HTTP 413; over gRPC, grpc-java resets the stream (CANCELLED, "RST_STREAM ... code 8").
        huge = random.Random(2).randbytes(max_request_size + 1024)
        specs.append(Spec("request_over_limit", rest({"image": b64(huge), "question": q}),
                          grpc_input=grpc(pb.ExplainRequest(image=huge, question=q)),
                          expect="http_413", expect_grpc="grpc_CANCELLED:stream_reset"))
    return specs


def expectation_met(spec: Spec, transport: str, kind: str) -> bool:
    expect = spec.expect_grpc if transport == "grpc" and spec.expect_grpc else spec.expect
    if expect == "ok":
        return kind == "ok"
    if expect == "4xx":
        if transport == "rest":
            return bool(re.match(r"http_4\d\d:", kind))
        return kind.startswith(("grpc_INVALID_ARGUMENT:", "grpc_RESOURCE_EXHAUSTED:",
                                "grpc_FAILED_PRECONDITION:", "grpc_OUT_OF_RANGE:"))
    return kind.startswith(expect if ":" in expect else expect + ":")


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    transport: str
    label: str
    kind: str  # "ok" or an error kind
    message: str = ""
    start: float = 0.0  # seconds since the run's t0
    latency: float = 0.0  # logical request: first attempt's start -> final outcome
    first_part: float | None = None  # logical start -> first streamed message
    service_latency: float = 0.0  # the last attempt alone
    attempts: int = 1
    rejected: list[str] = field(default_factory=list)  # kinds of the retried rejections
    request_bytes: int = 0
    response_bytes: int = 0
    expected: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Attempt:
    kind: str
    message: str = ""
    first_part: float | None = None  # seconds after the attempt's start
    elapsed: float = 0.0
    response_bytes: int = 0


def check_response(parts: list[bytes], spec: Spec, transport: str) -> str:
    """'' when the (final) response is a complete answer with the expected heatmaps."""
    if not parts:
        return "empty response"
    last = parts[-1]
    try:
        if transport == "rest":
            doc = json.loads(last)
            answer, heatmaps, part = doc.get("answer"), doc.get("heatmaps", []), doc.get("part")
            complete = part in (None, "PART_COMPLETE")
        else:
            msg = pb.ExplainResponse.FromString(last)
            answer, heatmaps = msg.answer, list(msg.heatmaps)
            complete = msg.part in (pb.ExplainResponse.PART_UNSPECIFIED,
                                    pb.ExplainResponse.PART_COMPLETE)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad response
        return f"unparseable response ({type(err).__name__})"
    # TorchServe's raw gRPC cannot stream (docs/reliability.md): one PART_COMPLETE message.
    wanted = 2 if transport == "rest" else 1
    if spec.stream and (len(parts) < wanted or not complete):
        return f"stream incomplete ({len(parts)} parts, complete={complete})"
    if not answer:
        return "no answer"
    if len(heatmaps) != spec.methods:
        return f"{len(heatmaps)} heatmaps, expected {spec.methods}"
    return ""


# ------------------------------------------------------------------------------------------------
# REST: a minimal HTTP/1.1 client on asyncio streams
# ------------------------------------------------------------------------------------------------


@dataclass
class HttpOptions:
    timeout: float = DEFAULT_TIMEOUT_S
    expect_continue_above: int = 1 << 20  # bodies above this wait for "100 Continue" (as curl)
    send_chunk: int = 0  # >0: send the body in pieces of this size ...
    send_pause: float = 0.0  # ... with this pause between pieces (a slow uploader)
    read_pause: float = 0.0  # pause after the status line before reading the body
    recv_buffer: int = 0  # >0: SO_RCVBUF, so a slow reader really pushes back
    on_status: Callable[[int], None] | None = None  # called once the status line is in


class _Conn(asyncio.Protocol):
    """A client connection that keeps every byte it received even when the peer then resets
    the connection (asyncio's StreamReader raises the reset and drops buffered data: TorchServe
    answers some requests, e.g. a 503 after a slow upload, and then resets)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed: BaseException | bool = False
        self.more = asyncio.Event()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.transport: asyncio.Transport | None = None

    # protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.more.set()

    def eof_received(self) -> bool:
        self.closed = True
        self.more.set()
        return False

    def connection_lost(self, exc) -> None:
        self.closed = exc or True
        self.more.set()
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # client side
    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError(f"connection closed while sending ({self._why()})")
        self.transport.write(data)
        await self.can_write.wait()

    def _why(self) -> str:
        return f"{type(self.closed).__name__}: {self.closed}" \
            if isinstance(self.closed, BaseException) else "closed by the server"

    async def _fill(self) -> None:
        if self.closed:
            raise ConnectionError(self._why())
        self.more.clear()
        await self.more.wait()

    async def readline(self) -> bytes:
        while (i := self.buf.find(b"\n")) < 0:
            if self.closed:
                line, self.buf = bytes(self.buf), bytearray()
                return line  # b"" at a clean end
            await self._fill()
        line, self.buf = bytes(self.buf[:i + 1]), self.buf[i + 1:]
        return line

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return data

    async def read_all(self) -> bytes:
        while not self.closed:
            await self._fill()
        data, self.buf = bytes(self.buf), bytearray()
        return data


class StreamCut(ConnectionError):
    """The status line was received but the body did not arrive complete."""

    def __init__(self, status: int, chunks: list[bytes], cause: str) -> None:
        super().__init__(f"response body cut after {len(chunks)} chunk(s): {cause}")
        self.status, self.chunks = status, chunks


async def _open(host: str, port: int, recv_buffer: int) -> _Conn:
    loop = asyncio.get_running_loop()
    sock = None
    if recv_buffer:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        _, conn = await loop.create_connection(_Conn, sock=sock)
    else:
        _, conn = await loop.create_connection(_Conn, host, port)
    return conn


async def http_post(url: str, body: bytes, content_type: str, opts: HttpOptions,
                    on_part: Callable[[], None] | None = None) -> tuple[int, list[bytes]]:
    """POST with `Connection: close`; returns (status, body chunks). Chunked bodies keep their
    chunks (TorchServe sends each streamed message as one); `on_part` fires on the first one."""
    u = urlsplit(url)
    conn = await _open(u.hostname, u.port or 80, opts.recv_buffer)
    try:
        expect = 0 < opts.expect_continue_above < len(body)
        head = (f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                + ("Expect: 100-continue\r\n" if expect else "")
                + "Connection: close\r\n\r\n").encode()
        await conn.write(head)
        status_line = b""
        if expect:
            # A large body waits for "100 Continue": a request over max_request_size then gets
            # its 413 cleanly instead of a connection reset in the middle of the upload.
            with contextlib.suppress(TimeoutError):
                status_line = await asyncio.wait_for(conn.readline(), 2.0)
            if status_line.split()[1:2] == [b"100"]:
                while (await conn.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                status_line = b""

        async def send() -> None:
            if status_line:
                return  # the server already answered: the body is not wanted
            step = opts.send_chunk if opts.send_chunk > 0 else len(body) or 1
            for i in range(0, len(body), step):
                await conn.write(body[i:i + step])
                if opts.send_chunk > 0:
                    await asyncio.sleep(opts.send_pause)

        sender = asyncio.create_task(send())
        if not status_line:
            status_line = await conn.readline()
        if not sender.done():
            sender.cancel()  # the server answered before reading the whole body (e.g. 413)
        try:
            await sender
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # we are being cancelled, not just the sender
        except ConnectionError as err:
            if not status_line:
                raise ConnectionError(f"{err} (nothing received)") from err
        if not status_line:
            raise ConnectionError("connection closed without a response")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while True:
            line = await conn.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if opts.on_status:
            opts.on_status(status)
        if opts.read_pause:
            conn.transport.pause_reading()  # a slow reader: the socket buffer fills up
            await asyncio.sleep(opts.read_pause)
            conn.transport.resume_reading()
        chunks: list[bytes] = []
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                while True:
                    size_line = await conn.readline()
                    if not size_line:
                        raise ConnectionError("connection closed")
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        await conn.readline()
                        break
                    data = await conn.readexactly(size + 2)
                    if not chunks and on_part:
                        on_part()
                    chunks.append(data[:-2])
            elif "content-length" in headers:
                chunks.append(await conn.readexactly(int(headers["content-length"])))
                if on_part:
                    on_part()
            else:
                chunks.append(await conn.read_all())
        except (ConnectionError, ValueError) as err:
            raise StreamCut(status, chunks, str(err)) from err
        return status, chunks
    finally:
        if conn.transport is not None:
            conn.transport.close()


def _split_stream(chunks: list[bytes]) -> list[bytes]:
    """A streamed REST body is one JSON document per line; chunks may merge or split lines."""
    return [line for line in b"".join(chunks).split(b"\n") if line.strip()]


async def rest_attempt(url: str, spec: Spec, opts: HttpOptions) -> Attempt:
    t0 = time.perf_counter()
    first: list[float] = []

    def mark() -> None:
        first.append(time.perf_counter() - t0)

    try:
        status, chunks = await asyncio.wait_for(
            http_post(url, spec.rest_body or b"", spec.rest_content_type, opts, mark),
            opts.timeout)
    except TimeoutError:
        return Attempt("http_timeout:client_timeout", f"no complete response in {opts.timeout} s",
                       first[0] if first else None, time.perf_counter() - t0)
    except StreamCut as err:
        # Status and (for a stream) the answer are out; TorchServe can only cut the connection.
        return Attempt(f"http_{err.status}:stream_interrupted", str(err)[:300],
                       first[0] if first else None, time.perf_counter() - t0,
                       sum(len(c) for c in err.chunks))
    except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
        return Attempt(f"http_conn:{type(err).__name__}", str(err)[:300],
                       first[0] if first else None, time.perf_counter() - t0)
    elapsed = time.perf_counter() - t0
    size = sum(len(c) for c in chunks)
    if status != 200:
        raw = b"".join(chunks)
        try:
            message = str(json.loads(raw).get("message", ""))
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace")
        return Attempt(error_kind("rest", status, message), message[:300], None, elapsed, size)
    parts = _split_stream(chunks) if spec.stream else [b"".join(chunks)]
    problem = check_response(parts, spec, "rest")
    if problem:
        return Attempt("http_200:bad_response", problem, first[0] if first else None, elapsed,
                       size)
    return Attempt("ok", "", first[0] if first else elapsed, elapsed, size)


# ------------------------------------------------------------------------------------------------
# gRPC
# ------------------------------------------------------------------------------------------------


class GrpcTarget:
    """An aio channel + stub; create inside the running event loop."""

    def __init__(self, target: str) -> None:
        import grpc

        from lvlm_attribution.api.torchserve import inference_pb2, inference_pb2_grpc

        self.grpc = grpc
        self.pb = inference_pb2
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)])
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()


def _batch_item_error(parts: list[bytes]):
    try:
        msg = pb.ExplainResponse.FromString(parts[-1]) if parts else None
    except Exception:  # noqa: BLE001 - check_response reports unparseable replies
        return None
    return msg.error if msg is not None and msg.part == pb.ExplainResponse.PART_ERROR else None


def grpc_kind(code_name: str, details: str) -> tuple[str, str]:
    details = (details or "").split("\norg.pytorch.serve")[0]
    # The client's own deadline, whatever the transport said last ("Deadline Exceeded", or a
    # stream reset when the deadline hit while the stream was open).
    cls = "timeout" if code_name == "DEADLINE_EXCEEDED" else message_class(details)
    return f"grpc_{code_name}:{cls}", details[:300]


async def grpc_attempt(target: GrpcTarget, spec: Spec, timeout: float,
                       read_pause: float = 0.0,
                       on_first: Callable[[], None] | None = None) -> Attempt:
    t0 = time.perf_counter()
    first: float | None = None
    parts: list[bytes] = []
    req = target.pb.PredictionsRequest(model_name=MODEL, input=spec.grpc_input or {})
    try:
        if spec.stream:
            call = target.stub.StreamPredictions(req, timeout=timeout)
            async for reply in call:
                if first is None:
                    first = time.perf_counter() - t0
                    if on_first:
                        on_first()
                    if read_pause:
                        await asyncio.sleep(read_pause)
                parts.append(reply.prediction)
        else:
            reply = await target.stub.Predictions(req, timeout=timeout)
            parts.append(reply.prediction)
    except target.grpc.aio.AioRpcError as err:
        kind, message = grpc_kind(err.code().name, err.details())
        return Attempt(kind, message, first, time.perf_counter() - t0,
                       sum(len(p) for p in parts))
    elapsed = time.perf_counter() - t0
    size = sum(len(p) for p in parts)
    error = _batch_item_error(parts)
    if error is not None:  # a batch item's error, which TorchServe's gRPC sends as OK
        kind, message = grpc_kind(error.grpc_code or "INTERNAL", error.message)
        return Attempt(kind, message, first, elapsed, size)
    problem = check_response(parts, spec, "grpc")
    if problem:
        return Attempt("grpc_OK:bad_response", problem, first, elapsed, size)
    return Attempt("ok", "", first if first is not None else elapsed, elapsed, size)


# ------------------------------------------------------------------------------------------------
# Requests with retries on rejection, and closed-loop virtual users
# ------------------------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """Clients retry "no free worker" rejections (HTTP 503 / gRPC UNAVAILABLE-class) with
    jittered exponential backoff, as docs/operations.md asks of them; 1 attempt = no retry."""

    max_attempts: int = 1
    base_s: float = 0.05
    cap_s: float = 1.0

    def pause(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.5, 1.0) * min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 30))


@dataclass
class Client:
    transport: str  # "rest" | "grpc"
    rest_url: str = ""  # http://127.0.0.1:8080/predictions/lvlm
    grpc: GrpcTarget | None = None
    http: HttpOptions = field(default_factory=HttpOptions)
    grpc_timeout: float = DEFAULT_TIMEOUT_S
    grpc_read_pause: float = 0.0
    grpc_on_first: Callable[[], None] | None = None

    def supports(self, spec: Spec) -> bool:
        return (spec.rest_body is not None) if self.transport == "rest" \
            else spec.grpc_input is not None

    def request_bytes(self, spec: Spec) -> int:
        if self.transport == "rest":
            return len(spec.rest_body or b"")
        return sum(len(k) + len(v) for k, v in (spec.grpc_input or {}).items())

    async def attempt(self, spec: Spec) -> Attempt:
        if self.transport == "rest":
            return await rest_attempt(self.rest_url, spec, self.http)
        return await grpc_attempt(self.grpc, spec, self.grpc_timeout, self.grpc_read_pause,
                                  self.grpc_on_first)


async def send(client: Client, spec: Spec, t0: float, retry: RetryPolicy | None = None,
               give_up_at: float | None = None, rng: random.Random | None = None) -> Result:
    """One logical request: attempts until accepted, a non-rejection outcome, max_attempts, or
    `give_up_at` (perf_counter); always returns exactly one Result."""
    retry = retry or RetryPolicy()
    rng = rng or random.Random()
    start = time.perf_counter()
    rejected: list[str] = []
    attempt_start = start
    n = 0
    while True:
        n += 1
        attempt_start = time.perf_counter()
        try:
            a = await client.attempt(spec)
        except Exception as err:  # noqa: BLE001 - a client bug must still be accounted for
            a = Attempt(f"client_error:{type(err).__name__}", str(err)[:300], None,
                        time.perf_counter() - attempt_start)
        if not (is_rejection(a.kind) and n < retry.max_attempts):
            break
        pause = retry.pause(n, rng)
        if give_up_at is not None and time.perf_counter() + pause > give_up_at:
            break
        rejected.append(a.kind)
        await asyncio.sleep(pause)
    end = time.perf_counter()
    first = None if a.first_part is None else (attempt_start - start) + a.first_part
    return Result(client.transport, spec.label, a.kind, a.message, start - t0, end - start, first,
                  a.elapsed, n, rejected, client.request_bytes(spec), a.response_bytes,
                  expectation_met(spec, client.transport, a.kind))


@dataclass
class StepConfig:
    concurrency: int
    duration_s: float  # no new request starts after this
    max_requests: int  # nor after this many
    retry: RetryPolicy = field(default_factory=RetryPolicy)


async def closed_loop(make_client: Callable[[], Client], specs: Sequence[Spec], step: StepConfig,
                      t0: float | None = None, seed: int = 0,
                      pick: Callable[[int, random.Random], Spec] | None = None) -> list[Result]:
    """`concurrency` virtual users, each sending its next request when the previous one ended.
    Bounded by duration (no new logical request, no retry after it) and by max_requests; the
    requests in flight at the deadline complete (each bounded by its own timeout)."""
    t0 = time.perf_counter() if t0 is None else t0
    deadline = time.perf_counter() + step.duration_s
    budget = {"left": step.max_requests, "i": 0}
    results: list[Result] = []

    async def user(uid: int) -> None:
        rng = random.Random(seed * 1000 + uid)
        client = make_client()
        try:
            while time.perf_counter() < deadline and budget["left"] > 0:
                budget["left"] -= 1
                i = budget["i"]
                budget["i"] += 1
                spec = pick(i, rng) if pick else specs[i % len(specs)]
                result = await send(client, spec, t0, step.retry, deadline, rng)
                results.append(result)
                if is_rejection(result.kind) and step.retry.max_attempts > 1:
                    break  # still refused when the step ended: this user is done
        finally:
            if client.grpc is not None:
                await client.grpc.close()

    await asyncio.gather(*(user(u) for u in range(step.concurrency)))
    return results


def make_client_factory(transport: str, rest: str = "", grpc_target: str = "",
                        http: HttpOptions | None = None,
                        grpc_timeout: float = DEFAULT_TIMEOUT_S) -> Callable[[], Client]:
    """Factory for `closed_loop` (call it inside the event loop)."""

    def make() -> Client:
        if transport == "rest":
            return Client("rest", rest_url=f"{rest.rstrip('/')}/predictions/{MODEL}",
                          http=http or HttpOptions())
        return Client("grpc", grpc=GrpcTarget(grpc_target), grpc_timeout=grpc_timeout)

    return make
