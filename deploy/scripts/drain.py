"""Kubernetes preStop hook: wait until the pod's worker has finished its in-flight request.

Measured on TorchServe 0.12.0: SIGTERM ends the frontend and the worker at once, and a request
that is still running gets HTTP 500 "Worker died." So before Kubernetes sends SIGTERM we
  1. sleep --delay seconds, so the pod's removal from the Service endpoints has propagated and
     no new requests arrive;
  2. probe the worker with an empty JSON body on 127.0.0.1. With useJobTicket (model-config) a
     busy worker makes TorchServe answer 503 at once ("no job tickets available"); any other
     answer (the handler's 400 for the empty body) means the worker was free, i.e. drained.
     The probe costs one invalid_input in lvlm_requests_total.
Gives up after --timeout seconds (set it to the model's responseTimeout; the pod's
terminationGracePeriodSeconds must cover delay + timeout).

    python deploy/scripts/drain.py [--url http://127.0.0.1:8080] [--model lvlm] [--delay 10]
                                   [--timeout 120] [--interval 1]
Always exits 0 (a failing preStop hook only delays the kill and clutters events).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def worker_free(url: str, model: str, timeout: float) -> bool | None:
    """True: the worker took the probe; False: busy (503); None: server not answering."""
    req = urllib.request.Request(f"{url.rstrip('/')}/predictions/{model}", data=b"{}",
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout):  # noqa: S310 (fixed local host)
            return True
    except urllib.error.HTTPError as err:
        return err.code != 503
    except (urllib.error.URLError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="lvlm")
    ap.add_argument("--delay", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args(argv)

    time.sleep(args.delay)
    deadline = time.monotonic() + args.timeout
    while True:
        # the probe itself is answered in milliseconds; its timeout bounds a hung server
        state = worker_free(args.url, args.model, timeout=min(30.0, args.timeout))
        if state is True:
            print("drain: worker idle", file=sys.stderr)
            return 0
        if state is None:
            print("drain: server not answering, nothing to drain", file=sys.stderr)
            return 0
        if time.monotonic() >= deadline:
            print("drain: still busy at the deadline, giving up", file=sys.stderr)
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
