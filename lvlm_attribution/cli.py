"""`lvlm-attribution` command line: train, model-eval, explain, methods, evaluate, call, audit."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "model_store" / "tiny-shapes-llava"
# engine.DTYPES' keys, spelled out so that building the parser does not import torch
# (tests/test_cli.py checks that the two agree).
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
SETTINGS_EXAMPLE = '{"igos": {"iterations": 3}}'
METHOD_SETTINGS_HELP = ("per-method setting overrides as JSON, or @FILE.json holding it, e.g. "
                        f"'{SETTINGS_EXAMPLE}'; see `lvlm-attribution methods` for the settings, "
                        "their defaults and limits")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- shared argument types ----------------------------------------------------------------------
def method_settings_arg(text: str) -> dict[str, dict[str, Any]]:
    """argparse type of --method-settings: a JSON object of per-method objects, given inline or
    as @FILE. Only the shape is checked here; the engine (or the service) checks the settings."""
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {err.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            f"expected e.g. {SETTINGS_EXAMPLE}") from None
    if not (isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object with one object of settings per method, e.g. "
            f"{SETTINGS_EXAMPLE}; got {text.strip()[:60]}")
    return value


def split_names(text: str | None) -> tuple[str, ...]:
    """A comma-separated list, empty items dropped."""
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def check_methods(names: typing.Iterable[str]) -> None:
    """ArgumentTypeError naming the methods that are not registered (imports the registry,
    hence torch: call it only where a model runs here)."""
    from .methods import list_methods

    unknown = sorted(set(names) - set(list_methods()))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; available: "
                                         f"{list_methods()} (see `lvlm-attribution methods`)")


def method_list(text: str) -> tuple[str, ...]:
    """argparse type of --methods where the methods run locally: registered names only."""
    names = split_names(text)
    check_methods(names)
    return names


def version_text() -> str:
    """This package's version and those of torch and transformers (from metadata: no import)."""
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"lvlm-attribution {version('lvlm-attribution')} (torch {version('torch')}, "
            f"transformers {version('transformers')})")


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
    p.add_argument("--out", default=str(EMBEDDED_MODEL),
                   help="model directory to write (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="scenes per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="initialisation and shuffling seed (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=250,
                   help="evaluate on held-out scenes every N steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=200,
                   help="learning-rate warm-up steps (default: %(default)s)")
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
    p.add_argument("--model", default=str(EMBEDDED_MODEL),
                   help="model directory (default: the embedded model)")
    p.add_argument("--scenes", type=int, default=1000,
                   help="held-out scenes to ask (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first scene seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
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
    options = ExplainOptions(methods=args.methods, max_new_tokens=args.max_new_tokens,
                             per_token_maps=args.per_token_maps,
                             method_settings=args.method_settings or {})
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
    p.add_argument("--model", default=str(EMBEDDED_MODEL),
                   help="model directory (default: the embedded model)")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--question", required=True, help="the question about the image")
    p.add_argument("--answer", default=None, help="audit mode: explain this answer as given")
    p.add_argument("--methods", type=method_list, default="glimpse,dexar",
                   help="comma-separated attribution methods (default: %(default)s; "
                   "see `lvlm-attribution methods`)")
    p.add_argument("--method-settings", type=method_settings_arg, default=None,
                   metavar="JSON|@FILE",
                   help=METHOD_SETTINGS_HELP)
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="longest generated answer, in tokens (default: %(default)s)")
    p.add_argument("--per-token-maps", action="store_true",
                   help="also print one heatmap per answer token")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="model weights' dtype (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
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
    from .world.scenes import KINDS

    p = sub.add_parser("scene", help="write one planted scene as PNG and print its question")
    p.add_argument("--seed", type=int, default=0,
                   help="the scene's seed: same seed, same scene (default: %(default)s)")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="question kind (default: drawn from the seed)")
    p.add_argument("--out", default="scene.png", help="PNG to write (default: %(default)s)")
    p.set_defaults(func=_scene)


# ---- methods (the registry: settings, defaults, limits; no model) ------------------------------
def _type_text(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def method_table() -> dict[str, dict[str, Any]]:
    """Every registered method: what it needs and each setting's type, default and limit
    (None: no limit). The same shape as --method-settings, with descriptions for values."""
    from .engine import Explainer
    from .methods import get_method, list_methods

    table = {}
    for name in list_methods():
        spec = get_method(name)
        hints = typing.get_type_hints(spec.config)
        defaults = Explainer.default_settings(name)
        limits = spec.limits
        table[name] = {
            "summary": spec.summary, "needs_gradients": spec.needs_gradients,
            "needs_perturbation": spec.needs_perturbation,
            "settings": {f.name: {"type": _type_text(hints[f.name]), "default": defaults[f.name],
                                  "limit": limits.get(f.name)}
                         for f in dataclasses.fields(spec.config)}}
    return table


def format_method_table(table: dict[str, dict[str, Any]]) -> str:
    blocks = []
    for name, info in table.items():
        needs = [k for k in ("gradients", "perturbation") if info[f"needs_{k}"]]
        rows = [("setting", "type", "default", "limit")]
        rows += [(key, s["type"], json.dumps(s["default"]),
                  "-" if s["limit"] is None else f"{s['limit']:g}")
                 for key, s in info["settings"].items()]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{name}: {info['summary']}",
                 f"  needs: {', '.join(needs) or 'a forward pass only'}"]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                  + "  " + row[3] for row in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _methods(args: argparse.Namespace) -> int:
    table = method_table()
    print(json.dumps(table, indent=1) if args.json else format_method_table(table))
    return 0


def add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list the attribution methods and their settings "
                       "(type, default, limit); loads no model")
    p.add_argument("--json", action="store_true",
                   help='print JSON: {method: {summary, needs_*, settings: {name: {type, '
                   'default, limit}}}}')
    p.set_defaults(func=_methods)


# ---- call (a client of the running service) ----------------------------------------------------
def _call(args: argparse.Namespace) -> int:
    from .client import run_call

    return run_call(args)


def add_call(sub) -> None:
    p = sub.add_parser("call", help="send one request to a running service (REST or gRPC)")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="http://host:8080 (REST), grpc://host:50051 (the typed gateway) "
                        "or torchserve-grpc://host:7070 (TorchServe's raw gRPC)")
    p.add_argument("--model", default="lvlm", help="TorchServe model name (default: %(default)s)")
    p.add_argument("--image", required=True, help="image file to send")
    p.add_argument("--question", required=True, help="the question about the image")
    p.add_argument("--answer", default=None, help="audit mode: explain this answer")
    p.add_argument("--methods", default="", help="comma-separated; default: the server's")
    p.add_argument("--method-settings", type=method_settings_arg, default=None,
                   metavar="JSON|@FILE",
                   help=METHOD_SETTINGS_HELP + "; the server applies its own limits")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="longest generated answer, in tokens (default 0: the server's)")
    p.add_argument("--encoding", choices=["png_u8", "f16_zlib"], default="png_u8",
                   help="heatmap encoding: 8-bit PNG or zlib-compressed float16 "
                   "(default: %(default)s)")
    p.add_argument("--overlay", action="store_true",
                   help="also ask for heatmaps drawn over the image")
    p.add_argument("--per-token-maps", action="store_true",
                   help="also ask for one heatmap per answer token")
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
SUBCOMMANDS = [add_train, add_model_eval, add_explain, add_methods, add_scene, add_call,
               add_audit, add_audit_sample, add_evaluate, add_grounding_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvlm-attribution", description=__doc__)
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the version (and torch's, transformers') and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
