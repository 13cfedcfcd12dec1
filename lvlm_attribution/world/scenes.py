"""The planted-ground-truth VQA world: seeded scenes, questions, answers and evidence masks.

Every sample knows which pixels its answer depends on (the evidence mask) and which answer words
are decided by the image (content) versus by the template or the question (filler). The exact
specification is published in docs/world.md; keep the two in sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CANVAS = 64
PATCH = 8
BACKGROUND_RGB = (214, 210, 200)
TEXTURE_AMPLITUDE = 6  # +- grey levels of the background texture
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
SIZE_RANGE = (11, 19)  # object bounding-box side in pixels, inclusive
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
KINDS = ("color", "shape", "count", "position", "existence")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    quadrant: tuple[str, str]
    center: tuple[int, int]  # (row, col) in pixels
    size: int


@dataclass
class Sample:
    """One question about one scene, with its ground truth."""

    image: np.ndarray  # H x W x 3 uint8
    objects: list[SceneObject]
    kind: str
    question: str
    answer: str
    content: list[bool]  # one flag per answer word: True when the image decides the word
    evidence: np.ndarray  # H x W bool; empty for questions about absent objects
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def answer_words(self) -> list[str]:
        return self.answer.split()


def object_mask(obj: SceneObject) -> np.ndarray:
    """Pixels covered by one object (the exact pixels the renderer paints)."""
    rows, cols = np.mgrid[0:CANVAS, 0:CANVAS]
    r0, c0 = obj.center
    half = obj.size / 2
    dr, dc = rows + 0.5 - r0, cols + 0.5 - c0
    if obj.shape == "circle":
        return dr**2 + dc**2 <= half**2
    if obj.shape == "square":
        return (np.abs(dr) <= half) & (np.abs(dc) <= half)
    # Upward triangle: apex at the top centre, base at the bottom of the bounding box.
    depth = (dr + half) / (2 * half)  # 0 at apex, 1 at base
    return (depth >= 0) & (depth <= 1) & (np.abs(dc) <= depth * half)


def render(objects: list[SceneObject], rng: np.random.Generator) -> np.ndarray:
    texture = rng.integers(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1, size=(CANVAS, CANVAS, 1))
    image = np.clip(np.array(BACKGROUND_RGB)[None, None, :] + texture, 0, 255)
    for obj in objects:
        image[object_mask(obj)] = PALETTE[obj.color]
    return image.astype(np.uint8)


def erase(image: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Paint fresh background texture over `mask` (removes the evidence object)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1, size=(CANVAS, CANVAS, 1))
    background = np.clip(np.array(BACKGROUND_RGB)[None, None, :] + texture, 0, 255)
    out = image.copy()
    out[mask] = background[mask]
    return out.astype(np.uint8)


def sample_objects(rng: np.random.Generator) -> list[SceneObject]:
    count = int(rng.integers(1, 4))
    shapes = rng.choice(SHAPES, size=count, replace=False)
    colors = rng.choice(list(PALETTE), size=count, replace=False)
    quadrant_ids = rng.choice(len(QUADRANTS), size=count, replace=False)
    objects = []
    for shape, color, q in zip(shapes, colors, quadrant_ids, strict=True):
        size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        vertical, horizontal = QUADRANTS[q]
        quarter = CANVAS // 2
        lo, hi = size // 2 + 2, quarter - size // 2 - 2  # keep the object inside its quadrant
        row = int(rng.integers(lo, hi + 1)) + (quarter if vertical == "bottom" else 0)
        col = int(rng.integers(lo, hi + 1)) + (quarter if horizontal == "right" else 0)
        objects.append(SceneObject(str(shape), str(color), QUADRANTS[q], (row, col), size))
    return objects


def _labelled(words_and_flags: list[tuple[str, bool]]) -> tuple[str, list[bool]]:
    words = [w for w, _ in words_and_flags]
    return " ".join(words), [f for _, f in words_and_flags]


def ask(kind: str, objects: list[SceneObject], rng: np.random.Generator):
    """Returns (question, answer, content flags, evidence objects, extra)."""
    target = objects[int(rng.integers(len(objects)))]
    if kind == "color":
        question = f"what color is the {target.shape} ?"
        answer = [("the", False), (target.shape, False), ("is", False), (target.color, True)]
        return question, *_labelled(answer), [target], {}
    if kind == "shape":
        question = f"what shape is the {target.color} object ?"
        answer = [("the", False), (target.color, False), ("object", False), ("is", False),
                  ("a", False), (target.shape, True)]
        return question, *_labelled(answer), [target], {}
    if kind == "count":
        question = "how many objects are there ?"
        answer = [("the", False), ("number", False), ("of", False), ("objects", False),
                  ("is", False), (COUNT_WORDS[len(objects)], True)]
        return question, *_labelled(answer), list(objects), {}
    if kind == "position":
        question = f"where is the {target.shape} ?"
        vertical, horizontal = target.quadrant
        answer = [("the", False), (target.shape, False), ("is", False), ("at", False),
                  ("the", False), (vertical, True), (horizontal, True)]
        return question, *_labelled(answer), [target], {}
    if kind == "existence":
        present = bool(rng.integers(2))
        if present:
            shape, color, evidence = target.shape, target.color, [target]
        else:
            shape, color = _absent_pair(objects, rng)
            evidence = []
        question = f"is there a {color} {shape} ?"
        if present:
            answer = [("yes", True), ("there", False), ("is", False), ("a", False),
                      (color, False), (shape, False)]
        else:
            answer = [("no", True), ("there", False), ("is", False), ("no", False),
                      (color, False), (shape, False)]
        return question, *_labelled(answer), evidence, {"present": present}
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def _absent_pair(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, str]:
    """A (shape, colour) pair not in the scene; half the time the shape is present in another
    colour, so the model must bind colour to shape rather than spot either alone."""
    present = {(o.shape, o.color) for o in objects}
    if rng.random() < 0.5:
        obj = objects[int(rng.integers(len(objects)))]
        colors = [c for c in PALETTE if (obj.shape, c) not in present]
        return obj.shape, str(rng.choice(colors))
    candidates = [(s, c) for s in SHAPES for c in PALETTE if (s, c) not in present]
    shape, color = candidates[int(rng.integers(len(candidates)))]
    return shape, color


def generate(seed: int, kind: str | None = None) -> Sample:
    """One sample, fully determined by `seed` (and `kind`, when given)."""
    rng = np.random.default_rng(seed)
    objects = sample_objects(rng)
    image = render(objects, rng)
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    question, answer, content, evidence_objects, extra = ask(kind, objects, rng)
    evidence = np.zeros((CANVAS, CANVAS), dtype=bool)
    for obj in evidence_objects:
        evidence |= object_mask(obj)
    return Sample(image, objects, kind, question, answer, content, evidence, seed, extra)


# Seed ranges keep training, validation and evaluation scenes apart.
TRAIN_SEEDS = range(0, 10_000_000)
HELD_OUT_OFFSET = 1_000_000_000


def held_out(seed: int, index: int) -> int:
    """Seed of the index-th held-out scene for a user seed; never overlaps TRAIN_SEEDS."""
    return HELD_OUT_OFFSET + seed * 1_000_003 + index
