"""`lvlm-attribution` command line: train, model-eval, explain, evaluate, call, audit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "model_store" / "tiny-shapes-llava"


def _train(args: argparse.Namespace) -> int:
    from .world.training import TrainConfig, train

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      eval_every=args.eval_every)
    summary = train(cfg, Path(args.out), log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(summary["history"][-1], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvlm-attribution", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the embedded model on the planted world")
    p.add_argument("--out", default=str(EMBEDDED_MODEL))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
