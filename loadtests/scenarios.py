"""Fault scenarios against a running TorchServe (see tests/test_load_faults.py, docs/load.md).

Each scenario returns a `Traffic`: every logical request it started and exactly one `Result` for
each, so the tests can assert that nothing was silently dropped.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import loadgen
from .loadgen import Client, HttpOptions, Result, RetryPolicy, Spec
from .server import LocalServer, _cmdline

PATIENT = RetryPolicy(max_attempts=10_000)  # retry rejections until the scenario's give-up time


@dataclass
class Traffic:
    t0: float = field(default_factory=time.perf_counter)
    sent: int = 0
    results: list[Result] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    async def send(self, client: Client, spec: Spec, retry: RetryPolicy = PATIENT,
                   give_up_at: float | None = None, rng: random.Random | None = None) -> Result:
        self.sent += 1
        result = await loadgen.send(client, spec, self.t0, retry, give_up_at, rng)
        self.results.append(result)
        return result

    def by_label(self, label: str) -> list[Result]:
        return [r for r in self.results if r.label == label]

    def kinds(self, results: Sequence[Result] | None = None) -> Counter:
        return Counter(r.kind for r in (self.results if results is None else results))

    def accounting_problems(self) -> list[str]:
        problems = []
        ok = sum(1 for r in self.results if r.kind == "ok")
        errors = sum(1 for r in self.results if r.kind != "ok")
        if self.sent != len(self.results) or self.sent != ok + errors:
            problems.append(f"sent {self.sent} != ok {ok} + errors {errors}")
        unkinded = [r for r in self.results if not r.kind or r.kind.endswith(":")]
        if unkinded:
            problems.append(f"{len(unkinded)} results without an error kind")
        return problems

    def summary(self) -> str:
        return (f"sent={self.sent} ok={sum(r.kind == 'ok' for r in self.results)} "
                f"kinds={dict(self.kinds())}")


def client(server: LocalServer, transport: str, http: HttpOptions | None = None,
           grpc_timeout: float = loadgen.DEFAULT_TIMEOUT_S) -> Client:
    """Create inside the event loop (gRPC aio channel)."""
    return loadgen.make_client_factory(transport, server.rest, server.grpc, http, grpc_timeout)()


async def close(*clients: Client) -> None:
    for c in clients:
        if c.grpc is not None:
            await c.grpc.close()


async def normal_user(traffic: Traffic, c: Client, specs: Sequence[Spec], until: float,
                      give_up_at: float, seed: int, max_requests: int = 1000) -> None:
    """Closed loop: no new request after `until` (perf_counter), no retry after `give_up_at`."""
    rng = random.Random(seed)
    i = seed
    for _ in range(max_requests):
        if time.perf_counter() >= until:
            break
        await traffic.send(c, specs[i % len(specs)], PATIENT, give_up_at, rng)
        i += 1


async def alternating_user(traffic: Traffic, clients: Sequence[Client], specs: Sequence[Spec],
                           until: float, give_up_at: float, seed: int,
                           max_requests: int = 1000) -> None:
    """One closed-loop user that alternates between transports (REST, gRPC, REST, ...): its
    requests never compete with each other for the one worker."""
    rng = random.Random(seed)
    for i in range(max_requests):
        if time.perf_counter() >= until:
            break
        await traffic.send(clients[i % len(clients)], specs[(seed + i) % len(specs)], PATIENT,
                           give_up_at, rng)


# ------------------------------------------------------------------------------------------------
# (c) malformed and oversized requests mixed into normal load
# ------------------------------------------------------------------------------------------------


async def mixed_malformed(server: LocalServer, seconds: float, include_large: bool = True,
                          transports: Sequence[str] = ("rest", "grpc")) -> Traffic:
    """One normal closed-loop user per transport for `seconds`, while one more user per
    transport sends every malformed request once (retrying only "no free worker")."""
    traffic = Traffic()
    normal = loadgen.request_specs(16, stream=True, seed=500)
    bad = loadgen.malformed_specs(include_large=include_large)
    until = time.perf_counter() + seconds
    give_up_at = until + 90.0
    clients = [client(server, t) for t in transports for _ in range(2)]

    async def bad_user(c: Client, seed: int) -> None:
        rng = random.Random(seed)
        for spec in bad:
            if c.supports(spec):
                await traffic.send(c, spec, PATIENT, give_up_at, rng)
                await asyncio.sleep(0.1)

    try:
        jobs = []
        for k in range(len(transports)):
            jobs.append(normal_user(traffic, clients[2 * k], normal, until, give_up_at, 10 + k))
            jobs.append(bad_user(clients[2 * k + 1], 20 + k))
        await asyncio.gather(*jobs)
    finally:
        await close(*clients)
    return traffic


# ------------------------------------------------------------------------------------------------
# (b) beyond capacity: a burst, no retries
# ------------------------------------------------------------------------------------------------


async def burst(server: LocalServer, per_transport: int,
                transports: Sequence[str] = ("rest", "grpc")) -> Traffic:
    """`per_transport` unary requests per transport, all at once, never retried."""
    traffic = Traffic()
    specs = loadgen.request_specs(per_transport, stream=False, seed=700)
    clients = [client(server, t) for t in transports for _ in range(per_transport)]
    try:
        # Connected first, so that the burst measures the server, not HTTP/2 set-up.
        await asyncio.gather(*(asyncio.wait_for(c.grpc.channel.channel_ready(), 30)
                               for c in clients if c.grpc is not None))
        await asyncio.gather(*(traffic.send(c, specs[i % per_transport], RetryPolicy(1))
                               for i, c in enumerate(clients)))
    finally:
        await close(*clients)
    return traffic


# ------------------------------------------------------------------------------------------------
# (d) client deadlines shorter than the work
# ------------------------------------------------------------------------------------------------


async def short_deadlines(server: LocalServer, rounds: int = 2, deadline_s: float = 0.15,
                          follow_up: int = 3) -> Traffic:
    """Per round and transport: one unary and one streamed request with a deadline shorter than
    the work (a gRPC deadline / an HTTP client timeout that closes the connection), each
    followed by `follow_up` normal requests. The follow-ups retry "no free worker" (the worker
    may still be finishing the abandoned request) and must succeed."""
    traffic = Traffic()
    specs = loadgen.request_specs(8, stream=False, seed=900)
    streamed = loadgen.request_specs(8, stream=True, seed=900)
    impatient = {"rest": client(server, "rest", HttpOptions(timeout=deadline_s)),
                 "grpc": client(server, "grpc", grpc_timeout=deadline_s)}
    patient = {t: client(server, t) for t in ("rest", "grpc")}
    try:
        for r in range(rounds):
            for t in ("rest", "grpc"):
                for spec in (specs[r], streamed[r]):
                    # The impatient request itself must reach the worker: retry rejections.
                    await traffic.send(impatient[t], spec, PATIENT, time.perf_counter() + 60)
                    for k in range(follow_up):
                        await traffic.send(patient[t], specs[(r + k) % len(specs)], PATIENT,
                                           time.perf_counter() + 60)
    finally:
        await close(*impatient.values(), *patient.values())
    return traffic


# ------------------------------------------------------------------------------------------------
# (e) slow clients
# ------------------------------------------------------------------------------------------------


def big_response_spec() -> Spec:
    """A request whose response is far larger than a small socket buffer: a noisy 512 px image
    with overlays (an RGB PNG per method at the image's size) and per-token maps."""
    import io
    import json

    from google.protobuf import json_format
    from PIL import Image

    from lvlm_attribution.api.v1 import explain_pb2 as pb
    from lvlm_attribution.world.scenes import generate

    sample = generate(4242, "color")
    img = Image.fromarray(sample.image).resize((512, 512), Image.NEAREST)
    noise = Image.effect_noise((512, 512), 40).convert("RGB")  # noise defeats PNG compression
    buf = io.BytesIO()
    Image.blend(img, noise, 0.3).save(buf, "PNG")
    req = pb.ExplainRequest(image=buf.getvalue(), question=sample.question,
                            heatmaps=pb.HeatmapOptions(overlay=True, per_token_maps=True))
    body = json.dumps(json_format.MessageToDict(req)).encode()
    return Spec("slow_reader", body, grpc_input={"request": req.SerializeToString()})


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False


async def baseline_latency(server: LocalServer, n: int = 2) -> float:
    """Median end-to-end seconds of `n` sequential streamed requests per transport on an idle
    server (which also warms both transports' code paths in TorchServe's JVM)."""
    traffic = Traffic()
    clients = [client(server, t) for t in ("rest", "grpc")]
    try:
        for spec in loadgen.request_specs(n, stream=True, seed=1000):
            for c in clients:
                await traffic.send(c, spec, PATIENT, time.perf_counter() + 120)
    finally:
        await close(*clients)
    lat = sorted(r.latency for r in traffic.results if r.kind == "ok")
    return lat[len(lat) // 2] if lat else 10.0


async def warm_rejections(server: LocalServer) -> None:
    """Two requests per transport at once: warms TorchServe's rejection path (a cold JVM path
    on a starved CPU can take seconds the first time; measured, see docs/load.md)."""
    await burst(server, per_transport=2)


async def slow_clients(server: LocalServer, hold_s: float | None = None) -> Traffic:
    """Three phases, one slow client each; in each phase normal traffic (one closed-loop user
    alternating REST and gRPC) runs for as long as the slow client holds its connection:
    - "slow_reader": REST, stops reading for `hold_s` once its large response (overlays at
      512 px) has started, through a 4 KB receive buffer;
    - "slow_stream_reader": gRPC StreamPredictions, stops reading for `hold_s` after the first
      message;
    - "slow_sender": REST, uploads its body in 24 pieces over `hold_s`.
    notes[label] = (hold start, hold end) in seconds since t0. `hold_s` defaults to 4x the
    measured latency of one request (at least 6 s) so that normal requests fit in the hold."""
    traffic = Traffic()
    if hold_s is None:
        hold_s = min(40.0, max(6.0, 4.0 * await baseline_latency(server)))
    traffic.notes["hold_s"] = hold_s
    normal = loadgen.request_specs(16, stream=True, seed=1100)
    slow_read = big_response_spec()
    slow_stream = loadgen.request_specs(1, stream=True, seed=1200)[0]
    slow_stream.label = "slow_stream_reader"
    slow_send = loadgen.request_specs(1, stream=False, seed=1300)[0]
    slow_send.label = "slow_sender"
    piece = max(64, len(slow_send.rest_body or b"") // 24 + 1)
    normals = [client(server, t) for t in ("rest", "grpc")]
    notes = traffic.notes

    async def phase(label: str, slow: Client, spec: Spec, holding: asyncio.Event) -> None:
        give_up_at = time.perf_counter() + 120 + hold_s
        task = asyncio.create_task(traffic.send(slow, spec, PATIENT, give_up_at))
        if not await _wait(holding, 90):
            notes[label] = None  # never got to hold (its Result says why)
            await task
            return
        t_hold = time.perf_counter()
        until = t_hold + hold_s
        await alternating_user(traffic, normals, normal, until, give_up_at, 30)
        notes[label] = (t_hold - traffic.t0, until - traffic.t0)
        await task

    got_status, got_first, sending = asyncio.Event(), asyncio.Event(), asyncio.Event()
    reader = client(server, "rest", HttpOptions(read_pause=hold_s, recv_buffer=4096,
                                                on_status=lambda _s: got_status.set()))
    stream = client(server, "grpc")
    stream.grpc_read_pause, stream.grpc_on_first = hold_s, got_first.set
    sender = client(server, "rest", HttpOptions(send_chunk=piece, send_pause=hold_s / 24))
    try:
        await phase("slow_reader", reader, slow_read, got_status)
        await phase("slow_stream_reader", stream, slow_stream, got_first)
        sending.set()  # the upload holds its connection from the first byte
        await phase("slow_sender", sender, slow_send, sending)
    finally:
        await close(reader, stream, sender, *normals)
    return traffic


def served_during(traffic: Traffic, label: str) -> dict[str, int]:
    """Normal requests, per transport, that started and completed ok inside `label`'s hold."""
    window = traffic.notes.get(label)
    out = {"rest": 0, "grpc": 0}
    if not window:
        return out
    for r in traffic.by_label("normal"):
        if r.kind == "ok" and window[0] <= r.start and r.start + r.latency <= window[1]:
            out[r.transport] += 1
    return out


# ------------------------------------------------------------------------------------------------
# (a) the worker process killed under load
# ------------------------------------------------------------------------------------------------


async def kill_worker_under_load(server: LocalServer, concurrency_each: int = 1,
                                 after_s: float = 10.0, busy_for_s: float = 0.3,
                                 max_recovery_s: float = 180.0) -> Traffic:
    """Unary closed-loop load (per transport `concurrency_each` users). Once an attempt has been
    in progress for `busy_for_s` (so the worker is computing it), SIGKILL the worker pid that
    the management API reports; keep the load on until `after_s` seconds after the first
    success of a request sent after the kill (at most `max_recovery_s` after the kill). Notes:
    kill time, new worker READY time, first success sent after the kill, recovery time."""
    traffic = Traffic()
    specs = loadgen.request_specs(16, stream=False, seed=1500)
    inflight: dict[int, float] = {}
    kill = asyncio.Event()
    notes = traffic.notes

    class Tracked(Client):
        async def attempt(self, spec: Spec):
            key = id(object())
            inflight[key] = time.perf_counter()
            try:
                return await super().attempt(spec)
            finally:
                inflight.pop(key, None)

    def tracked(transport: str) -> Tracked:
        c = client(server, transport)
        return Tracked(c.transport, c.rest_url, c.grpc, c.http, c.grpc_timeout)

    clients = [tracked(t) for t in ("rest", "grpc") for _ in range(concurrency_each)]
    stop = {"until": time.perf_counter() + 60.0}  # bounded even if the kill never happens

    async def killer() -> None:
        pid = server.ready_worker_pid()
        notes["old_pid"] = pid
        t_end = time.perf_counter() + 60
        while time.perf_counter() < t_end:
            now = time.perf_counter()
            if any(now - s > busy_for_s for s in inflight.values()):
                break
            await asyncio.sleep(0.02)
        if pid is None or "model_service_worker" not in _cmdline(pid):
            notes["kill_error"] = f"no worker pid to kill ({pid})"
            stop["until"] = time.perf_counter()
            kill.set()
            return
        os.kill(pid, signal.SIGKILL)
        t_kill = time.perf_counter()
        notes["t_kill"] = t_kill - traffic.t0
        notes["inflight_at_kill"] = len(inflight)
        stop["until"] = t_kill + max_recovery_s
        kill.set()
        while time.perf_counter() < t_kill + max_recovery_s:
            new = await asyncio.to_thread(server.ready_worker_pid)
            if new is not None and new != pid:
                notes["new_pid"] = new
                notes["t_ready"] = time.perf_counter() - traffic.t0
                break
            await asyncio.sleep(0.1)

    async def user(c: Client, seed: int) -> None:
        rng = random.Random(seed)
        i = seed
        for _ in range(1000):
            if time.perf_counter() >= stop["until"]:
                break
            # Rejections while the worker restarts are retried until it is back (bounded).
            r = await traffic.send(c, specs[i % len(specs)], PATIENT,
                                   time.perf_counter() + max_recovery_s + after_s, rng)
            i += 1
            if ("t_kill" in notes and "t_first_ok_after_kill" not in notes and r.kind == "ok"
                    and r.start > notes["t_kill"]):
                # Recovered: the first success of a request sent after the kill. Keep the load
                # on for after_s more seconds; those requests must all succeed.
                notes["t_first_ok_after_kill"] = r.start + r.latency
                notes["recovery_s"] = r.start + r.latency - notes["t_kill"]
                stop["until"] = time.perf_counter() + after_s

    try:
        await asyncio.gather(killer(), *(user(c, 40 + k) for k, c in enumerate(clients)))
    finally:
        await close(*clients)
    if "t_kill" in notes:
        after = [r for r in traffic.results if r.start > notes["t_kill"] and r.kind == "ok"]
        if after:  # the earliest end among successes sent after the kill (any user)
            first = min(after, key=lambda r: r.start + r.latency)
            notes["t_first_ok_after_kill"] = first.start + first.latency
            notes["recovery_s"] = first.start + first.latency - notes["t_kill"]
        if "t_ready" in notes:
            notes["worker_ready_after_s"] = notes["t_ready"] - notes["t_kill"]
    return traffic
