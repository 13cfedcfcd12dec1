"""`audit-sample`: a labelled JSONL for evaluating the audit from the planted world.

Every scene gives two items on the same image and question: the correct answer (truth
"correct") and a planted error (truth "corrupted"): one content word swapped (colour, shape,
count, one position word) or, for existence questions, the claim flipped (asserting an absent
object, or denying a present one). The corruption is `lvlm_attribution.world.corrupt` when it is
importable, else the minimal local one below (same rules); either only ever changes words the
image decides, so the corrupted answer is always false for the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..world.scenes import COUNT_WORDS, KINDS, PALETTE, SHAPES, Sample, generate, held_out


def corrupt_answer(sample: Sample, rng: np.random.Generator) -> tuple[str, str]:
    """(corrupted answer, description of the change) for one sample."""
    words = sample.answer.split()
    if sample.kind == "existence":
        color, shape = words[4], words[5]
        if sample.extra.get("present"):
            return f"no there is no {color} {shape}", "existence: denies a present object"
        return f"yes there is a {color} {shape}", "existence: asserts an absent object"
    content = [i for i, flag in enumerate(sample.content) if flag]
    index = int(content[int(rng.integers(len(content)))])
    old = words[index]
    if sample.kind == "color":
        choices = [c for c in PALETTE if c != old]
    elif sample.kind == "shape":
        choices = [s for s in SHAPES if s != old]
    elif sample.kind == "count":
        choices = [w for w in COUNT_WORDS.values() if w != old]
    elif sample.kind == "position":
        choices = [{"top": "bottom", "bottom": "top", "left": "right", "right": "left"}[old]]
    else:
        raise ValueError(f"no corruption for question kind {sample.kind!r}")
    new = str(choices[int(rng.integers(len(choices)))])
    words[index] = new
    return " ".join(words), f"{sample.kind}: {old} -> {new}"


def _corrupt(sample: Sample, seed: int, rng: np.random.Generator
             ) -> tuple[str, str, list[int]]:
    """The world's corruption (lvlm_attribution.world.corrupt) when present, else the local one.
    Returns (answer, description, indices of the answer words carrying the false claim)."""
    try:
        from ..world.corrupt import corrupt
    except ImportError:
        wrong, change = corrupt_answer(sample, rng)
        old = sample.answer.split()
        return wrong, change, [i for i, (a, b) in enumerate(zip(old, wrong.split(),
                                                                strict=True))
                               if a != b and sample.content[i]]
    c = corrupt(sample, seed)
    return c.answer, c.description, list(c.targets)


def build_sample(out_dir: str | Path, scenes: int = 30, seed: int = 0) -> Path:
    """Writes DIR/flagged.jsonl and DIR/images/*.png; returns the JSONL path. Items: 2 x scenes,
    kinds in rotation, held-out scene seeds (never training scenes)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines: list[dict[str, Any]] = []
    for i in range(scenes):
        scene_seed = held_out(seed, i)
        kind = KINDS[i % len(KINDS)]
        sample = generate(scene_seed, kind)
        name = f"s{i:04d}"
        Image.fromarray(sample.image).save(out / "images" / f"{name}.png")
        wrong, change, targets = _corrupt(sample, seed, rng)
        common = {"image": f"images/{name}.png", "question": sample.question, "kind": kind,
                  "scene_seed": scene_seed}
        lines.append({"id": f"{name}-correct", **common, "answer": sample.answer,
                      "truth": "correct"})
        lines.append({"id": f"{name}-corrupted", **common, "answer": wrong,
                      "truth": "corrupted", "corruption": change,
                      "corrupted_words": targets})
    path = out / "flagged.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path
