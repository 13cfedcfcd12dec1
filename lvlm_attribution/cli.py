"""`lvlm-attribution` command line: train, model-eval, explain, evaluate, call, audit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "model_store" / "tiny-shapes-llava"


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- train -----------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from .world.training import TrainConfig, train

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      eval_every=args.eval_every, warmup=args.warmup, init_from=args.init_from,
                      data_offset=args.data_offset)
    summary = train(cfg, Path(args.out), log=_log)
    print(json.dumps(summary["history"][-1], indent=2))
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the embedded model on the planted world")
    p.add_argument("--out", default=str(EMBEDDED_MODEL))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--init-from", default=None, help="start from these weights (stage 2)")
    p.add_argument("--data-offset", type=int, default=0, help="first training scene seed")
    p.set_defaults(func=_train)


# ---- model-eval ------------------------------------------------------------------------------
def _model_eval(args: argparse.Namespace) -> int:
    from .engine import Explainer
    from .world.model_eval import ModelEvalConfig, format_report, run_model_eval

    explainer = Explainer.from_pretrained(args.model, device=args.device)
    report = run_model_eval(explainer, ModelEvalConfig(scenes=args.scenes, seed=args.seed))
    if args.json:
        print(format_report(report))
    else:
        print(f"accuracy {report['accuracy']:.4f} on {report['scenes']} scenes")
        for kind, acc in report["per_kind"].items():
            print(f"  {kind:10s} {acc:.4f}")
        print(f"content LLR median {report['content_llr_median']:.3f} nats, "
              f"filler LLR median {report['filler_llr_median']:.3f} nats")
    return 0


def add_model_eval(sub) -> None:
    p = sub.add_parser("model-eval", help="accuracy and evidence reliance on held-out scenes")
    p.add_argument("--model", default=str(EMBEDDED_MODEL))
    p.add_argument("--scenes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_model_eval)


# ---- explain ------------------------------------------------------------------------------------
def _explain(args: argparse.Namespace) -> int:
    from .engine import Explainer, InvalidInput
    from .images import ImageError, load_image
    from .schema import ExplainOptions
    from .service.config import ServiceConfig

    limits = ServiceConfig()  # the image limits a default service applies: the same pixels
    try:
        image = load_image(Path(args.image).read_bytes(), max_pixels=limits.max_image_pixels,
                           max_aspect_ratio=limits.max_aspect_ratio)
    except ImageError as err:
        _log(f"error: image {args.image}: {err.message}")
        return 2
    explainer = Explainer.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    options = ExplainOptions(methods=tuple(m for m in args.methods.split(",") if m),
                             max_new_tokens=args.max_new_tokens,
                             per_token_maps=args.per_token_maps)
    try:
        result = explainer.explain(image, args.question, answer=args.answer, options=options)
    except InvalidInput as err:
        _log(f"error: {err}")
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    print(f"answer: {result.answer}")
    for token in result.tokens:
        weights = " ".join(f"{k}={v:.3f}" for k, v in token.weights.items())
        print(f"  {token.text:>12s}  p={token.probability:.3f}  {weights}")
    for name, out in result.methods.items():
        print(f"{name} heatmap ({result.grid[0]}x{result.grid[1]}):")
        for row in out.visual_map:
            print("   " + " ".join(f"{v:4.2f}" for v in row))
    print("timings (s): " + ", ".join(f"{k}={v:.3f}" for k, v in result.timings.items()))
    return 0


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="answer (or take a given answer) and explain it")
    p.add_argument("--model", default=str(EMBEDDED_MODEL))
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--answer", default=None, help="audit mode: explain this answer as given")
    p.add_argument("--methods", default="glimpse,dexar")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--per-token-maps", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_explain)


# ---- scene (a convenience for trying the model) ------------------------------------------------
def _scene(args: argparse.Namespace) -> int:
    from PIL import Image

    from .world.scenes import generate

    sample = generate(args.seed, args.kind)
    Image.fromarray(sample.image).save(args.out)
    print(json.dumps({"image": args.out, "question": sample.question, "answer": sample.answer,
                      "kind": sample.kind}))
    return 0


def add_scene(sub) -> None:
    p = sub.add_parser("scene", help="write one planted scene as PNG and print its question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", default=None)
    p.add_argument("--out", default="scene.png")
    p.set_defaults(func=_scene)


# ---- call (a client of the running service) ----------------------------------------------------
def _call(args: argparse.Namespace) -> int:
    from .client import run_call

    return run_call(args)


def add_call(sub) -> None:
    p = sub.add_parser("call", help="send one request to a running service (REST or gRPC)")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="http://host:8080 (REST) or grpc://host:7070 (gRPC)")
    p.add_argument("--model", default="lvlm")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--answer", default=None, help="audit mode: explain this answer")
    p.add_argument("--methods", default="", help="comma-separated; default: the server's")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--encoding", choices=["png_u8", "f16_zlib"], default="png_u8")
    p.add_argument("--overlay", action="store_true")
    p.add_argument("--per-token-maps", action="store_true")
    p.add_argument("--stream", action="store_true", help="print the answer first")
    p.add_argument("--json", action="store_true", help="print the response as proto3 JSON")
    p.set_defaults(func=_call)


# ---- audit, audit-sample (bulk explanations of flagged answers; lvlm_attribution/audit) ----------
def add_audit(sub) -> None:
    from .audit.cli import add_audit as add

    add(sub)


def add_audit_sample(sub) -> None:
    from .audit.cli import add_audit_sample as add

    add(sub)


# ---- evaluate, grounding-eval (lvlm_attribution/evaluation/cli_eval.py) --------------------------
def add_evaluate(sub) -> None:
    from .evaluation.cli_eval import add_evaluate as add

    add(sub)


def add_grounding_eval(sub) -> None:
    from .evaluation.cli_eval import add_grounding_eval as add

    add(sub)


# Each subcommand registers itself here; add new ones as add_<name> functions above.
SUBCOMMANDS = [add_train, add_model_eval, add_explain, add_scene, add_call, add_audit,
               add_audit_sample, add_evaluate, add_grounding_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvlm-attribution", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
