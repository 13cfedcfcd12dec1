"""`audit-sample`: a labelled JSONL for evaluating the audit from the planted world.

Every scene gives two items on the same image and question: the correct answer (truth
"correct") and a planted error (truth "corrupted") from `lvlm_attribution.world.corrupt`: one
content word swapped (colour, shape, count, one position word) or, for existence questions, the
claim flipped (asserting an absent object, or denying a present one). Only words the image
decides change, so the corrupted answer is always false for the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..world.corrupt import corrupt
from ..world.scenes import KINDS, generate, held_out


def build_sample(out_dir: str | Path, scenes: int = 30, seed: int = 0) -> Path:
    """Writes DIR/flagged.jsonl and DIR/images/*.png; returns the JSONL path. Items: 2 x scenes,
    kinds in rotation, held-out scene seeds (never training scenes)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines: list[dict[str, Any]] = []
    for i in range(scenes):
        scene_seed = held_out(seed, i)
        kind = KINDS[i % len(KINDS)]
        sample = generate(scene_seed, kind)
        name = f"s{i:04d}"
        Image.fromarray(sample.image).save(out / "images" / f"{name}.png")
        wrong = corrupt(sample, seed)
        common = {"image": f"images/{name}.png", "question": sample.question, "kind": kind,
                  "scene_seed": scene_seed}
        lines.append({"id": f"{name}-correct", **common, "answer": sample.answer,
                      "truth": "correct"})
        lines.append({"id": f"{name}-corrupted", **common, "answer": wrong.answer,
                      "truth": "corrupted", "corruption": wrong.description,
                      "corrupted_words": list(wrong.targets)})
    path = out / "flagged.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path
