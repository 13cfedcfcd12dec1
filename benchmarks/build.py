"""Build a scenario's model: full-size SHAPES with random weights, created directly on the target
device in the target dtype (no download, no CPU copy), plus a hub-free processor producing the
real visual-token counts; or the tiny / embedded models for CPU runs.

Fast init: the model is constructed under `torch.device(device)` with `_from_config(..., dtype=)`
so parameters are allocated and initialised (transformers' normal(0, 0.02) init, run on the GPU)
in place. Random weights are fine for speed and memory: the work does not depend on the values.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil as CLIPImageProcessor
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor

from lvlm_attribution.engine import DTYPES, Explainer
from lvlm_attribution.models import tiny
from lvlm_attribution.world.embedded_model import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE
from lvlm_attribution.world.embedded_model import vocabulary

from .configs import (
    CLIP_VIT_L_14_336,
    LLAMA2_7B,
    LLAVA_15,
    QWEN25VL_7B_TEXT,
    QWEN25VL_7B_VISION,
    QWEN25VL_PROCESSOR,
    Scenario,
)

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_CANDIDATES = (ROOT / "model_store" / "tiny-shapes-llava", ROOT / "runs" / "train-a")
# Words every hub-free tokenizer here knows (the planted world's vocabulary): questions and
# teacher-forced answers are made of them, one token per word.
QUESTION_WORDS = ("what", "color", "is", "the", "shape", "at", "the", "top", "left", "?",
                  "how", "many", "objects", "are", "there", "?", "where", "is", "the", "blue",
                  "square", "?")
ANSWER_WORDS = ("the", "red", "circle", "is", "at", "the", "top", "left", "a", "blue", "square",
                "is", "at", "the", "bottom", "right")


@dataclass
class Built:
    explainer: Explainer
    image: Image.Image
    question: str
    answer_ids: list[int]
    source: str  # where the weights came from
    build_s: float


def _device_ctx(device: str):
    return torch.device(device)


def llava_7b_config(tokenizer, vision_image_size: int = 336, layers: int | None = None,
                    vision_layers: int | None = None) -> LlavaConfig:
    vision = dict(CLIP_VIT_L_14_336, image_size=vision_image_size)
    if vision_layers is not None:
        vision["num_hidden_layers"] = vision_layers
    text = dict(LLAMA2_7B)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    if layers is not None:
        text["num_hidden_layers"] = layers
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **LLAVA_15,
    )


def _filler(special: list[str], words: list[str], vocab_size: int) -> list[str]:
    """Plain word tokens that pad the hub-free vocabulary to the model's vocabulary size, so
    that every id a random-weight model generates decodes to a token (as with the real
    tokenizers) and text-based rules (stop words, grounding) see ordinary words."""
    base = len(dict.fromkeys(special + ["\n"] + vocabulary() + words))
    return [f"w{i:06d}" for i in range(vocab_size - base)]


def llava_processor(image_size: int, patch: int = 14) -> LlavaProcessor:
    """Hub-free LLaVA-1.5 processor (models/tiny.py's approach): CLIP resize + centre crop to
    `image_size`, (image_size/patch)² <image> tokens, the LLaVA chat template's structure."""
    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    tokenizer = tiny.build_word_tokenizer(special, _filler(special, [], LLAMA2_7B["vocab_size"]),
                                          bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                                          extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(  # CLIP's mean/std, as the real preprocessor_config
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_convert_rgb=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def qwen_7b_config(tokenizer, layers: int | None = None,
                   vision_layers: int | None = None) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    text = dict(QWEN25VL_7B_TEXT)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                               "mrope_section": text.pop("mrope_section")}
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = dict(QWEN25VL_7B_VISION)
    if vision_layers is not None:
        vision["depth"] = vision_layers
        vision["fullatt_block_indexes"] = [vision_layers - 1]
    text.update(bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))
    return Qwen2_5_VLConfig(
        vision_config=vision, text_config=text,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"))


def qwen_processor(max_side: int) -> tiny.HubFreeVLProcessor:
    words = tiny.QWEN_WORDS + _filler(tiny.QWEN_SPECIAL, tiny.QWEN_WORDS,
                                      QWEN25VL_7B_TEXT["vocab_size"])
    tokenizer = tiny.build_word_tokenizer(
        tiny.QWEN_SPECIAL, words, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        unk="<unk>", extra_special_tokens={"image_token": "<|image_pad|>",
                                           "video_token": "<|video_pad|>"})
    image_processor = Qwen2VLImageProcessor(  # OpenAI CLIP mean/std, as the real one
        patch_size=14, merge_size=2, temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        size={"shortest_edge": QWEN25VL_PROCESSOR["min_pixels"],
              "longest_edge": max(QWEN25VL_PROCESSOR["max_pixels"], max_side * max_side)})
    return tiny.HubFreeVLProcessor(tokenizer, image_processor, tiny.QWEN_CHAT_TEMPLATE)


def instantiate(model_cls, config, device: str, dtype: torch.dtype):
    """Random weights allocated and initialised directly on `device` in `dtype`."""
    with _device_ctx(device):
        model = model_cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _words(words, n: int) -> str:
    return " ".join(words[i % len(words)] for i in range(n))


def build(scenario: Scenario, seed: int = 0) -> Built:
    start = time.perf_counter()
    torch.manual_seed(seed)
    device, dtype = scenario.device, DTYPES[scenario.dtype]
    if scenario.family == "embedded":
        explainer, source = _embedded(device, scenario.dtype)
    elif scenario.size == "tiny":
        model, processor = tiny.build_tiny(scenario.family, seed=seed)
        explainer = Explainer(model.to(device=device, dtype=dtype), processor,
                              f"tiny-{scenario.family}", "random")
        source = "models/tiny.py random weights"
    elif scenario.family == "llava":
        side = scenario.extra.get("vision_image_size", 336)
        processor = llava_processor(side)
        config = llava_7b_config(processor.tokenizer, side, scenario.layers,
                                 scenario.vision_layers)
        model = instantiate(LlavaForConditionalGeneration, config, device, dtype)
        explainer = Explainer(tiny._finish(model, processor.tokenizer,
                                           processor.tokenizer.eos_token_id),
                              processor, scenario.name, "random-bf16")
        source = "random weights, LLaVA-1.5-7B config (benchmarks/configs.py)"
    elif scenario.family == "qwen2_5_vl":
        processor = qwen_processor(max(scenario.image_size))
        config = qwen_7b_config(processor.tokenizer, scenario.layers, scenario.vision_layers)
        model = instantiate(Qwen2_5_VLForConditionalGeneration, config, device, dtype)
        ids = processor.tokenizer.convert_tokens_to_ids
        explainer = Explainer(tiny._finish(model, processor.tokenizer,
                                           [ids("<|im_end|>"), ids("<|endoftext|>")]),
                              processor, scenario.name, "random-bf16")
        source = "random weights, Qwen2.5-VL-7B config (benchmarks/configs.py)"
    else:
        raise ValueError(f"unknown family {scenario.family!r}")
    tokenizer = explainer.tokenizer
    answer = tokenizer.convert_tokens_to_ids(
        [ANSWER_WORDS[i % len(ANSWER_WORDS)] for i in range(scenario.answer_tokens)])
    if any(i is None or i == tokenizer.unk_token_id for i in answer):
        raise ValueError("answer words missing from the tokenizer")
    # Generation must produce exactly T tokens to be comparable: no early end-of-sequence.
    explainer.model.generation_config.min_new_tokens = scenario.answer_tokens
    if device == "cuda":
        torch.cuda.synchronize()
    return Built(explainer, _image(scenario.image_size, seed),
                 _words(QUESTION_WORDS, scenario.prompt_words), answer, source,
                 time.perf_counter() - start)


def _embedded(device: str, dtype: str) -> tuple[Explainer, str]:
    override = os.environ.get("LVLM_BENCH_MODEL_DIR")
    for path in ([Path(override)] if override else []) + list(EMBEDDED_CANDIDATES):
        if (path / "config.json").is_file():
            try:
                explainer = Explainer.from_pretrained(path, device=device, dtype=dtype)
                return explainer, (str(path.relative_to(ROOT)) if path.is_relative_to(ROOT)
                                   else str(path))
            except Exception as err:  # noqa: BLE001  (a checkpoint being written, say)
                print(f"[bench] cannot load {path}: {err}; trying the next source")
    from lvlm_attribution.world.embedded_model import build_model

    model, processor = build_model(seed=0)
    return (Explainer(model.to(device=device, dtype=DTYPES[dtype]), processor,
                      "embedded-random", "random"),
            "embedded architecture, random weights (no trained checkpoint found)")
