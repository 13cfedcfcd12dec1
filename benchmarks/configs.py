"""Real model configurations (typed in, never downloaded) and the benchmark scenarios.

Where each number comes from:
  * LLaVA-1.5-7B: the public `llava-hf/llava-1.5-7b-hf` config.json (vision tower = OpenAI CLIP
    ViT-L/14-336 `openai/clip-vit-large-patch14-336`; language model = Vicuna-7B v1.5, i.e. the
    Llama-2-7B architecture; vocabulary 32000 + <image> + <pad>, padded to 32064).
  * Qwen2.5-VL-7B: the public `Qwen/Qwen2.5-VL-7B-Instruct` config.json and
    preprocessor_config.json.
Values typed from those public files as we know them; where we deviate on purpose (image size
to reach a sequence length, special-token ids of our hub-free tokenizer) the comment says so.
Parameter counts are checked in tests/test_benchmarks.py on the meta device: 7,063,427,072 for
LLaVA-1.5-7B and 8,292,166,656 for Qwen2.5-VL-7B (the public model cards' totals).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# ---- LLaVA-1.5-7B -------------------------------------------------------------------------------
CLIP_VIT_L_14_336 = dict(  # openai/clip-vit-large-patch14-336, vision_config in llava-hf
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,  # 336/14 = 24 -> 576 patches (+ CLS, dropped by the "default" strategy)
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
LLAMA2_7B = dict(  # text_config of llava-hf/llava-1.5-7b-hf (Vicuna-7B v1.5 = Llama-2-7B shape)
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,  # no GQA in Llama-2-7B
    vocab_size=32064,  # 32000 + <image> (32000) + <pad> (32001), padded to a multiple of 64
    max_position_embeddings=4096,  # RoPE is computed on the fly: longer N still runs (N~4,800)
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
)
LLAVA_15 = dict(  # top level of llava-hf/llava-1.5-7b-hf
    vision_feature_layer=-2,  # penultimate CLIP layer
    vision_feature_select_strategy="default",  # drop CLS
    projector_hidden_act="gelu",  # 2-layer MLP projector 1024 -> 4096 -> 4096
    multimodal_projector_bias=True,
    # image_token_id: 32000 in the real tokenizer; ours is the hub-free tokenizer's <image> id.
)

# ---- Qwen2.5-VL-7B-Instruct ---------------------------------------------------------------------
QWEN25VL_7B_TEXT = dict(  # Qwen/Qwen2.5-VL-7B-Instruct config.json (text part)
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,  # GQA: 7 query heads per KV head
    vocab_size=152064,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    mrope_section=[16, 24, 24],  # temporal/height/width split of the 64 rotary pairs
    hidden_act="silu",
    tie_word_embeddings=False,
    # special ids in the real vocab: image 151655, video 151656, vision_start 151652,
    # vision_end 151653, <|im_end|> 151645; ours come from the hub-free tokenizer.
)
QWEN25VL_7B_VISION = dict(  # vision_config of the same file
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,  # 2x2 patches -> one LLM token (28 px)
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
    in_chans=3,
    tokens_per_second=2,
)
QWEN25VL_PROCESSOR = dict(  # preprocessor_config.json: min_pixels 3136 (56²), max 12845056
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 16384,
)


# ---- scenarios -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    name: str
    family: str  # "llava" | "qwen2_5_vl" | "embedded"
    size: str  # "7b" (configs above) | "tiny" (models/tiny.py sizes) | "embedded"
    device: str  # "cuda" | "cpu"
    dtype: str  # "bfloat16" | "float32"
    image_size: tuple[int, int]  # (width, height) of the test image fed to the processor
    prompt_words: int  # question length in words (one token each with our tokenizer)
    answer_tokens: int  # T, teacher-forced (and generated with min_new_tokens = T)
    measurements: tuple[str, ...]
    repeats: int = 3  # k timed runs after warm-up; median reported
    warmup: int = 1  # untimed runs first (capped at this; references run cold, see notes)
    batch_requests: int = 8  # B for the monitoring-throughput measurement
    glimpse_chunk: int = 8  # token_chunk of the full GLIMPSE path
    replay_chunk: int = 4  # token_chunk of GLIMPSE replay
    igos_batch: int = 20  # images per forward/backward in iGOS++ (20 = one pass per iteration)
    igos_settings: dict = field(default_factory=dict)  # overrides of IgosConfig (smoke only)
    ref_tokens: int = 2  # naive references: measured on this many tokens, then extrapolated
    ref_layers: int = 2  # DEX-AR per-(token, layer) reference: layers measured
    layers: int | None = None  # override decoder depth (CPU shape checks at full width)
    vision_layers: int | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)

    def with_overrides(self, **kw) -> Scenario:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


# Every measurement the runner knows, in run order (cheap and essential first).
ALL = ("forward", "generate.hf", "generate.engine", "llr", "dexar.fast", "dexar.reference",
       "dexar.per_token", "glimpse.fast", "glimpse.replay", "glimpse.reference", "tmme.fast",
       "tmme.reference", "rollout.fast", "rollout.reference", "igos.fast", "igos.reference",
       "batch.dexar", "batch.sequential")
LONG = ("forward", "generate.hf", "dexar.fast", "dexar.per_token", "glimpse.replay",
        "glimpse.fast", "glimpse.reference", "tmme.fast", "rollout.fast", "igos.fast",
        "batch.dexar", "batch.sequential")
QWEN = ("forward", "generate.hf", "generate.engine", "llr", "dexar.fast", "dexar.per_token",
        "glimpse.fast", "glimpse.replay", "tmme.fast", "rollout.fast", "batch.dexar",
        "batch.sequential")

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("smoke", "llava", "tiny", "cpu", "float32", (32, 32), 6, 4, ALL, repeats=1,
             batch_requests=2, glimpse_chunk=2, replay_chunk=2, igos_batch=4,
             igos_settings={"iterations": 1, "ig_iter": 2},
             description="tiny LLaVA on CPU: every code path, seconds (tests run it)"),
    Scenario("smoke-qwen", "qwen2_5_vl", "tiny", "cpu", "float32", (56, 56), 6, 4, QWEN,
             repeats=1, batch_requests=2, glimpse_chunk=2, replay_chunk=2,
             description="tiny Qwen2.5-VL on CPU"),
    Scenario("embedded-cpu", "embedded", "embedded", "cpu", "float32", (64, 64), 8, 16, ALL,
             repeats=3, batch_requests=8, ref_tokens=2,
             description="the embedded model (64 visual tokens) on this CPU, N ~ 90"),
    Scenario("llava7b-336", "llava", "7b", "cuda", "bfloat16", (336, 336), 25, 40, ALL,
             igos_batch=5, description="LLaVA-1.5-7B shape, 576 visual tokens, N ~ 647 "
                                       "(DESIGN §4's setting)"),
    Scenario("llava7b-672", "llava", "7b", "cuda", "bfloat16", (672, 672), 25, 40, LONG,
             repeats=2, batch_requests=4, glimpse_chunk=1, replay_chunk=2, igos_batch=2,
             ref_tokens=1, extra={"vision_image_size": 672},
             description="LLaVA-1.5-7B with a 672 px CLIP (2304 visual tokens), N ~ 2,375"),
    Scenario("llava7b-966", "llava", "7b", "cuda", "bfloat16", (966, 966), 25, 40,
             ("forward", "dexar.fast", "glimpse.replay", "glimpse.fast", "rollout.fast"),
             repeats=1, warmup=0, glimpse_chunk=1, replay_chunk=2,
             extra={"vision_image_size": 966},
             description="LLaVA-1.5-7B with a 966 px CLIP (4761 visual tokens), N ~ 4,830: "
                         "GLIMPSE memory"),
    Scenario("qwen25vl7b-2k", "qwen2_5_vl", "7b", "cuda", "bfloat16", (1344, 1344), 25, 40,
             QWEN, repeats=2, batch_requests=4, glimpse_chunk=1, replay_chunk=2,
             description="Qwen2.5-VL-7B at 1344 px (48x48 = 2304 visual tokens), N ~ 2,400"),
)}
# `--scenario gpu`: one device call (<= 10 min), in priority order; the runner's time budget
# skips what does not fit and says so in the JSON.
GPU_ORDER = ("llava7b-336", "llava7b-966", "llava7b-672", "qwen25vl7b-2k")
