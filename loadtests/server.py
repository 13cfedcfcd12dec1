"""Start a private TorchServe (free 127.0.0.1 ports, its own temporary folder) serving `lvlm`.

This reuses the integration tests' machinery (tests/integration/conftest.py: free ports, the
config rewriting, the READY check, the model lookup) so load and fault runs start TorchServe
exactly like the integration suite does; it only adds what the fault scenarios need on top:
model-config overrides (e.g. a small `jobQueueSize`), the worker's pid, and a start/stop usable
outside pytest (`python -m loadtests.run`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = "lvlm"
READY_TIMEOUT_S = 240.0


def integration():
    """tests/integration/conftest.py as a module (loaded by path: `tests` is no package)."""
    path = REPO / "tests" / "integration" / "conftest.py"
    name = "lvlm_loadtests_integration_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class LocalServer:
    rest: str  # http://127.0.0.1:port
    grpc: str  # 127.0.0.1:port
    management: str
    metrics: str
    root: Path
    model_config: dict

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def describe(self) -> dict:
        with urllib.request.urlopen(f"{self.management}/models/{MODEL}", timeout=5) as r:
            return json.loads(r.read())[0]

    def workers(self) -> list[dict]:
        try:
            return self.describe().get("workers", [])
        except OSError:
            return []

    def ready_worker_pid(self) -> int | None:
        for w in self.workers():
            if w.get("status") == "READY" and w.get("pid"):
                return int(w["pid"])
        return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until a worker is READY (raises after `timeout`)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.ready_worker_pid() is not None:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"model {MODEL} not READY after {timeout:.0f} s; see {self.log_dir}")

    def ping(self) -> str:
        try:
            with urllib.request.urlopen(f"{self.rest}/ping", timeout=5) as r:
                return json.loads(r.read()).get("status", "")
        except OSError as err:
            return f"unreachable ({err})"

    def log_tail(self, name: str = "model_log.log", lines: int = 40) -> str:
        path = self.log_dir / name
        if not path.exists():
            return f"(no {name})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def local_torchserve(model_overrides: Mapping[str, Any] | None = None,
                     root: Path | None = None,
                     profile: str = "model-config.yaml") -> Iterator[LocalServer]:
    """A TorchServe serving only `lvlm` with deploy/<profile> (+ `model_overrides`, top-level
    keys or {"handler": {...}}), stopped (and its processes reaped) on exit."""
    if shutil.which("java") is None:
        raise RuntimeError("java is not installed (TorchServe needs JDK 17)")
    it = integration()
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="lvlm-load-")) if own_root else Path(root)
    (root / "model_store").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)  # TorchServe's pid file lives in $TMPDIR
    ports = it.free_ports(6)
    model_config_path, properties = it.write_configs(root, ports, profile)
    cfg = yaml.safe_load(model_config_path.read_text())
    for key, value in (model_overrides or {}).items():
        if key == "handler":
            cfg["handler"].update(value)
        else:
            cfg[key] = value
    model_config_path.write_text(yaml.safe_dump(cfg))
    lines = [f"load_models={MODEL}.mar" if line.startswith("load_models=") else line
             for line in properties.read_text().splitlines()]
    properties.write_text("\n".join(lines) + "\n")

    venv_bin = it.VENV_BIN
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "LOG_LOCATION": str(root / "logs"),
           "METRICS_LOCATION": str(root / "logs"), "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(REPO / "deploy/scripts/build_mar.sh"), "--config",
                    str(model_config_path), "--out", str(root / "model_store")],
                   check=True, env=env, cwd=REPO, capture_output=True)
    server = LocalServer(rest=f"http://127.0.0.1:{ports[0]}", grpc=f"127.0.0.1:{ports[3]}",
                         management=f"http://127.0.0.1:{ports[1]}",
                         metrics=f"http://127.0.0.1:{ports[2]}", root=root, model_config=cfg)
    worker_pids: set[int] = set()
    try:
        with _started(server, root, properties, env, worker_pids) as s:
            yield s
    finally:
        if own_root and not os.environ.get("LVLM_LOAD_KEEP_ROOT"):
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _started(server: LocalServer, root: Path, properties: Path, env: dict,
             worker_pids: set[int]) -> Iterator[LocalServer]:
    venv_bin = integration().VENV_BIN
    with (root / "torchserve.out").open("w") as out:
        # `torchserve --start` returns at once but Java keeps stdout open: it goes to a file.
        subprocess.run([str(venv_bin / "torchserve"), "--start", "--ncs", "--ts-config",
                        str(properties)], check=True, env=env, cwd=root, stdout=out,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            server.wait_ready()
            _remember_pids(server, worker_pids)
            yield server
        finally:
            _remember_pids(server, worker_pids)
            pid_file = root / "tmp" / ".model_server.pid"
            pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
            subprocess.run([str(venv_bin / "torchserve"), "--stop"], env=env, cwd=root,
                           stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           timeout=120)
            _kill_if_alive(pid, "org.pytorch.serve")
            for p in sorted(worker_pids):
                _kill_if_alive(p, "model_service_worker")


def _remember_pids(server: LocalServer, pids: set[int]) -> None:
    pids.update(int(w["pid"]) for w in server.workers() if w.get("pid"))


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _kill_if_alive(pid: int | None, needle: str, grace_s: float = 3.0) -> None:
    """Only processes this module started (our frontend, the workers it reported), checked by
    their command line so that a recycled pid is never signalled."""
    if pid is None or needle not in _cmdline(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtests.server --hold 600 --info server.json`: start a private TorchServe,
    write its addresses to --info, keep it up for --hold seconds (or until SIGTERM/SIGINT), stop
    it. For developing against one warm server with `python -m loadtests.run --server-info`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--hold", type=float, default=600.0, help="seconds to stay up (max 3600)")
    parser.add_argument("--info", type=Path, default=Path("runs/load/server.json"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="model-config override, e.g. --set jobQueueSize=2")
    args = parser.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    stop = {"now": False}

    def on_signal(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with local_torchserve(overrides) as server:
        args.info.parent.mkdir(parents=True, exist_ok=True)
        args.info.write_text(json.dumps({"rest": server.rest, "grpc": server.grpc,
                                         "management": server.management,
                                         "metrics": server.metrics, "root": str(server.root),
                                         "pid": os.getpid()}))
        print(f"serving: {args.info.read_text()}", flush=True)
        deadline = time.monotonic() + min(args.hold, 3600.0)
        while not stop["now"] and time.monotonic() < deadline:
            time.sleep(0.5)
    args.info.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
