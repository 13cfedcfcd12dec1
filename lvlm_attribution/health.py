"""Is the model really being served? A worker counts only if TorchServe lists it READY *and* its
process exists and is runnable.

TorchServe's own signals cannot be trusted for this (measured, TorchServe 0.12.0):
- /ping says "Healthy" 1-2 s after start, before the model's worker has loaded, and also when no
  model registered at all;
- after some frontend failures (an intermediate reply to a unary gRPC call: "Stream is already
  completed") the worker process exits and is never restarted, while `GET /models/{name}` keeps
  listing it as READY with its old pid and /ping keeps saying Healthy.

So `check` asks the management API (127.0.0.1 inside the pod only) for the model's workers and
looks each READY worker's pid up in /proc. The caller must run in TorchServe's PID namespace: the
same container, or a pod with `shareProcessNamespace: true` (the gateway's container).

Used by deploy/scripts/probe_model_ready.py (the Kubernetes exec probes) and by the gateway's
grpc.health.v1 service. Standard library only, and nothing heavy is imported: the probe runs
every few seconds and must start in milliseconds.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# /proc/<pid>/stat states of a process that will not serve: zombie, dead, stopped, traced.
NOT_RUNNABLE = {"Z": "a zombie", "X": "dead", "x": "dead", "T": "stopped", "t": "stopped"}


@dataclass(frozen=True)
class Health:
    """`live` workers (READY and runnable), `needed` of them for `ok`; `reason` says why not."""

    live: int
    needed: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.live >= self.needed


def workers(description: object, model: str) -> list[dict]:
    """The workers of `model` in a `GET /models/{model}` response (a list of model versions)."""
    versions = description if isinstance(description, list) else [description]
    return [w for entry in versions
            if isinstance(entry, dict) and entry.get("modelName") == model
            for w in entry.get("workers") or [] if isinstance(w, dict)]


def ready_workers(description: object, model: str) -> int:
    """Workers TorchServe lists as READY (what it believes; see `live_workers`)."""
    return sum(w.get("status") == "READY" for w in workers(description, model))


def process_problem(pid: object, proc: Path = Path("/proc")) -> str | None:
    """Why the worker process `pid` cannot serve, or None when it exists and is runnable."""
    if not isinstance(pid, int) or pid <= 0:
        return f"no process id ({pid!r})"
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return f"process {pid} does not exist"
    except OSError as exc:
        return f"process {pid} cannot be inspected ({exc.strerror})"
    state = stat.rsplit(")", 1)[-1].split()[0]  # the command name may contain spaces
    return f"process {pid} is {NOT_RUNNABLE[state]}" if state in NOT_RUNNABLE else None


def live_workers(description: object, model: str, check_pid: bool = True) -> tuple[int, list[str]]:
    """(number of READY workers whose process is runnable, reasons for each one that is not)."""
    live, problems = 0, []
    for worker in workers(description, model):
        if worker.get("status") != "READY":
            problems.append(f"worker {worker.get('id')} is {worker.get('status')}")
            continue
        problem = process_problem(worker.get("pid")) if check_pid else None
        if problem:
            problems.append(f"worker {worker.get('id')} is listed READY but {problem}")
        else:
            live += 1
    return live, problems


def describe_model(management: str, model: str, timeout: float = 3.0) -> object:
    """`GET {management}/models/{model}`, parsed; raises OSError or ValueError."""
    url = f"{management.rstrip('/')}/models/{model}"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed local host)
        return json.loads(resp.read().decode("utf-8"))


def check(management: str = "http://127.0.0.1:8081", model: str = "lvlm", min_ready: int = 1,
          timeout: float = 3.0, check_pid: bool = True) -> Health:
    """Health of `model` as TorchServe's management API and /proc see it together."""
    try:
        description = describe_model(management, model, timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        where = f"{management.rstrip('/')}/models/{model}"
        return Health(0, min_ready, f"model {model} not ready: {where}: {exc}")
    live, problems = live_workers(description, model, check_pid)
    if live >= min_ready:
        return Health(live, min_ready)
    detail = "; ".join(problems) or "no workers"
    return Health(live, min_ready,
                  f"model {model}: {live} live worker(s), need {min_ready} ({detail})")
