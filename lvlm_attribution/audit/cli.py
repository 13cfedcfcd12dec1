"""The `audit` and `audit-sample` subcommands (registered from lvlm_attribution/cli.py).
Imports stay lazy: building the parser must not load torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import check_methods, split_names

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "model_store" / "tiny-shapes-llava"


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_audit_command(args: argparse.Namespace) -> int:
    from .backends import LocalBackend, ServiceBackend
    from .runner import run_audit

    methods = split_names(args.methods)
    if not args.url:  # a local model runs only registered methods; a service checks its own
        try:
            check_methods(methods)
        except argparse.ArgumentTypeError as err:
            _log(f"error: --methods: {err}")
            return 2
    if args.url:
        backend = ServiceBackend(args.url, methods, model=args.service_model,
                                 timeout=args.timeout, busy_retry_s=args.busy_retry_s)
    else:
        backend = LocalBackend.from_model_dir(args.model or DEFAULT_MODEL,
                                              methods or ("glimpse", "dexar"),
                                              device=args.device)
    try:
        summary = run_audit(args.input, args.out, backend, concurrency=args.concurrency,
                            progress=not args.no_progress, log=_log)
    except KeyboardInterrupt:
        _log("audit: interrupted; run the same command again to resume")
        return 130
    finally:
        backend.close()
    if getattr(backend, "busy_retries", 0):
        _log(f"audit: the service was busy {backend.busy_retries} times (retried with backoff); "
             "--concurrency above its free workers only queues in this client")
    out = Path(args.out)
    print(json.dumps({"index": str(out / "index.html"), "summary": str(out / "summary.json"),
                      "n_items": summary["n_items"], "n_ok": summary["n_ok"],
                      "n_errors": summary["n_errors"], "score_source": summary["score_source"],
                      "auroc": summary["auroc"], "auroc_by_score": summary["auroc_by_score"]},
                     indent=1))
    return 0 if summary["n_ok"] or not summary["n_items"] else 1


def add_audit(sub) -> None:
    p = sub.add_parser("audit", help="explain flagged answers in bulk: pictures, HTML, summary",
                       description="Explain each (image, question, answer) of a JSONL in audit "
                       "mode, through a running service (--url) or a local model (--model).")
    p.add_argument("--input", required=True, help="JSONL: id, image, question, answer[, truth]")
    p.add_argument("--out", required=True, help="output folder (re-run to resume)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help="a running service: http://host:8080 (REST), grpc://host:50051 "
                            "(the typed gateway) or torchserve-grpc://host:7070")
    where.add_argument("--model", default=None,
                       help=f"local model directory (default {DEFAULT_MODEL})")
    p.add_argument("--methods", default="glimpse,dexar",
                   help="comma-separated; empty = the server's defaults (--url)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="parallel requests (--url); local: workers sharing the model under a lock")
    p.add_argument("--service-model", default="lvlm", help="TorchServe model name (--url)")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds (--url)")
    p.add_argument("--busy-retry-s", type=float, default=600.0,
                   help="per item, keep retrying a busy service (HTTP 503, no free worker) "
                   "with backoff for this long (--url)")
    p.add_argument("--device", default="cpu",
                   help="local model's torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_audit_command)


def run_audit_sample_command(args: argparse.Namespace) -> int:
    from .sample import build_sample

    path = build_sample(args.out, scenes=args.scenes, seed=args.seed)
    n = sum(1 for _ in path.open(encoding="utf-8"))
    print(json.dumps({"jsonl": str(path), "items": n}))
    return 0


def add_audit_sample(sub) -> None:
    p = sub.add_parser("audit-sample", help="write a labelled JSONL (correct and corrupted "
                       "answers) from the planted world, for evaluating the audit")
    p.add_argument("--out", required=True, help="output folder; gets flagged.jsonl and images")
    p.add_argument("--scenes", type=int, default=30, help="scenes; two items each")
    p.add_argument("--seed", type=int, default=0, help="first scene seed (default: %(default)s)")
    p.set_defaults(func=run_audit_sample_command)
