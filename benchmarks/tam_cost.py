"""What TAM adds to answering: latency of `Explainer.explain(..., methods=("tam",))` against the
answer-only call (`methods=()`, which still runs the engine's plain forward for p_t and the LLR
forward), in audit mode (answer given) and generation mode, on the embedded model.

    python -m benchmarks.tam_cost                      # embedded model, CPU
    python -m benchmarks.tam_cost --device cuda --model <dir> --dtype bfloat16

Per scene and mode the two calls alternate (so drift hits both), after one warm-up each; the
report is the median over scenes x repeats, plus TAM's own stage time (`timings["tam"]`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from lvlm_attribution.engine import Explainer
from lvlm_attribution.schema import ExplainOptions
from lvlm_attribution.world.scenes import KINDS, generate

ROOT = Path(__file__).resolve().parent.parent


def _timed(explainer: Explainer, image, question, answer, methods, device) -> tuple[float, dict]:
    options = ExplainOptions(methods=methods)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = explainer.explain(image, question, answer=answer, options=options)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result.timings


def measure(explainer: Explainer, scenes: int, repeats: int, device: str) -> dict:
    samples = [generate(seed, KINDS[seed % len(KINDS)]) for seed in range(scenes)]
    out = {}
    for mode in ("audit", "generate"):
        base, tam, stage = [], [], []
        for sample in samples:
            image = Image.fromarray(sample.image)
            answer = sample.answer if mode == "audit" else None
            for methods in ((), ("tam",)):  # warm-up
                _timed(explainer, image, sample.question, answer, methods, device)
            for _ in range(repeats):
                base.append(_timed(explainer, image, sample.question, answer, (), device)[0])
                seconds, timings = _timed(explainer, image, sample.question, answer, ("tam",),
                                          device)
                tam.append(seconds)
                stage.append(timings["tam"])
        b, t = statistics.median(base), statistics.median(tam)
        out[mode] = {"answer_only_ms": 1e3 * b, "with_tam_ms": 1e3 * t,
                     "tam_stage_ms": 1e3 * statistics.median(stage),
                     "ratio": t / b, "calls": len(base)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "tiny-shapes-llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    explainer = Explainer.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    result = {"model": args.model.name, "device": args.device, "dtype": args.dtype,
              "torch_threads": torch.get_num_threads(),
              **measure(explainer, args.scenes, args.repeats, args.device)}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
