"""Builds the embedded model: a real LlavaForConditionalGeneration with a hub-free tokenizer and
processor, sized to train on a CPU and to answer questions about the planted world."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil as CLIPImageProcessor
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .scenes import CANVAS, COUNT_WORDS, PALETTE, PATCH, SHAPES

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":", "?"]
QUESTION_WORDS = ["what", "color", "shape", "is", "the", "how", "many", "objects", "are",
                  "there", "where", "a", "object"]
ANSWER_WORDS = ["number", "of", "at", "top", "bottom", "left", "right", "yes", "no"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}"
    "{% else %}ASSISTANT : {% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    " </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def vocabulary() -> list[str]:
    words = SPECIAL_TOKENS + TEMPLATE_WORDS + QUESTION_WORDS + ANSWER_WORDS
    words += list(SHAPES) + list(PALETTE) + list(COUNT_WORDS.values())
    return list(dict.fromkeys(words))  # keep order, drop repeats


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        clean_up_tokenization_spaces=False,
    )


def build_processor() -> LlavaProcessor:
    # Shortest edge + centre crop, as LLaVA-1.5's processor: any image gives the square grid
    # the vision tower expects (the training canvases are square, so the crop is a no-op there).
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CANVAS},
        crop_size={"height": CANVAS, "width": CANVAS},
        do_center_crop=True,
        do_resize=True,
        do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        image_size=CANVAS, patch_size=PATCH, projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


def build_model(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    import torch

    torch.manual_seed(seed)
    processor = build_processor()
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model, processor


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
