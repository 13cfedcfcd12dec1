"""Concurrency ramp against a local TorchServe serving `lvlm`; writes JSON, a table and a PNG.

    python -m loadtests.run --out runs/load                        # starts its own TorchServe
    python -m loadtests.run --rest http://127.0.0.1:8080 --grpc 127.0.0.1:7070   # a running one
    python -m loadtests.run --concurrency 1,2 --step-seconds 5 --profiles default   # a quick look

For each profile (default = the service's default methods, GLIMPSE + DEX-AR; monitoring = DEX-AR
only), each transport (rest, grpc) and each concurrency level, `C` closed-loop virtual users send
streamed requests (`stream: true`: the answer first, then everything) about distinct scenes for
`--step-seconds` or `--step-requests`, whichever comes first. A request refused because the one
worker is busy (job tickets: HTTP 503 / gRPC UNAVAILABLE-class) is retried with jittered
exponential backoff (50 ms doubling to 1 s) until the step's deadline, like a well-behaved client;
latency is measured from the first attempt, so it includes that wait.

Outputs under --out: report.json (config, per-step accounting and figures, every request),
table.md, table.txt, load-latency.png. Exit status 1 when a request is unaccounted for or a
normal request ended in anything but a rejection at the step's end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from . import loadgen
from .loadgen import RetryPolicy, StepConfig
from .report import markdown_table, plot, summarize, text_table

PROFILES = {"default": [], "monitoring": ["dexar"]}  # [] = the service's default_methods


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path("runs/load"))
    p.add_argument("--rest", help="REST base URL of a running server (default: start one)")
    p.add_argument("--grpc", help="gRPC host:port of a running server")
    p.add_argument("--server-info", type=Path,
                   help="JSON from `python -m loadtests.server --info` (rest, grpc)")
    p.add_argument("--transports", default="rest,grpc")
    p.add_argument("--profiles", default="default,monitoring")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--step-seconds", type=float, default=30.0)
    p.add_argument("--step-requests", type=int, default=500)
    p.add_argument("--max-total-seconds", type=float, default=1800.0,
                   help="hard bound: later steps are skipped once this is spent")
    p.add_argument("--warmup", type=int, default=2, help="requests per transport, not counted")
    p.add_argument("--scenes", type=int, default=64, help="distinct scenes to cycle through")
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="send this image file instead of generated scenes (repeatable; a real "
                        "model on a GPU pod); questions from --question")
    p.add_argument("--question", action="append", default=[],
                   help="question for the --image files (one, or one per image)")
    p.add_argument("--no-stream", action="store_true", help="unary requests instead")
    p.add_argument("--max-attempts", type=int, default=10_000,
                   help="attempts per request on rejection (1 = never retry)")
    p.add_argument("--timeout", type=float, default=loadgen.DEFAULT_TIMEOUT_S)
    p.add_argument("--allow-non-loopback", action="store_true",
                   help="allow a non-loopback target (an in-cluster load job)")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    a.transports = [t for t in a.transports.split(",") if t]
    a.profiles = [x for x in a.profiles.split(",") if x]
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c]
    bad = set(a.transports) - {"rest", "grpc"} or set(a.profiles) - set(PROFILES)
    if bad:
        p.error(f"unknown transport/profile: {sorted(bad)}")
    if a.image and len(a.question) not in (1, len(a.image)):
        p.error("give one --question, or one per --image")
    if a.step_requests < 1 or a.step_seconds <= 0 or a.max_total_seconds <= 0:
        p.error("steps must be bounded: --step-requests >= 1, --step-seconds > 0")
    return a


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit,
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "machine": platform.machine(), "python": platform.python_version(),
            "loadavg_at_end": os.getloadavg()}


async def warmup(make_client, specs, n: int) -> list[dict]:
    out = []
    for spec in specs[:n]:
        client = make_client()
        r = await loadgen.send(client, spec, time.perf_counter(), RetryPolicy(max_attempts=50),
                               time.perf_counter() + 60)
        if client.grpc is not None:
            await client.grpc.close()
        out.append({"kind": r.kind, "latency": r.latency, "message": r.message})
    return out


async def ramp(args: argparse.Namespace, rest: str, grpc_target: str) -> dict:
    t_begin = time.perf_counter()
    stream = not args.no_stream
    steps, warm = [], {}
    for profile in args.profiles:
        images = [(path.read_bytes(), args.question[i % len(args.question)])
                  for i, path in enumerate(args.image)]
        specs = loadgen.request_specs(args.scenes, PROFILES[profile], stream=stream,
                                      images=images)
        for transport in args.transports:
            make = loadgen.make_client_factory(transport, rest, grpc_target,
                                               loadgen.HttpOptions(timeout=args.timeout),
                                               args.timeout)
            warm[f"{profile}/{transport}"] = await warmup(make, specs, args.warmup)
            for c in args.concurrency:
                spent = time.perf_counter() - t_begin
                if spent + args.step_seconds > args.max_total_seconds:
                    print(f"skipping {profile}/{transport}/c={c}: --max-total-seconds reached",
                          flush=True)
                    continue
                step = StepConfig(c, args.step_seconds, args.step_requests,
                                  RetryPolicy(max_attempts=args.max_attempts))
                t0 = time.perf_counter()
                results = await loadgen.closed_loop(make, specs, step, t0, seed=c)
                wall = time.perf_counter() - t0
                entry = {"profile": profile, "transport": transport, "concurrency": c,
                         "summary": summarize(results, wall),
                         "results": [r.to_dict() for r in results]}
                steps.append(entry)
                m = entry["summary"]
                print(f"{profile:10s} {transport:4s} c={c:<2d} sent={m['sent']:<4d} "
                      f"ok={m['ok']:<4d} ok/s={m['throughput_ok_per_s']:.2f} "
                      f"p50={m['latency_s']['p50'] or 0:.2f}s "
                      f"p95={m['latency_s']['p95'] or 0:.2f}s "
                      f"errors={m['errors_by_kind']}", flush=True)
    return {"steps": steps, "warmup": warm, "elapsed_s": time.perf_counter() - t_begin}


def check(steps: list[dict]) -> list[str]:
    """Every request accounted for; anything but ok or a final rejection is a problem."""
    problems = []
    for s in steps:
        m = s["summary"]
        where = f"{s['profile']}/{s['transport']}/c={s['concurrency']}"
        if m["sent"] != m["ok"] + m["errors"] or m["errors_without_kind"]:
            problems.append(f"{where}: unaccounted requests ({m})")
        other = {k: n for k, n in m["errors_by_kind"].items() if not loadgen.is_rejection(k)}
        if other:
            problems.append(f"{where}: errors other than rejections: {other}")
    return problems


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    server_cfg: dict = {}
    with contextlib.ExitStack() as stack:
        if args.server_info:
            info = json.loads(args.server_info.read_text())
            rest, grpc_target = info["rest"], info["grpc"]
        elif args.rest or args.grpc:
            rest, grpc_target = args.rest or "", args.grpc or ""
        else:
            from .server import local_torchserve

            print("starting a private TorchServe (loadtests.server) ...", flush=True)
            t = time.perf_counter()
            server = stack.enter_context(local_torchserve())
            print(f"READY after {time.perf_counter() - t:.1f} s: REST {server.rest}, "
                  f"gRPC {server.grpc}", flush=True)
            rest, grpc_target = server.rest, server.grpc
            server_cfg = {k: v for k, v in server.model_config.items() if k != "handler"}
            server_cfg["handler.default_methods"] = server.model_config["handler"].get(
                "default_methods")
        for url in filter(None, [rest, f"//{grpc_target}" if grpc_target else ""]):
            loadgen.check_loopback(urlsplit(url).hostname or "", args.allow_non_loopback)
        data = asyncio.run(ramp(args, rest, grpc_target))
    problems = check(data["steps"])
    title = args.title or (f"lvlm load: {os.cpu_count()} CPU cores, "
                           f"{'streamed' if not args.no_stream else 'unary'} requests, "
                           f"{args.step_seconds:g} s per step")
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "environment": environment(), "server": {"rest": rest, "grpc": grpc_target,
                                                       "model_config": server_cfg},
              "title": title, **data, "problems": problems}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    steps = data["steps"]
    (args.out / "table.md").write_text(markdown_table(steps) + "\n")
    (args.out / "table.txt").write_text(text_table(steps) + "\n")
    if steps:
        plot(steps, args.out / "load-latency.png", title)
    print()
    print(text_table(steps))
    total = sum(s["summary"]["sent"] for s in steps)
    ok = sum(s["summary"]["ok"] for s in steps)
    print(f"\n{total} requests sent, {ok} ok, {total - ok} errors (all with a kind); "
          f"report: {args.out}/report.json, table.md, load-latency.png")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # unwinds through local_torchserve(), which stops TorchServe


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    raise SystemExit(main())
