"""Health that sees the worker, and outcome metrics that add up, on the real TorchServe.

The probe under test is the exact command the Kubernetes manifests run
(deploy/scripts/probe_model_ready.py). Workers are killed or stopped on the probe models of the
session (lvlm_oom_probe, lvlm_stale_probe), never on `lvlm`, so the other suites are untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lvlm_attribution.client import GrpcClient, ServiceCallError, make_request, retry_busy
from lvlm_attribution.world.scenes import generate

from .conftest import OOM_PROBE, REPO, STALE_PROBE, ready

pytestmark = pytest.mark.integration
PROBE = [sys.executable, str(REPO / "deploy" / "scripts" / "probe_model_ready.py")]
SCENE = generate(3, "color")
RECOVERY_S = 90.0


def png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(SCENE.image).save(buf, format="PNG")
    return buf.getvalue()


def probe(server, model: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PROBE, "--url", server.management, "--model", model],
                          capture_output=True, text=True, timeout=30)


def worker_pid(server, model: str) -> int:
    import json

    with urllib.request.urlopen(f"{server.management}/models/{model}", timeout=5) as r:
        workers = json.loads(r.read())[0]["workers"]
    return int(next(w["pid"] for w in workers if w["status"] == "READY"))


def wait_until(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"not {what} after {timeout_s} s")


def outcomes(server, model: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lvlm_requests_total" and sample.labels.get("ModelName") == model:
                key = sample.labels["outcome"]
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def ping(server) -> str:
    import json

    with urllib.request.urlopen(f"{server.rest}/ping", timeout=5) as r:
        return json.loads(r.read())["status"]


def test_probe_turns_red_when_the_worker_is_killed_and_green_after_recovery(torchserve) -> None:
    assert probe(torchserve, OOM_PROBE).returncode == 0
    before = outcomes(torchserve, OOM_PROBE).get("worker_died", 0.0)
    client = GrpcClient(torchserve.grpc, model=OOM_PROBE, timeout=120)
    slow = make_request(png(), SCENE.question, methods=["igos"],
                        method_settings={"igos": {"iterations": 20}})
    errors: list[ServiceCallError] = []

    def call() -> None:
        try:
            retry_busy(lambda: client.explain(slow), 30)
        except ServiceCallError as err:
            errors.append(err)

    pid = worker_pid(torchserve, OOM_PROBE)
    journal = torchserve.tmp_dir / f"lvlm-inflight-{OOM_PROBE}"
    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: any(journal.glob("inflight-*")), 30, "in flight")
    os.kill(pid, signal.SIGKILL)
    red = probe(torchserve, OOM_PROBE)
    assert red.returncode == 1, red.stderr
    thread.join(60)
    assert errors and "died" in errors[0].message.lower(), errors
    took = wait_until(lambda: probe(torchserve, OOM_PROBE).returncode == 0, RECOVERY_S,
                      "green again")
    assert worker_pid(torchserve, OOM_PROBE) != pid
    # The request the dead worker held is counted once, by its successor, as worker_died.
    wait_until(lambda: outcomes(torchserve, OOM_PROBE).get("worker_died", 0.0) == before + 1,
               30, "counted as worker_died")
    print(f"probe green again {took:.1f} s after the kill")
    resp = retry_busy(lambda: client.explain(make_request(png(), SCENE.question)), 30)
    assert resp.answer == SCENE.answer
    client.close()


def test_probe_turns_red_while_the_worker_is_stopped(torchserve) -> None:
    pid = worker_pid(torchserve, OOM_PROBE)
    os.kill(pid, signal.SIGSTOP)
    try:
        red = probe(torchserve, OOM_PROBE)
        assert red.returncode == 1 and "stopped" in red.stderr, red.stderr
    finally:
        os.kill(pid, signal.SIGCONT)
    assert probe(torchserve, OOM_PROBE).returncode == 0


def test_probe_sees_the_dead_worker_torchserve_still_lists_as_ready(torchserve) -> None:
    """TorchServe's own blind spot, reproduced: after the frontend's "Stream is already
    completed" the worker process is gone, GET /models still says READY and /ping Healthy."""
    assert probe(torchserve, STALE_PROBE).returncode == 0
    client = GrpcClient(torchserve.grpc, model=STALE_PROBE, timeout=60)
    with pytest.raises(ServiceCallError):  # the stale handler's reply can't be decoded
        client.explain(make_request(png(), SCENE.question))
    client.close()
    pid = worker_pid(torchserve, STALE_PROBE)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 30, "worker process gone")
    assert ready(torchserve.management, STALE_PROBE)  # TorchServe: still READY
    assert ping(torchserve) == "Healthy"  # and healthy
    red = probe(torchserve, STALE_PROBE)
    assert red.returncode == 1 and "listed READY but process" in red.stderr, red.stderr


def test_every_request_that_reaches_the_worker_is_counted_once(torchserve) -> None:
    client = GrpcClient(torchserve.grpc, model=OOM_PROBE, timeout=120)
    wait_until(lambda: probe(torchserve, OOM_PROBE).returncode == 0, RECOVERY_S, "ready")
    before = outcomes(torchserve, OOM_PROBE)
    sent = {"ok": 2, "invalid_input": 2, "out_of_memory": 1, "deadline_exceeded": 1}
    requests = (
        [make_request(png(), SCENE.question)] * sent["ok"]
        + [make_request(png(), "")] * sent["invalid_input"]
        + [make_request(png(), "oom-host " + SCENE.question)]
        + [make_request(png(), SCENE.question, methods=["igos"],
                        method_settings={"igos": {"iterations": 20}})])
    requests[-1].timeout_ms = 200
    for req in requests:
        with contextlib.suppress(ServiceCallError):
            retry_busy(lambda req=req: client.explain(req), 30)
    client.close()

    def counted() -> bool:
        after = outcomes(torchserve, OOM_PROBE)
        return all(after.get(k, 0.0) - before.get(k, 0.0) == n for k, n in sent.items())

    wait_until(counted, 20, f"counted as {sent}")
