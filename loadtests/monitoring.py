"""What monitoring every answer costs, measured side by side in one run (docs/performance.md,
"Monitoring"): the engine alone (answer-only vs answer + LLR + DEX-AR vs answer + TAM, one
request at a time) and the served path through a real TorchServe (REST and gRPC; one client back
to back vs 16 concurrent clients that retry a busy refusal every 10 ms), for the monitoring
profile at batch 8, the same at batch 1, and the former admission (instant refusals: job
tickets, batch 1).

    python -m loadtests.monitoring --seconds 20 --out benchmarks/results/monitoring-cpu.json
    python -m loadtests.monitoring --seconds 2 --servers batch8 --engine-requests 4   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import loadgen
from .loadgen import RetryPolicy, StepConfig
from .server import local_torchserve

PROFILE = "model-config.monitoring.yaml"
SERVERS: dict[str, dict] = {
    "batch8": {},  # the profile as shipped
    "batch1": {"batchSize": 1, "maxBatchDelay": 1},
    "tickets-batch1": {"batchSize": 1, "maxBatchDelay": 1, "useJobTicket": True,
                       "jobQueueSize": 4},  # the former admission: refuse at once when busy
}
STORM = RetryPolicy(max_attempts=1_000_000, base_s=0.01, cap_s=0.01)  # retry every 10 ms


# ---- the engine alone ------------------------------------------------------------------------
def engine_costs(requests: int, repeats: int = 3) -> dict:
    """Per-request latency (best of `repeats` passes over `requests` scenes) of answer-only and
    of answer + each monitoring option, the engine on this machine, one request at a time."""
    from PIL import Image

    from lvlm_attribution.engine import Explainer
    from lvlm_attribution.schema import BatchItem, ExplainOptions
    from lvlm_attribution.world.scenes import generate

    explainer = Explainer.from_pretrained(Path(__file__).resolve().parents[1] / "model_store"
                                          / "tiny-shapes-llava")
    items = [BatchItem(Image.fromarray(s.image), s.question)
             for s in (generate(seed) for seed in range(requests))]
    variants: dict[str, ExplainOptions | None] = {
        "answer only": None,
        "answer + LLR": ExplainOptions(methods=()),
        "answer + LLR + DEX-AR": ExplainOptions(methods=("dexar",)),
        "answer + TAM": ExplainOptions(methods=("tam",), llr=False),
        "answer + LLR + TAM": ExplainOptions(methods=("tam",)),
    }

    def run(options: ExplainOptions | None) -> Callable[[], None]:
        def once() -> None:
            for item in items:
                answered = explainer.answer([item], options)
                if options is not None:
                    explainer.attribute(answered, options)
        return once

    out = {}
    for name, options in variants.items():
        run(options)()  # warm-up
        best = min(_timed(run(options)) for _ in range(repeats)) / len(items)
        out[name] = {"ms": round(best * 1000, 2)}
    base = out["answer only"]["ms"]
    for row in out.values():
        row["x_answer"] = round(row["ms"] / base, 2)
    return out


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- the served path ----------------------------------------------------------------------------
def served(name: str, overrides: dict, seconds: float) -> dict:
    specs = loadgen.request_specs(64, methods=("dexar",), stream=False)
    rows = {}
    with local_torchserve(overrides, profile=PROFILE) as server:
        for transport in ("rest", "grpc"):
            factory = loadgen.make_client_factory(transport, server.rest, server.grpc)
            for label, concurrency, retry in (("1 client", 1, RetryPolicy()),
                                              ("16 clients, retry 10 ms", 16, STORM)):
                step = StepConfig(concurrency, seconds, 1_000_000, retry)
                started = time.perf_counter()
                results = asyncio.run(loadgen.closed_loop(factory, specs, step))
                rows[f"{transport} / {label}"] = _summary(results,
                                                          time.perf_counter() - started)
    return {"overrides": overrides, "rows": rows}


def _summary(results: list, wall_s: float) -> dict:
    ok = [r for r in results if r.kind == "ok"]
    latencies = sorted(r.latency for r in ok)
    kinds: dict[str, int] = {}
    for r in results:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return {
        "requests_per_s": round(len(ok) / wall_s, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1)
        if latencies else None,
        "ok": len(ok), "refused_attempts": sum(len(r.rejected) for r in results),
        "outcomes": kinds,
    }


def markdown(report: dict) -> str:
    lines = ["| engine, one request | ms | × answer-only |", "|---|---|---|"]
    for name, row in report["engine"].items():
        lines.append(f"| {name} | {row['ms']} | {row['x_answer']} |")
    lines += ["", "| server | load | req/s | p50 ms | p99 ms | refused attempts |",
              "|---|---|---|---|---|---|"]
    for server, data in report["served"].items():
        for load, row in data["rows"].items():
            lines.append(f"| {server} | {load} | {row['requests_per_s']} | {row['p50_ms']} | "
                         f"{row['p99_ms']} | {row['refused_attempts']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="seconds per load step (default: %(default)s)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated, from {list(SERVERS)} (default: all)")
    parser.add_argument("--engine-requests", type=int, default=20,
                        help="scenes per engine pass (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    names = [n for n in args.servers.split(",") if n]
    unknown = sorted(set(names) - set(SERVERS))
    if unknown:
        parser.error(f"unknown servers {unknown}; known: {list(SERVERS)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "command": "python -m loadtests.monitoring " + " ".join(argv or sys.argv[1:]),
              "engine": engine_costs(args.engine_requests),
              "served": {n: served(n, SERVERS[n], args.seconds) for n in names}}
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
