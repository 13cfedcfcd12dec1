"""Tiny random-weight models of the real transformers classes, with hub-free processors.

One builder per supported family. Each returns `(model, processor)` built only from configs and a
local tokenizer, so tests can exercise every adapter on CPU with no download:

    model, processor = build_tiny("qwen2_5_vl")
    Explainer(model, processor, "tiny-qwen2_5_vl", "random")

The shapes follow the real checkpoints' *layout* (LLaVA-1.5: CLIP + Llama, projector; Qwen2.5-VL:
windowed ViT with 2x2 merger + mrope decoder; PaliGemma: SigLIP + Gemma, prefix-LM, MQA), scaled
down: decoder hidden 64, 2 layers, images <= 56 px. The vocabulary is the planted world's words
(`world.embedded_model.vocabulary()`) plus each family's special tokens; "\\n" is an added token
so templates that rely on newlines tokenize as they do in the real tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil as CLIPImageProcessor
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor
from transformers import SiglipImageProcessorPil as SiglipImageProcessor

from ..world.embedded_model import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE
from ..world.embedded_model import vocabulary

HIDDEN = 64
LAYERS = 2

# The real Qwen2.5-VL-Instruct chat template (image and text parts of user messages), verbatim
# in structure: default system prompt, <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "assistant."]
PALIGEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
PALIGEMMA_WORDS = ["answer", "en"]


class HubFreeVLProcessor:
    """The parts of a transformers processor that an adapter uses: `tokenizer`,
    `image_processor`, `chat_template` and `apply_chat_template` (returns the prompt string).

    Needed for Qwen2.5-VL here: `Qwen2_5_VLProcessor` cannot be constructed without torchvision
    (its video processor needs it). The Qwen adapter only uses these attributes, so a real
    `Qwen2_5_VLProcessor` works the same way where torchvision is installed."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_processor: Any,
                 chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **kwargs)


def build_word_tokenizer(special: list[str], words: list[str], *, bos: str | None,
                         eos: str, pad: str, unk: str,
                         extra_special_tokens: dict[str, str] | None = None,
                         ) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over the world's vocabulary + `words`, with `special` tokens (and
    "\\n") as added tokens, so they split without surrounding whitespace."""
    vocab_list = list(dict.fromkeys(special + ["\n"] + vocabulary() + words))
    vocab = {word: i for i, word in enumerate(vocab_list)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    core.add_tokens([AddedToken("\n", special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        extra_special_tokens=extra_special_tokens or {}, clean_up_tokenization_spaces=False,
    )


def _finish(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast,
            eos_ids: list[int] | int) -> torch.nn.Module:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    # Random weights would happily emit <image> (which then breaks teacher forcing: the model
    # counts image tokens) or other control tokens: keep greedy answers to ordinary words + eos.
    # "\n" is suppressed too, so that tiny answers decode to words.
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    suppressed = [*tokenizer.all_special_ids, tokenizer.convert_tokens_to_ids("\n")]
    model.generation_config.suppress_tokens = sorted({i for i in suppressed if i not in eos})
    return model.eval()


# ---- LLaVA-1.5 layout: CLIP ViT + 2-layer GELU projector + Llama ---------------------------------
def build_tiny_llava(seed: int = 0, image_size: int = 32, patch: int = 8):
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(["<pad>", "<unk>", "<s>", "</s>", "<image>"], [],
                                     bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                                     extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128,
                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    return _finish(model, tokenizer, tokenizer.eos_token_id), processor


# ---- Qwen2.5-VL: windowed ViT (window attention + full-attention block), 2x2 merger, mrope -------
def build_tiny_qwen2_5_vl(seed: int = 0, patch: int = 7, max_side: int = 56):
    """Patch 7 and window 28 px keep the real structure at 56 px: 2x2 merged-token windows (so the
    window permutation and its padding are exercised) and one full-attention block."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(QWEN_SPECIAL, QWEN_WORDS, bos=None, eos="<|im_end|>",
                                     pad="<|endoftext|>", unk="<unk>",
                                     extra_special_tokens={"image_token": "<|image_pad|>",
                                                           "video_token": "<|video_pad|>"})
    factor = patch * 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": max_side * max_side})
    processor = HubFreeVLProcessor(tokenizer, image_processor, QWEN_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = HIDDEN // 4
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 4 * patch, "out_hidden_size": HIDDEN,
                       "fullatt_block_indexes": [1]},
        text_config={"vocab_size": len(tokenizer), "hidden_size": HIDDEN,
                     "intermediate_size": 128, "num_hidden_layers": LAYERS,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": _mrope_section(head_dim)},
                     "bos_token_id": None, "eos_token_id": ids("<|im_end|>"),
                     "pad_token_id": ids("<|endoftext|>")},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _finish(model, tokenizer, [ids("<|im_end|>"), ids("<|endoftext|>")]), processor


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary half-dimension, in the real 16:24:24 ratio."""
    half = head_dim // 2
    t = max(1, half * 16 // 64)
    h = (half - t) // 2
    return [t, h, half - t - h]


# ---- PaliGemma: SigLIP + linear projector + Gemma (MQA), prefix-LM -------------------------------
def build_tiny_paligemma(seed: int = 0, image_size: int = 32, patch: int = 8):
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(PALIGEMMA_SPECIAL, PALIGEMMA_WORDS, bos="<bos>",
                                     eos="<eos>", pad="<pad>", unk="<unk>",
                                     extra_special_tokens={"image_token": "<image>"})
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor.image_seq_length = (image_size // patch) ** 2
    # The real processor adds the 1024 <locNNNN> and 128 <segNNN> tokens; the tiny vocab has them.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=image_size, patch_size=patch,
                                vision_use_head=False)
    text = GemmaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128,
                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=HIDDEN // 4, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vocab_size=len(tokenizer), projection_dim=HIDDEN,
                             hidden_size=HIDDEN)
    model = PaliGemmaForConditionalGeneration(config)
    return _finish(model, tokenizer, tokenizer.eos_token_id), processor


# Keyed by the transformers class an adapter serves (`ModelAdapter.model_classes`): the adapter
# contract tests require one entry per registered class.
TINY_BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "LlavaForConditionalGeneration": build_tiny_llava,
    "Qwen2_5_VLForConditionalGeneration": build_tiny_qwen2_5_vl,
    "PaliGemmaForConditionalGeneration": build_tiny_paligemma,
}
FAMILIES = {"llava": "LlavaForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "paligemma": "PaliGemmaForConditionalGeneration"}


def build_tiny(name: str, seed: int = 0):
    """(model, processor) of the tiny random-weight model for `name`: a family ("qwen2_5_vl")
    or a model class name ("Qwen2_5_VLForConditionalGeneration")."""
    name = FAMILIES.get(name, name)
    if name not in TINY_BUILDERS:
        raise KeyError(f"no tiny builder for {name!r}; known: {sorted(FAMILIES)}")
    return TINY_BUILDERS[name](seed=seed)
