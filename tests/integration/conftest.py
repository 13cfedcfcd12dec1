"""A real TorchServe, started once per test session on free local ports in a temporary folder,
serving the embedded model (or $LVLM_MODEL_DIR) through handlers/lvlm_handler.py, and the typed
gateway (lvlm.v1.Explainer, `python -m lvlm_attribution.gateway`) in front of it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MODEL_NAME = "lvlm"
OOM_PROBE = "lvlm_oom_probe"
STALE_PROBE = "lvlm_stale_probe"
PROBE_HANDLERS = {OOM_PROBE: "oom_probe_handler.py", STALE_PROBE: "stale_probe_handler.py"}
READY_TIMEOUT_S = 600


@dataclass(frozen=True)
class Server:
    rest: str  # http://127.0.0.1:port
    grpc: str  # 127.0.0.1:port
    management: str
    metrics: str
    log_dir: Path
    tmp_dir: Path  # TorchServe's $TMPDIR (the workers' in-flight journals live there)

    def log_tail(self, lines: int = 60) -> str:
        path = self.log_dir / "model_log.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() \
            else "(no model log)"


def model_dir() -> Path:
    for candidate in (os.environ.get("LVLM_MODEL_DIR"), REPO / "model_store" / "tiny-shapes-llava",
                      REPO / "runs" / "train-a"):
        if candidate and (Path(candidate) / "config.json").exists():
            return Path(candidate).resolve()
    pytest.skip("no embedded model: model_store/tiny-shapes-llava is missing")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_configs(root: Path, ports: list[int], profile: str = "model-config.yaml"
                  ) -> tuple[Path, Path]:
    """config.properties on `ports` and the model config of `profile` (a file in deploy/)."""
    rest, mgmt, metrics, grpc_inf, grpc_mgmt, worker = ports
    cfg = yaml.safe_load((REPO / "deploy" / profile).read_text())
    cfg["handler"]["model_dir"] = str(model_dir())
    # Shared CI machines can be slow to import torch + transformers: generous start-up limits.
    cfg["startupTimeout"] = max(cfg.get("startupTimeout", 120), READY_TIMEOUT_S)
    cfg["responseTimeout"] = max(cfg.get("responseTimeout", 120), 300)
    model_config = root / "model-config.yaml"
    model_config.write_text(yaml.safe_dump(cfg))
    overrides = {
        "inference_address": f"http://127.0.0.1:{rest}",
        "management_address": f"http://127.0.0.1:{mgmt}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "grpc_inference_port": str(grpc_inf), "grpc_management_port": str(grpc_mgmt),
        "initial_worker_port": str(worker),  # the worker's unix socket name: avoid clashes
        "model_store": str(root / "model_store"),
        "metrics_config": str(REPO / "deploy" / "metrics.yaml"),
        "load_models": ",".join(f"{m}.mar" for m in (MODEL_NAME, *PROBE_HANDLERS)),
    }
    lines = []
    for line in (REPO / "deploy" / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.startswith("#") and key in overrides:
            line = f"{key}={overrides.pop(key)}"
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items()]
    properties = root / "config.properties"
    properties.write_text("\n".join(lines) + "\n")
    return model_config, properties


def ready(management: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"{management}/models/{model}", timeout=5) as r:
            workers = json.loads(r.read())[0].get("workers", [])
    except OSError:
        return False
    return any(w.get("status") == "READY" for w in workers)


def wait_ready(management: str, proc_log: Path) -> None:
    deadline = time.time() + READY_TIMEOUT_S
    while time.time() < deadline:
        if all(ready(management, m) for m in (MODEL_NAME, *PROBE_HANDLERS)):
            return
        time.sleep(1)
    raise RuntimeError(f"TorchServe model not READY after {READY_TIMEOUT_S} s; "
                       f"see {proc_log}")


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory) -> Server:
    if shutil.which("java") is None:
        pytest.skip("java is not installed")
    root = tmp_path_factory.mktemp("torchserve")
    (root / "model_store").mkdir()
    (root / "tmp").mkdir()  # TorchServe's pid file lives in $TMPDIR: keep ours private
    ports = free_ports(6)
    model_config, properties = write_configs(root, ports)
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "LOG_LOCATION": str(root / "logs"),
           "METRICS_LOCATION": str(root / "logs"), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    build = ["bash", str(REPO / "deploy/scripts/build_mar.sh"), "--config", str(model_config),
             "--out", str(root / "model_store")]
    subprocess.run(build, check=True, env=env, cwd=REPO, capture_output=True)
    # Probe models: the production handler with a test-only twist (tests/integration/):
    # OOM_PROBE runs out of memory on request; STALE_PROBE streams over every transport, as the
    # handler once did, to reproduce TorchServe's dead-but-READY worker for the probe test.
    # They refuse at once when busy (job tickets), so that tests can provoke a busy refusal;
    # the shipped profiles queue instead.
    probe_config = root / "model-config.probe.yaml"
    cfg = yaml.safe_load(model_config.read_text())
    probe_config.write_text(yaml.safe_dump({**cfg, "useJobTicket": True, "jobQueueSize": 4}))
    probe_build = [*build[:build.index("--config") + 1], str(probe_config),
                   *build[build.index("--config") + 2:]]
    for name, handler in PROBE_HANDLERS.items():
        probe = root / name
        probe.mkdir()
        shutil.copy(REPO / "handlers" / "lvlm_handler.py", probe)
        shutil.copy(Path(__file__).parent / handler, probe)
        subprocess.run([*probe_build, "--handler", str(probe / handler), "--name", name],
                       check=True, env=env, cwd=REPO, capture_output=True)
    out = (root / "torchserve.out").open("w")
    subprocess.run([str(VENV_BIN / "torchserve"), "--start", "--ncs", "--ts-config",
                    str(properties)], check=True, env=env, cwd=root, stdout=out,
                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(rest=f"http://127.0.0.1:{ports[0]}", grpc=f"127.0.0.1:{ports[3]}",
                    management=f"http://127.0.0.1:{ports[1]}",
                    metrics=f"http://127.0.0.1:{ports[2]}", log_dir=root / "logs",
                    tmp_dir=root / "tmp")
    try:
        wait_ready(server.management, root / "logs")
        yield server
    finally:
        pid_file = root / "tmp" / ".model_server.pid"
        pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
        subprocess.run([str(VENV_BIN / "torchserve"), "--stop"], env=env, cwd=root,
                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        _kill_if_alive(pid)


def _kill_if_alive(pid: int | None) -> None:
    """Our own frontend (by the pid TorchServe recorded for this session), if --stop missed it."""
    if pid is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


@dataclass(frozen=True)
class Gateway:
    target: str  # 127.0.0.1:port of lvlm.v1.Explainer, grpc.health.v1 and reflection
    metrics: str  # http://127.0.0.1:port/metrics
    proc: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running_gateway(server: Server, model: str = MODEL_NAME, *args: str,
                    wait_serving: bool = True) -> Iterator[Gateway]:
    """`python -m lvlm_attribution.gateway` in front of `server` on free ports, polling health
    every 0.5 s; stopped (SIGTERM, then SIGKILL) on exit unless the test already stopped it."""
    from lvlm_attribution.gateway.probe import wait_serving as serving

    port, metrics_port = free_ports(2)
    log = server.log_dir.parent / f"gateway-{model}-{port}.log"
    cmd = [sys.executable, "-m", "lvlm_attribution.gateway", "--torchserve-grpc", server.grpc,
           "--torchserve-rest", server.rest, "--management", server.management,
           "--model", model, "--port", str(port), "--metrics-port", str(metrics_port),
           "--health-interval-s", "0.5", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    gateway = Gateway(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, log)
    try:
        if wait_serving:
            ok, last = serving(gateway.target, wait_s=60)
            assert ok, f"gateway not SERVING ({last}):\n{gateway.log_tail()}"
        yield gateway
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="session")
def gateway(torchserve: Server) -> Iterator[Gateway]:
    """The typed gateway in front of the session's TorchServe, serving model `lvlm`."""
    with running_gateway(torchserve) as gw:
        yield gw
