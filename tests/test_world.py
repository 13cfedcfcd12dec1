"""The planted world and the embedded model: determinism, ground truth, offline loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lvlm_attribution.world.embedded_model import build_processor, build_tokenizer
from lvlm_attribution.world.model_eval import ModelEvalConfig, run_model_eval
from lvlm_attribution.world.scenes import (
    BACKGROUND_RGB,
    CANVAS,
    KINDS,
    PALETTE,
    TEXTURE_AMPLITUDE,
    erase,
    generate,
    held_out,
    object_mask,
)
from lvlm_attribution.world.training import Batcher, pixel_values


def test_generator_is_deterministic():
    for seed in (0, 1, 12345):
        a, b = generate(seed), generate(seed)
        assert np.array_equal(a.image, b.image)
        assert (a.question, a.answer, a.kind) == (b.question, b.answer, b.kind)
        assert np.array_equal(a.evidence, b.evidence)
    assert not np.array_equal(generate(0).image, generate(1).image)


def test_held_out_seeds_never_overlap_training_seeds():
    assert held_out(0, 0) >= 10_000_000
    assert len({held_out(s, i) for s in range(3) for i in range(1000)}) == 3000


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_generates_with_labels(kind):
    for seed in range(30):
        s = generate(seed, kind)
        assert s.kind == kind
        assert len(s.content) == len(s.answer_words)
        assert sum(s.content) >= 1, "every answer has at least one image-decided word"
        assert s.image.shape == (CANVAS, CANVAS, 3) and s.image.dtype == np.uint8


def test_evidence_mask_is_exactly_the_objects_pixels():
    for seed in range(40):
        s = generate(seed, "color")
        (target,) = [o for o in s.objects if o.shape in s.question.split()]
        mask = object_mask(target)
        assert np.array_equal(s.evidence, mask)
        # every evidence pixel carries the object's palette colour, no other pixel does
        colour = np.array(PALETTE[target.color])
        painted = np.all(s.image == colour, axis=-1)
        assert np.array_equal(painted, mask)


def test_absent_object_questions_have_empty_evidence():
    absent = [s for s in (generate(i, "existence") for i in range(60))
              if not s.extra["present"]]
    assert absent, "the generator produces absent-object questions"
    for s in absent:
        assert not s.evidence.any()
        assert s.answer.startswith("no ")
        color, shape = s.question.split()[3:5]
        assert all((o.color, o.shape) != (color, shape) for o in s.objects)


def test_count_evidence_covers_every_object():
    s = generate(3, "count")
    union = np.zeros_like(s.evidence)
    for o in s.objects:
        union |= object_mask(o)
    assert np.array_equal(s.evidence, union)


def test_erase_removes_only_the_mask():
    s = generate(11, "color")
    erased = erase(s.image, s.evidence, seed=1)
    assert np.array_equal(erased[~s.evidence], s.image[~s.evidence])
    background = np.array(BACKGROUND_RGB)
    assert np.abs(erased[s.evidence].astype(int) - background).max() <= TEXTURE_AMPLITUDE


def test_content_labels_align_with_the_tokenizer_tokens():
    tokenizer = build_tokenizer()
    for seed in range(50):
        s = generate(seed)
        ids = tokenizer(s.answer, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(ids) == s.answer_words
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.unk_token_id not in tokenizer(s.question)["input_ids"]


def test_processor_round_trip_and_fast_batcher_match(tmp_path):
    processor = build_processor()
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    s = generate(5)
    batcher = Batcher(loaded, 64)
    prompt = batcher.prompt_text(s.question)
    a = processor(images=Image.fromarray(s.image), text=prompt, return_tensors="pt")
    b = loaded(images=Image.fromarray(s.image), text=prompt, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.allclose(a["pixel_values"], b["pixel_values"])
    # The trainer's fast path must feed the model exactly what the processor would.
    assert torch.allclose(pixel_values([s.image]), a["pixel_values"], atol=1e-6)
    fast = batcher.encode([s])["input_ids"][0, : a["input_ids"].shape[1]]
    assert torch.equal(fast, a["input_ids"][0])


def test_shipped_model_loads_offline(monkeypatch, embedded_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = LlavaForConditionalGeneration.from_pretrained(embedded_dir, local_files_only=True)
    assert model.config.vision_config.image_size // model.config.vision_config.patch_size >= 8
    size = sum(p.stat().st_size for p in embedded_dir.iterdir())
    assert size <= 30 * 1024 * 1024


def test_shipped_weights_answer_correctly(embedded_explainer):
    report = run_model_eval(embedded_explainer, ModelEvalConfig(scenes=60, seed=3))
    assert report["accuracy"] >= 0.9, report
    assert report["content_llr_median"] > report["filler_llr_median"] + 1.0, report
