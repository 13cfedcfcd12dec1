"""Our TAM (`lvlm_attribution/methods/tam.py`) against the official implementation (xmed-lab/TAM,
`tam.py`, commit 7c7df1d), run on the embedded model's own tensors for a few planted scenes.

The official code is NOT part of this repository. Put its `tam.py` in a folder and its imports on
the path, then run (docs/methods/tam.md records the measured numbers):

    mkdir -p /tmp/tam_official && cp <TAM checkout>/tam.py /tmp/tam_official/
    python -m pip install --target /tmp/tam_official/site --no-deps scipy opencv-python-headless
    PYTHONPATH=/tmp/tam_official/site python -m benchmarks.tam_official \\
        --official /tmp/tam_official --json benchmarks/results/tam-official.json

What is changed to run it (nothing in its math):
  * `fitz` (PyMuPDF, used only to render the LaTeX token strip) is replaced by an empty module
    when it is not installed; the eval-only path (`save_fn=''`) never calls it.
  * The inputs it expects from `model.generate(output_hidden_states=True)` are built from ONE
    teacher-forced forward over [image | prompt | answer] (same numbers as KV-cached decoding):
    `logit_list[0]` = lm_head(hidden_states[-1]) over the prompt rows, `logit_list[i]` = the row
    that predicts answer token i (the row whose input is answer token i-1).
  * `special_ids` are derived from the context's own geometry (image token id; the token before
    and after the question; the two tokens before the answer) and checked against it.

Two runs of the official code per scene:
  * "as-is": the official file unchanged; its maps are uint8 (floor(255·x)), compared as x/255.
  * "patched": four source edits that make it compute what ours computes (each one a deviation
    documented in docs/methods/tam.md): (1) the first answer token's class is that token, not
    the last template token (`tokens[this_token_idx]` is the row's input, off by one); (2) the
    first question token's context map is of its own id, not of the greedy prediction at its
    row; (3) round 0 returns the first answer token's map, not the first question token's;
    (4) the map stays float (no uint8).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvlm_attribution.context import AttributionContext
from lvlm_attribution.engine import Explainer
from lvlm_attribution.methods.tam import (
    TamConfig,
    final_hidden_states,
    tam_inputs,
    token_activation_maps,
)
from lvlm_attribution.world.scenes import KINDS, generate

ROOT = Path(__file__).resolve().parent.parent
PATCHES = (  # (what, official text, replacement); each must occur in the official file
    ("first answer token's class",
     "            this_token_idx = logit_list[0].shape[1] - 1\n"
     "            cls_id = tokens[this_token_idx]",
     "            this_token_idx = logit_list[0].shape[1] - 1\n"
     "            cls_id = tokens[this_token_idx + 1]"),
    ("first question token's class",
     "cls_id = logit_list[0][0, prompt_idx[0] + 1].argmax(0)",
     "cls_id = tokens[this_token_idx]"),
    ("round 0 returns the first answer token's map",
     "            if t == 0:\n                first_ori = img_map",
     "            if t == len(prompt):\n                first_ori = img_map"),
    ("float maps", "img_scores = (img_scores * 255).astype('uint8')",
     "img_scores = img_scores * 255.0"),
)


def load_official(folder: Path, patched: bool) -> types.ModuleType:
    if "fitz" not in sys.modules and importlib.util.find_spec("fitz") is None:
        sys.modules["fitz"] = types.ModuleType("fitz")  # LaTeX rendering only
    source = (folder / "tam.py").read_text()
    if patched:
        for what, old, new in PATCHES:
            if old not in source:
                raise RuntimeError(f"patch {what!r} no longer applies to {folder / 'tam.py'}")
            source = source.replace(old, new)
    module = types.ModuleType("tam_official_patched" if patched else "tam_official")
    module.__file__ = str(folder / "tam.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module


def official_inputs(ctx: AttributionContext) -> tuple[list[int], list[torch.Tensor], dict]:
    """tokens, logit_list and special_ids as the official `TAM` expects them."""
    ids = ctx.inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = ctx.model(**ctx.inputs, output_hidden_states=True)
        logits = ctx.adapter.lm_head()(out.hidden_states[-1])  # official: lm_head(feats[-1])
    n_prompt = ctx.prompt.prompt_length
    logit_list = [logits[:, :n_prompt]]
    logit_list += [logits[:, n_prompt - 1 + i: n_prompt + i] for i in range(1, len(ctx.answer_ids))]
    q = ctx.question_positions.tolist()
    visual = ctx.visual_positions.tolist()
    image_ids = {ids[v] for v in visual}
    if len(image_ids) != 1:
        raise ValueError("the official `img_id` int form needs one image token id")
    special_ids = {"img_id": [image_ids.pop()],
                   "prompt_id": [[ids[q[0] - 1]], [ids[q[-1] + 1]]],
                   "answer_id": [[ids[n_prompt - 2], ids[n_prompt - 1]], -1]}
    return ids, logit_list, special_ids


def run_official(module, ctx: AttributionContext, image: Image.Image, processor) -> np.ndarray:
    tokens, logit_list, special_ids = official_inputs(ctx)
    records: list = []
    maps = [module.TAM(tokens, ctx.grid, logit_list, special_ids, image, processor, "", i,
                       records, True)
            for i in range(len(ctx.answer_ids))]
    return np.stack([np.asarray(m, dtype=np.float64) for m in maps])


def ours(ctx: AttributionContext) -> np.ndarray:
    hidden = final_hidden_states(ctx.model, ctx.adapter, ctx.inputs)[0]
    with torch.no_grad():
        out = token_activation_maps(tam_inputs(ctx, hidden), ctx.grid, TamConfig())
    return out["maps"].double().numpy()


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.ravel(), b.ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    corr = (float(np.corrcoef(a[finite], b[finite])[0, 1])
            if finite.sum() > 1 and a[finite].std() > 0 and b[finite].std() > 0 else None)
    return {"max_abs_diff": float(np.abs(a[finite] - b[finite]).max()) if finite.any() else None,
            "pearson": corr, "non_finite_official": int((~np.isfinite(b)).sum())}


def compare(explainer: Explainer, folder: Path, seeds: list[int]) -> list[dict]:
    as_is, patched = load_official(folder, False), load_official(folder, True)
    rows = []
    for seed in seeds:
        for kind in KINDS:
            sample = generate(seed, kind)
            image = Image.fromarray(sample.image)
            ctx = explainer.context(image, sample.question, sample.answer)
            mine = ours(ctx)
            official = run_official(as_is, ctx, image, explainer.processor) / 255.0
            fixed = run_official(patched, ctx, image, explainer.processor) / 255.0
            rows.append({
                "seed": seed, "kind": kind, "question": sample.question,
                "answer": sample.answer, "tokens": len(ctx.answer_ids),
                "patched_all_tokens": agreement(mine, fixed),
                "as_is_first_token": agreement(mine[:1], official[:1]),
                "as_is_later_tokens": (agreement(mine[1:], official[1:])
                                       if len(mine) > 1 else None),
                # ours quantized like the official (floor(255 x)): equal levels where the
                # context quirks do not matter
                "as_is_later_equal_levels": (float(np.mean(
                    np.floor(mine[1:] * 255) == np.round(official[1:] * 255)))
                    if len(mine) > 1 else None),
            })
    return rows


def summary(rows: list[dict]) -> dict:
    def worst(key, field):
        values = [r[key][field] for r in rows if r[key] and r[key][field] is not None]
        return (max(values) if field == "max_abs_diff" else min(values)) if values else None

    keys = ("patched_all_tokens", "as_is_first_token", "as_is_later_tokens")
    out = {k: {"worst_max_abs_diff": worst(k, "max_abs_diff"),
               "worst_pearson": worst(k, "pearson")} for k in keys}
    pearson = [r["as_is_later_tokens"]["pearson"] for r in rows
               if r["as_is_later_tokens"] and r["as_is_later_tokens"]["pearson"] is not None]
    out["as_is_later_tokens"]["median_pearson"] = float(np.median(pearson)) if pearson else None
    levels = [r["as_is_later_equal_levels"] for r in rows
              if r["as_is_later_equal_levels"] is not None]
    out["as_is_later_equal_levels_mean"] = float(np.mean(levels)) if levels else None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True,
                        help="folder holding the official tam.py")
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "tiny-shapes-llava")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 11])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    explainer = Explainer.from_pretrained(args.model, device="cpu", dtype="float32")
    rows = compare(explainer, args.official, args.seeds)
    result = {"official": "xmed-lab/TAM tam.py @ 7c7df1d", "model": args.model.name,
              "summary": summary(rows), "scenes": rows}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
