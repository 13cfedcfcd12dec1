"""Planted errors for calibrating and testing the grounding rule (audit mode).

`corrupt(sample, seed)` returns a copy of the sample's answer with exactly one claim made false:

  color      "the circle is red"            -> the colour word swapped for another palette colour
  shape      "the red object is a square"   -> the final shape word swapped for another shape
  count      "the number of objects is two" -> the count word swapped for another count word
  position   "the circle is at the top left"-> the vertical OR the horizontal word flipped
                                               (top<->bottom, left<->right; chosen by the seed)
  existence  "no there is no red circle"    -> "yes there is a red circle" (asserts an absent
             "yes there is a red circle"    -> "no there is no red circle"  object / denies a
                                                                            present one)

The result is a well-formed answer of the same template (same number of words); only the words
listed in `changed` differ from the correct answer. `targets` are the changed words that carry
the false claim — the changed words the world flags as content (decided by the image). For
existence the template also changes the determiner ("a" <-> "no", word 3); that word is in
`changed` but not in `targets`, because once the first word is "yes"/"no" the template decides it.
Replacement values are drawn uniformly from the other values of the same vocabulary (so a swapped
colour may be the colour of another object in the scene: a plausible confusion).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import COUNT_WORDS, PALETTE, SHAPES, Sample

FLIP = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}


@dataclass(frozen=True)
class Corruption:
    answer: str  # the corrupted answer sentence
    changed: tuple[int, ...]  # word indices that differ from the correct answer
    targets: tuple[int, ...]  # changed words that carry the false claim (content words)
    kind: str  # question kind of the sample
    description: str  # e.g. "colour red -> blue"

    @property
    def words(self) -> list[str]:
        return self.answer.split()


def _swap(words: list[str], index: int, vocabulary, rng: np.random.Generator) -> str:
    old = words[index]
    options = [w for w in vocabulary if w != old]
    words[index] = str(options[int(rng.integers(len(options)))])
    return f"{old} -> {words[index]}"


def corrupt(sample: Sample, seed: int = 0) -> Corruption:
    """One planted error in `sample.answer` (see the module docstring)."""
    rng = np.random.default_rng([seed, sample.seed])
    words = sample.answer.split()
    kind = sample.kind
    if kind == "color":
        index = len(words) - 1
        desc = "colour " + _swap(words, index, list(PALETTE), rng)
    elif kind == "shape":
        index = len(words) - 1
        desc = "shape " + _swap(words, index, SHAPES, rng)
    elif kind == "count":
        index = len(words) - 1
        desc = "count " + _swap(words, index, list(COUNT_WORDS.values()), rng)
    elif kind == "position":
        index = len(words) - 2 + int(rng.integers(2))  # vertical or horizontal word
        old = words[index]
        words[index] = FLIP[old]
        desc = f"position {old} -> {words[index]}"
    elif kind == "existence":
        if words[0] == "yes":
            words[0], words[3] = "no", "no"
            desc = "existence: denies a present object"
        else:
            words[0], words[3] = "yes", "a"
            desc = "existence: asserts an absent object"
        index = 0
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    original = sample.answer.split()
    changed = tuple(i for i, (a, b) in enumerate(zip(original, words, strict=True)) if a != b)
    targets = tuple(i for i in changed if sample.content[i])
    assert index in targets, "the corrupted claim must be a content word"
    return Corruption(" ".join(words), changed, targets, kind, desc)
