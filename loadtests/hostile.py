"""The hostile client: every request that once took the service down or got a 500, sent to a
real TorchServe over REST and gRPC, with what must happen instead.

Each `Case` builds one raw request per transport (bytes on the wire, no typed client in between,
so nothing is cleaned up before it reaches the server), says which outcome class is acceptable,
and after every case a valid request must be answered (the service survived). The integration
suite (tests/integration/test_hostile.py) asserts every case; this module's command writes the
table in docs/reliability.md from a private TorchServe:

    python -m loadtests.hostile --out docs/reliability.md      # ~2 min on 2 CPU cores

(--out replaces the text between the file's `<!-- hostile-table -->` markers, or writes the
table alone to a new file.)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import re
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format
from PIL import Image

from lvlm_attribution.api.torchserve import inference_pb2, inference_pb2_grpc
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.world.scenes import generate

MODEL = "lvlm"
SCENE = generate(3, "color")
ALL_BUT_IGOS = ["glimpse", "dexar", "raw_attention", "rollout", "gradcam", "tmme", "attngrad"]
LEAKS = re.compile(r"0x[0-9a-f]{6,}|Traceback|<[\w.]+ object at")  # addresses, reprs, stacks
# Outcome classes: what a caller sees, per transport.
OK, INVALID, DEADLINE, TOO_BIG = "ok", "invalid", "deadline", "request too large"
CANCELLED = "reset by the frontend"
CLASS_OF = {200: OK, 400: INVALID, 504: DEADLINE, 413: TOO_BIG, "OK": OK,
            "INVALID_ARGUMENT": INVALID, "DEADLINE_EXCEEDED": DEADLINE,
            "RESOURCE_EXHAUSTED": TOO_BIG, "CANCELLED": CANCELLED}


# ---- images -----------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def scene(size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.fromarray(SCENE.image)
    return image if size is None else image.resize(size, Image.NEAREST)


def noise(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def sixteen_bit_grey() -> bytes:
    grey = np.asarray(scene().convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    return encode(Image.fromarray(grey))  # PIL writes mode I;16 as a 16-bit PNG


def exif_rotated() -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 (viewers rotate it upright: 64x96)."""
    upright = scene((64, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95)


# ---- requests ---------------------------------------------------------------------------------
def request(**fields) -> pb.ExplainRequest:
    fields.setdefault("image", encode(scene()))
    fields.setdefault("question", SCENE.question)
    fields.setdefault("methods", ["dexar"])
    settings = fields.pop("method_settings", {})
    req = pb.ExplainRequest(**fields)
    for name, values in settings.items():
        req.method_settings[name].update(values)
    return req


@dataclass(frozen=True)
class Wire:
    """One raw request: for REST a body and its content type (or multipart fields), for gRPC
    the input map and the RPC."""

    body: bytes = b""
    content_type: str = "application/json"
    form: dict[str, bytes] | None = None
    grpc_input: dict[str, bytes] | None = None
    rpc: str = "Predictions"


def as_rest(req: pb.ExplainRequest) -> Wire:
    return Wire(body=json.dumps(json_format.MessageToDict(req)).encode())


def as_grpc(req: pb.ExplainRequest, rpc: str = "Predictions") -> Wire:
    return Wire(grpc_input={"request": req.SerializeToString()}, rpc=rpc)


def both(req: pb.ExplainRequest) -> dict[str, Wire]:
    return {"rest": as_rest(req), "grpc": as_grpc(req)}


def json_both(doc: object) -> dict[str, Wire]:
    raw = json.dumps(doc).encode()
    return {"rest": Wire(body=raw), "grpc": Wire(grpc_input={"request": raw})}


def nested(depth: int) -> bytes:
    doc = '{"question": "q", "method_settings": {"glimpse": {"x": ' + "[" * depth + "]" * depth
    return (doc + "}}}").encode()


def form(**fields: bytes) -> dict[str, Wire]:
    base = {"image": encode(scene()), "question": SCENE.question.encode(), **fields}
    return {"rest": Wire(form=base)}


@dataclass(frozen=True)
class Case:
    name: str
    wires: Callable[[], dict[str, Wire]]  # transport -> raw request (built lazily)
    expect: str  # outcome class
    says: str = ""  # the message must contain this (case-insensitive)
    check: Callable[[list[pb.ExplainResponse]], str | None] | None = None  # ok responses
    grpc_expect: str | None = None  # where gRPC's outcome class differs from REST's

    def expected(self, transport: str) -> str:
        return self.grpc_expect if transport == "grpc" and self.grpc_expect else self.expect


def _one_message_with_warning(parts: list[pb.ExplainResponse]) -> str | None:
    if len(parts) != 1 or not parts[0].heatmaps:
        return f"expected one complete message, got {len(parts)}"
    return None if "cannot stream" in " ".join(parts[0].warnings) else "no warning"


def _answer_first(parts: list[pb.ExplainResponse]) -> str | None:
    kinds = [p.part for p in parts]
    return None if kinds == [pb.ExplainResponse.PART_ANSWER, pb.ExplainResponse.PART_COMPLETE] \
        else f"parts {kinds}"


def _overlay_capped(parts: list[pb.ExplainResponse]) -> str | None:
    size = Image.open(io.BytesIO(parts[-1].heatmaps[0].overlay_png)).size
    return None if max(size) <= 1024 else f"overlay {size}"


def _upright(parts: list[pb.ExplainResponse]) -> str | None:
    size = (parts[-1].image_size.width, parts[-1].image_size.height)
    return None if size == (64, 96) else f"image_size {size}, expected the upright 64x96"


def _answers_like_8_bit(parts: list[pb.ExplainResponse]) -> str | None:
    return None if parts[-1].answer.strip() else "empty answer"


CASES: list[Case] = [
    Case("unary gRPC Predictions with stream=true",
         lambda: {"grpc": as_grpc(request(stream=True))}, OK, check=_one_message_with_warning),
    Case("gRPC StreamPredictions with stream=false",
         lambda: {"grpc": as_grpc(request(), "StreamPredictions")}, OK),
    Case("gRPC StreamPredictions with stream=true",
         lambda: {"grpc": as_grpc(request(stream=True), "StreamPredictions")}, OK,
         check=_one_message_with_warning),
    Case("REST stream=true (chunked)", lambda: {"rest": as_rest(request(stream=True))}, OK,
         check=_answer_first),
    Case("overlay on a 2000x2000 JPEG",
         lambda: both(request(image=encode(scene((2000, 2000)), "JPEG"),
                              heatmaps=pb.HeatmapOptions(overlay=True))), OK,
         check=_overlay_capped),
    Case("7 overlays of a 1400x1400 noise JPEG (response over budget)",
         lambda: both(request(image=encode(noise((1400, 1400)), "JPEG", quality=95),
                              methods=ALL_BUT_IGOS, heatmaps=pb.HeatmapOptions(overlay=True))),
         INVALID, "heatmaps.overlay: the response would be"),
    Case("igos iterations=60", lambda: both(request(methods=["igos"], method_settings={
        "igos": {"iterations": 60}})), INVALID, "exceeds the limit of 20"),
    Case("igos ig_iter=10000", lambda: both(request(methods=["igos"], method_settings={
        "igos": {"ig_iter": 10000}})), INVALID, "exceeds the limit of 32"),
    Case("igos iterations=20 with timeout_ms=400", lambda: both(request(
        methods=["igos"], timeout_ms=400, method_settings={"igos": {"iterations": 20}})),
         DEADLINE, "deadline is 0.4 s"),
    Case("500-character audit answer, per-token maps, 7 methods",
         lambda: both(request(answer=("the circle is blue " * 27)[:500], methods=ALL_BUT_IGOS,
                              heatmaps=pb.HeatmapOptions(per_token_maps=True))),
         INVALID, "tokens exceeds the limit of 64"),
    Case("64-token audit answer, per-token maps, 7 methods",
         lambda: both(request(answer=" ".join(["the circle is blue"] * 16),
                              methods=ALL_BUT_IGOS,
                              heatmaps=pb.HeatmapOptions(per_token_maps=True))), OK),
    *[Case(f"{w}x{h} image", lambda w=w, h=h: both(request(image=encode(scene((w, h)), "JPEG"))),
           OK) for w, h in ((65, 64), (96, 64), (640, 480))],
    Case("10000x10 image", lambda: both(request(image=encode(scene((10000, 10)), "JPEG"))),
         INVALID, "aspect ratio"),
    Case("16-bit greyscale PNG", lambda: both(request(image=sixteen_bit_grey())), OK,
         check=_answers_like_8_bit),
    Case("EXIF-rotated JPEG", lambda: both(request(image=exif_rotated())), OK, check=_upright),
    Case("corrupt image bytes", lambda: both(request(image=b"\x89PNG\r\n\x1a\n" + b"x" * 64)),
         INVALID, "image:"),
    Case('multipart max_new_tokens="²"', lambda: form(max_new_tokens="²".encode()), INVALID,
         "generation.max_new_tokens"),
    Case("multipart max_new_tokens of 5,000 digits", lambda: form(max_new_tokens=b"9" * 5000),
         INVALID, "at most 9 digits"),
    Case("JSON nested 5,000 deep",
         lambda: {"rest": Wire(body=nested(5000)), "grpc": Wire(grpc_input={
             "request": nested(5000)})}, INVALID, "nested too deeply"),
    Case("JSON nested 100,000 deep",
         lambda: {"rest": Wire(body=nested(100_000)), "grpc": Wire(grpc_input={
             "request": nested(100_000)})}, INVALID, "nested too deeply"),
    Case('"generation": [] (a list for a message)',
         lambda: json_both({"question": "q", "generation": []}), INVALID,
         "generation: expected an object"),
    # Over gRPC the same bytes are read as a (corrupt) protobuf ExplainRequest.
    Case("JSON body 42", lambda: json_both(42), INVALID, "malformed"),
    Case("JSON body null", lambda: json_both(None), INVALID, "malformed"),
    Case("image that is not base64", lambda: json_both({"image": "!!!!", "question": "q"}),
         INVALID, "image: not valid base64"),
    Case("method setting of the wrong type", lambda: both(request(methods=["igos"],
         method_settings={"igos": {"iterations": "many"}})), INVALID, "expected an integer"),
    Case("special token in the question",
         lambda: both(request(question="what <image> is the circle ?")), INVALID,
         "special token"),
    Case("request_id with a line break", lambda: both(request(request_id="a\nb")), INVALID,
         "request_id"),
    # Refused by TorchServe's frontend before the worker sees it: REST 413 with an empty body,
    # gRPC a reset stream (grpc-java's inbound limit). Neither reaches our code.
    Case("body over max_request_size (9 MB)",
         lambda: {"rest": Wire(body=b"{" + b" " * 9_000_000 + b"}"),
                  "grpc": Wire(grpc_input={"request": b" " * 9_000_000})}, TOO_BIG,
         grpc_expect=CANCELLED),
]


# ---- sending ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: int | str  # HTTP status or gRPC code name
    message: str
    seconds: float
    parts: list[pb.ExplainResponse] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return CLASS_OF.get(self.status, f"unexpected {self.status}")


@dataclass(frozen=True)
class Target:
    rest: str  # http://127.0.0.1:port
    grpc: str  # 127.0.0.1:port
    model: str = MODEL


def send(target: Target, transport: str, wire: Wire, timeout: float = 120.0) -> Outcome:
    started = time.perf_counter()
    status, message, parts = (_send_rest if transport == "rest" else _send_grpc)(
        target, wire, timeout)
    return Outcome(status, message, time.perf_counter() - started, parts)


def _send_rest(target: Target, wire: Wire, timeout: float):
    """http.client rather than urllib: TorchServe answers an oversized body with 413 and closes
    the connection before reading it all, and the response must still be read after the failed
    send (as curl does)."""
    if wire.form is not None:
        body, content_type = _multipart(wire.form)
    else:
        body, content_type = wire.body, wire.content_type
    url = urllib.parse.urlsplit(target.rest)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.putrequest("POST", f"/predictions/{target.model}")
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.send(body)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        try:
            message = json.loads(raw).get("message", "")
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace") or "(empty body)"
        return resp.status, message, []
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    return 200, "", [json_format.Parse(ln, pb.ExplainResponse(), ignore_unknown_fields=True)
                     for ln in lines]


def _send_grpc(target: Target, wire: Wire, timeout: float):
    with grpc.insecure_channel(target.grpc, options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        message = inference_pb2.PredictionsRequest(model_name=target.model,
                                                   input=wire.grpc_input or {})
        try:
            if wire.rpc == "StreamPredictions":
                replies = list(stub.StreamPredictions(message, timeout=timeout))
            else:
                replies = [stub.Predictions(message, timeout=timeout)]
        except grpc.RpcError as err:
            return err.code().name, (err.details() or "").split("\norg.pytorch")[0], []
    return "OK", "", [pb.ExplainResponse.FromString(r.prediction) for r in replies]


def _multipart(fields: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in fields.items():
        filename = '; filename="image.png"' if name == "image" else ""
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                      f'{filename}\r\n\r\n'.encode() + value + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def healthy_after(target: Target, transport: str, patience_s: float = 30.0) -> Outcome:
    """A valid request right after a case; a busy refusal (ticket not yet freed) is retried."""
    wire = (as_rest if transport == "rest" else as_grpc)(request())
    give_up = time.monotonic() + patience_s
    while True:
        outcome = send(target, transport, wire)
        busy = outcome.status == 503 or "no worker" in outcome.message.lower()
        if not busy or time.monotonic() > give_up:
            return outcome
        time.sleep(0.1)


@dataclass
class Row:
    case: str
    transport: str
    outcome: Outcome
    after: Outcome
    problem: str | None  # why the case failed, None when it behaved


def run_case(target: Target, case: Case, transport: str) -> Row:
    outcome = send(target, transport, case.wires()[transport])
    problem = None
    if outcome.kind != case.expected(transport):
        problem = (f"expected {case.expected(transport)}, got {outcome.status}: "
                   f"{outcome.message[:200]}")
    elif case.says and case.says.lower() not in outcome.message.lower():
        problem = f"message {outcome.message[:200]!r} does not say {case.says!r}"
    elif outcome.kind == OK and case.check is not None:
        problem = case.check(outcome.parts)
    elif LEAKS.search(outcome.message):
        problem = f"message leaks internals: {outcome.message[:200]!r}"
    after = healthy_after(target, transport)
    if problem is None and after.kind != OK:
        problem = f"the service did not answer afterwards: {after.status} {after.message}"
    return Row(case.name, transport, outcome, after, problem)


def cases_for(transport: str) -> list[Case]:
    return [c for c in CASES if transport in c.wires()]


# ---- the table --------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = ["| case | transport | status / code | message | latency | answers afterwards |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        message = (r.outcome.message or _ok_summary(r.outcome)).replace("|", "\\|")
        message = " ".join(message.split())[:140]
        after = f"yes ({r.after.seconds * 1000:.0f} ms)" if r.after.kind == OK else \
            f"NO ({r.after.status})"
        flag = "" if r.problem is None else f" **FAILED: {r.problem}**"
        lines.append(f"| {r.case} | {r.transport} | {r.outcome.status} | {message}{flag} | "
                     f"{r.outcome.seconds * 1000:.0f} ms | {after} |")
    return "\n".join(lines) + "\n"


def _ok_summary(outcome: Outcome) -> str:
    if not outcome.parts:
        return ""
    last = outcome.parts[-1]
    text = f"{len(outcome.parts)} message(s); answer {last.answer!r}"
    return text + (f"; warning: {last.warnings[0][:60]}…" if last.warnings else "")


def main(argv: list[str] | None = None) -> int:
    from .server import local_torchserve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    args = parser.parse_args(argv)
    rows = []
    with local_torchserve() as server:
        target = Target(server.rest, server.grpc)
        for transport in ("rest", "grpc"):
            for case in cases_for(transport):
                rows.append(run_case(target, case, transport))
                print(f"{case.name} [{transport}]: {rows[-1].outcome.status} "
                      f"{'ok' if rows[-1].problem is None else rows[-1].problem}",
                      file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out:
        write_table(args.out, text)
    return 0 if all(r.problem is None for r in rows) else 1


def write_table(path: Path, text: str) -> None:
    start, end = "<!-- hostile-table -->", "<!-- /hostile-table -->"
    doc = path.read_text() if path.exists() else ""
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        text = f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
