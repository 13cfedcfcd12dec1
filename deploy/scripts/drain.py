"""Kubernetes preStop hook: wait until the pod's worker has finished its in-flight request.

Measured on TorchServe 0.12.0: SIGTERM ends the frontend and the worker at once, and a request
that is still running gets HTTP 500 "Worker died." So before Kubernetes sends SIGTERM we
  1. sleep --delay seconds, so the pod's removal from the Service endpoints has propagated and
     no new requests arrive;
  2. probe the worker with an empty JSON body on 127.0.0.1. The model configs queue requests
     (useJobTicket: false): the probe waits behind every request accepted before it and is
     answered (the handler's 400 for the empty body) once they are done — drained. With job
     tickets a busy worker answers 503 at once instead: then it is probed again. A probe that
     times out is still queued: busy. The probe costs one invalid_input in lvlm_requests_total.
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
    """True: the worker took the probe; False: busy (503, or the probe still queued at
    `timeout`); None: server not answering."""
    req = urllib.request.Request(f"{url.rstrip('/')}/predictions/{model}", data=b"{}",
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout):  # noqa: S310 (fixed local host)
            return True
    except urllib.error.HTTPError as err:
        return err.code != 503
    except TimeoutError:
        return False
    except urllib.error.URLError as err:
        return False if isinstance(err.reason, TimeoutError) else None
    except OSError:
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
        # queued behind the in-flight requests, the probe returns when they are done
        left = max(1.0, deadline - time.monotonic())
        state = worker_free(args.url, args.model, timeout=min(30.0, left))
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
