"""Kubernetes startupProbe: succeed only once model `lvlm` has a READY worker.

TorchServe's /ping says "Healthy" 1-2 s after start, before the model's worker has loaded (and
also when no model registered at all), so it cannot gate start-up. This exec probe asks the
management API, which listens on 127.0.0.1 inside the pod only:

    python deploy/scripts/probe_model_ready.py [--url http://127.0.0.1:8081] [--model lvlm]
                                               [--min-ready 1] [--timeout 3]

Exit 0 when at least --min-ready workers report status READY, 1 otherwise (message on stderr).
Standard library only: it runs in the serving image with no extra packages.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def ready_workers(description: object, model: str) -> int:
    """Count READY workers in a `GET /models/{model}` response (a list of model versions)."""
    versions = description if isinstance(description, list) else [description]
    count = 0
    for entry in versions:
        if not isinstance(entry, dict) or entry.get("modelName") != model:
            continue
        for worker in entry.get("workers") or []:
            if isinstance(worker, dict) and worker.get("status") == "READY":
                count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8081")
    parser.add_argument("--model", default="lvlm")
    parser.add_argument("--min-ready", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)

    url = f"{args.url.rstrip('/')}/models/{args.model}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:  # noqa: S310 (fixed host)
            body = json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"model {args.model} not ready: {url}: {exc}", file=sys.stderr)
        return 1
    n = ready_workers(body, args.model)
    if n < args.min_ready:
        print(f"model {args.model}: {n} READY worker(s), need {args.min_ready}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
