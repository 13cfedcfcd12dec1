"""What the typed gateway adds: the same unary request straight to TorchServe's gRPC and through
lvlm.v1.Explainer, side by side, at each concurrency.

    python -m loadtests.gateway_overhead [--requests 200] [--concurrency 1,8] [--rounds 3]
                                         [--methods dexar] [--out runs/gateway/overhead.json]

Starts a private TorchServe (loadtests/server.py, free 127.0.0.1 ports) serving the embedded
model and a gateway in front of it, then, per concurrency level and round, runs `--requests`
requests (answer + `--methods`) on each path with that many closed-loop workers; the order of
the two paths alternates between rounds so that neither always runs on a warmer machine. Both
clients are grpc.aio and parse the ExplainResponse (the direct one unwraps `prediction`), so
the difference is the gateway's hop. Job tickets are off for this run (`useJobTicket: false`):
with them, 7 of 8 concurrent requests are refused at once, which would measure TorchServe's
refusals and the clients' backoff, not the gateway. Prints a table; writes every latency to
--out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import grpc

from lvlm_attribution.api.torchserve import inference_pb2, inference_pb2_grpc
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.api.v1 import explainer_pb2_grpc
from lvlm_attribution.world.scenes import generate

from .server import MODEL, integration, local_torchserve

OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
           ("grpc.max_send_message_length", 64 << 20)]
PATHS = ("direct", "gateway")


def request(methods: list[str]) -> pb.ExplainRequest:
    from PIL import Image

    scene = generate(3, "color")
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG")
    return pb.ExplainRequest(image=buf.getvalue(), question=scene.question, methods=methods)


class Direct:
    """TorchServe's InferenceAPIsService, as a caller without the gateway must use it."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=OPTIONS)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)

    async def explain(self, req: pb.ExplainRequest) -> pb.ExplainResponse:
        reply = await self.stub.Predictions(inference_pb2.PredictionsRequest(
            model_name=MODEL, input={"request": req.SerializeToString()}), timeout=120)
        return pb.ExplainResponse.FromString(reply.prediction)


class Typed:
    """lvlm.v1.Explainer on the gateway."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=OPTIONS)
        self.stub = explainer_pb2_grpc.ExplainerStub(self.channel)

    async def explain(self, req: pb.ExplainRequest) -> pb.ExplainResponse:
        return await self.stub.Explain(req, timeout=120)


async def run_step(client, req: pb.ExplainRequest, n: int, concurrency: int
                   ) -> tuple[list[float], float]:
    """(latency of each of `n` requests, wall seconds) with `concurrency` closed-loop workers."""
    latencies: list[float] = []
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            resp = await client.explain(req)
            latencies.append(time.perf_counter() - t0)
            assert resp.answer and resp.heatmaps, "empty response"

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(targets: dict[str, str], req: pb.ExplainRequest, args: argparse.Namespace
                  ) -> dict:
    clients = {"direct": Direct(targets["direct"]), "gateway": Typed(targets["gateway"])}
    for client in clients.values():  # warm: connections, the worker's first-call costs
        for _ in range(3):
            await client.explain(req)
    results: dict = {}
    for c in args.concurrency:
        samples = {p: {"latencies": [], "wall_s": 0.0} for p in PATHS}
        for r in range(args.rounds):
            for path in (PATHS if r % 2 == 0 else PATHS[::-1]):
                lat, wall = await run_step(clients[path], req, args.requests, c)
                samples[path]["latencies"] += lat
                samples[path]["wall_s"] += wall
        results[str(c)] = {p: summary(s) for p, s in samples.items()}
    for client in clients.values():
        await client.channel.close()
    return results


def summary(sample: dict) -> dict:
    lat = sample["latencies"]
    return {"n": len(lat), "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * percentile(lat, 0.99), "rps": len(lat) / sample["wall_s"],
            "latencies_ms": [round(1000 * x, 3) for x in lat]}


def table(results: dict) -> str:
    rows = ["| concurrency | path | n | p50 ms | p99 ms | req/s |", "|---|---|---|---|---|---|"]
    for c, paths in results.items():
        for path in PATHS:
            s = paths[path]
            rows.append(f"| {c} | {path} | {s['n']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                        f"{s['rps']:.2f} |")
        d, g = paths["direct"], paths["gateway"]
        rps = 100 * (g["rps"] / d["rps"] - 1)
        rows.append(f"| {c} | **gateway − direct** | | **{g['p50_ms'] - d['p50_ms']:+.1f}** | "
                    f"{g['p99_ms'] - d['p99_ms']:+.1f} | **{rps:+.1f}%** |")
    return "\n".join(rows)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "grpcio": grpc.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="per path, concurrency and round")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default="dexar")
    p.add_argument("--out", type=Path, default=Path("runs/gateway/overhead.json"))
    args = p.parse_args(argv)
    req = request([m for m in args.methods.split(",") if m])
    overrides = {"useJobTicket": False, "jobQueueSize": 4 * max(args.concurrency)}
    with local_torchserve(overrides) as server, \
            integration().running_gateway(server, MODEL) as gateway:
        results = asyncio.run(measure({"direct": server.grpc, "gateway": gateway.target},
                                      req, args))
    report = {"command": " ".join(["python -m loadtests.gateway_overhead", *(argv or
                                   sys.argv[1:])]), "machine": machine(),
              "methods": req.methods[:], "requests": args.requests, "rounds": args.rounds,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
