"""CLI parts of `evaluate` and `grounding-eval` (registered by lvlm_attribution/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import METHOD_SETTINGS_HELP, method_list, method_settings_arg
from ..world.scenes import KINDS

EMBEDDED_MODEL = Path(__file__).resolve().parents[2] / "model_store" / "tiny-shapes-llava"


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k for k in text.split(",") if k)
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kinds {bad}; known: {KINDS}")
    return kinds


def _print(table: str, report: dict, as_json: bool) -> None:
    """The human-readable table on stdout, or with --json on stderr and the JSON on stdout."""
    print(table, file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(report, indent=1))


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants K/N, e.g. 0/2; got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N; got {text!r}")
    return k, n


def _evaluate(args: argparse.Namespace) -> int:
    from ..engine import Explainer
    from .run import EvalConfig, format_report, parse_methods, report_from_file, run_evaluation

    if args.report_only:
        if not args.out:
            print("error: --report-only needs --out", file=sys.stderr)
            return 2
        try:
            report = report_from_file([Path(p) for p in args.out.split(",")], args.scenes)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        _print(format_report(report), report, args.json)
        return 0
    settings = args.method_settings or {}
    try:
        parse_methods(args.methods, settings)
    except (KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = EvalConfig(scenes=args.scenes or 100, seed=args.seed, methods=args.methods,
                     method_settings=settings, kinds=args.kinds, igos_scenes=args.igos_scenes,
                     steps=args.steps, batch_size=args.batch_size,
                     perturbation=not args.no_perturbation, ppl_points=args.ppl_points,
                     shard=args.shard)
    explainer = Explainer.from_pretrained(args.model, device=args.device)
    report = run_evaluation(explainer, cfg, Path(args.out) if args.out else None)
    _print(format_report(report), report, args.json)
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="attribution maps vs planted ground truth (held-out "
                       "scenes, audit mode on the correct answer)")
    p.add_argument("--model", default=str(EMBEDDED_MODEL),
                   help="model directory (default: the embedded model)")
    p.add_argument("--scenes", type=int, default=None,
                   help="total, question kinds in turn (default 100; with --report-only: all)")
    p.add_argument("--seed", type=int, default=0, help="first scene seed (default: %(default)s)")
    p.add_argument("--methods", default="glimpse,dexar",
                   help="comma-separated; variants as name:key=value[:key=value], e.g. "
                        "glimpse:depth_prior=false,dexar:key_aggregation=mean")
    p.add_argument("--method-settings", type=method_settings_arg, default=None,
                   metavar="JSON|@FILE",
                   help=METHOD_SETTINGS_HELP + "; applied to all variants of a method")
    p.add_argument("--kinds", type=_kinds, default=KINDS, help="comma-separated question kinds")
    p.add_argument("--igos-scenes", type=int, default=None,
                   help="run iGOS++ only on the first K scenes (it is expensive)")
    p.add_argument("--steps", type=int, default=50, help="deletion/insertion steps")
    p.add_argument("--ppl-points", type=int, default=11,
                   help="perplexity-AUC grid: this many equally spaced fractions in [0, 1]")
    p.add_argument("--batch-size", type=int, default=32, help="images per scoring forward")
    p.add_argument("--no-perturbation", action="store_true",
                   help="skip deletion/insertion and perplexity AUC (localisation only)")
    p.add_argument("--out", default=None, help="JSON lines, one per scene; resumed if present")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="K/N",
                   help="run only the scenes with index %% N == K (one process per core, each "
                        "with its own --out; merge with --report-only --out a,b)")
    p.add_argument("--report-only", action="store_true",
                   help="aggregate the scenes already in --out (comma-separated files: shards of "
                        "one run; read-only, no model; the first --scenes indices)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (the table goes to stderr)")
    p.set_defaults(func=_evaluate)


def _grounding_eval(args: argparse.Namespace) -> int:
    from ..engine import Explainer
    from .grounding_eval import GroundingEvalConfig, format_grounding, run_grounding_eval

    cfg = GroundingEvalConfig(scenes=args.scenes, seed=args.seed, methods=args.methods,
                              kinds=args.kinds)
    explainer = Explainer.from_pretrained(args.model, device=args.device)
    report = run_grounding_eval(explainer, cfg, Path(args.out) if args.out else None,
                                do_calibrate=args.calibrate)
    text = format_grounding(report)
    if report.get("calibration_literal"):
        text += "\n" + report["calibration_literal"] + "\n"
    _print(text, report, args.json)
    return 0


def add_grounding_eval(sub) -> None:
    p = sub.add_parser("grounding-eval", help="grounding flags on planted errors: precision, "
                       "recall, false-flag rate, AUROC (audit mode)")
    p.add_argument("--model", default=str(EMBEDDED_MODEL),
                   help="model directory (default: the embedded model)")
    p.add_argument("--scenes", type=int, default=500,
                   help="scenes, question kinds in turn (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first scene seed (default: %(default)s)")
    p.add_argument("--methods", type=method_list, default="glimpse,dexar",
                   help="comma-separated methods run per explanation (their signals feed the "
                   "rule; empty: none)")
    p.add_argument("--kinds", type=_kinds, default=KINDS, help="comma-separated question kinds")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the rule on this run and print grounding.CALIBRATION (in-sample)")
    p.add_argument("--out", default=None, help="JSON lines of token signals; resumed if present")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (the table goes to stderr)")
    p.set_defaults(func=_grounding_eval)
