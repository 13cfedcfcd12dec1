"""Kubernetes startup/readiness/liveness probe: succeed only while model `lvlm` has a live worker.

A worker is live when TorchServe lists it READY *and* its process exists and is runnable: /ping
and READY alone lie (a dead worker can stay READY with its old pid). The logic is
`lvlm_attribution.health` (shared with the gateway's grpc.health.v1); this is its command line.
It must run in TorchServe's PID namespace: the same container, or a pod with
shareProcessNamespace. A wedged or dead worker makes it fail within one probe period.

    python deploy/scripts/probe_model_ready.py [--url http://127.0.0.1:8081] [--model lvlm]
                                               [--min-ready 1] [--timeout 3] [--no-pid-check]

Exit 0 when at least --min-ready workers are live, 1 otherwise (the reason on stderr).
Standard library only (lvlm_attribution.health imports nothing else): it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from lvlm_attribution import health
except ImportError:  # a plain checkout without the package installed: use the repository's
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lvlm_attribution import health


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
    state = health.check(args.url, args.model, args.min_ready, args.timeout, args.check_pid)
    if not state.ok:
        print(state.reason, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
