"""Kubernetes startup/readiness/liveness probe: succeed only while model `lvlm` has a live worker.

TorchServe's own signals cannot be trusted for this (measured, TorchServe 0.12.0):
- /ping says "Healthy" 1-2 s after start, before the model's worker has loaded, and also when
  no model registered at all;
- after some frontend failures (an intermediate reply to a unary gRPC call: "Stream is already
  completed") the worker process exits and is never restarted, while `GET /models/{name}` keeps
  listing it as READY with its old pid and /ping keeps saying Healthy.
So this probe asks the management API (127.0.0.1 inside the pod only) for the model's workers and
counts a worker only if it is READY *and* its process exists and is runnable (not a zombie, not
stopped). It must run in TorchServe's PID namespace: the same container, or a pod with
shareProcessNamespace. A wedged or dead worker makes it fail within one probe period.

    python deploy/scripts/probe_model_ready.py [--url http://127.0.0.1:8081] [--model lvlm]
                                               [--min-ready 1] [--timeout 3] [--no-pid-check]

Exit 0 when at least --min-ready workers are live, 1 otherwise (the reason on stderr).
Standard library only: it runs in the serving image with no extra packages.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

# /proc/<pid>/stat states of a process that will not serve: zombie, dead, stopped, traced.
NOT_RUNNABLE = {"Z": "a zombie", "X": "dead", "x": "dead", "T": "stopped", "t": "stopped"}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8081",
                        help="TorchServe management API (default: %(default)s)")
    parser.add_argument("--model", default="lvlm", help="model name (default: %(default)s)")
    parser.add_argument("--min-ready", type=int, default=1,
                        help="live workers needed to pass (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to wait for the management API (default: %(default)s)")
    parser.add_argument("--no-pid-check", dest="check_pid", action="store_false",
                        help="trust TorchServe's READY (only where its processes are invisible)")
    args = parser.parse_args(argv)

    url = f"{args.url.rstrip('/')}/models/{args.model}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:  # noqa: S310 (fixed host)
            body = json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"model {args.model} not ready: {url}: {exc}", file=sys.stderr)
        return 1
    live, problems = live_workers(body, args.model, args.check_pid)
    if live < args.min_ready:
        detail = "; ".join(problems) or "no workers"
        print(f"model {args.model}: {live} live worker(s), need {args.min_ready} ({detail})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
