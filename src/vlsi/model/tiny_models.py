"""The tiny teacher and student of every supported family, as rows of one table.

``vlsi tiny --family F`` builds, for Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL MoE or LLaVA-OneVision, the same pair as
the built-in Qwen2-VL one: one vision tower architecture, language models of the teacher's and the
student's size (``TinyConfig.teacher`` / ``.student``), the one local byte-level BPE tokenizer and the
family's own image processor, saved as ordinary checkpoints of the family's stock class. A row says how
the family differs: its config, its image processor, its image placeholder and the processor files
``AutoProcessor`` reads.

Every family's image pipeline is sized like the Qwen2-VL one: one visual token per 16 px board cell
(Qwen: 8 px patches merged 2 x 2; LLaVA-OneVision: 16 px SigLIP patches on ``image_size`` tiles, so a
48 px board is a 3 x 3 base tile plus a 1 x 1 anyres grid of 3 rows of 3 features and a newline).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from vlsi.model.tiny import (
    CHAT_TEMPLATE,
    LMSize,
    TinyConfig,
    build_config,
    build_image_processor,
    build_tokenizer,
    mrope_sections,
    qwen_token_ids,
    special_ids,
    text_config,
)

# LLaVA-OneVision's own placeholders, added to the shared BPE (which stays identical across families).
LLAVA_TOKENS = ["<image>", "<video>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# The Qwen chat format with LLaVA-OneVision's single image token in place of Qwen's vision span.
LLAVA_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(QWEN_IMAGE, "<image>")
# LLaVA-OneVision's grid: 1 to 6 tiles per side, as the released checkpoints' 384 px .. 2304 px.
ANYRES_SIDES = range(1, 7)


def _qwen_vision(cfg: TinyConfig, size: LMSize) -> dict:
    return dict(
        depth=cfg.vision_depth,
        hidden_size=cfg.vision_dim,
        intermediate_size=2 * cfg.vision_dim,
        out_hidden_size=size.hidden_size,
        num_heads=max(1, cfg.vision_dim // 16),
        patch_size=cfg.patch_size,
        temporal_patch_size=2,
        spatial_merge_size=2,
    )


def _head_dim(size: LMSize) -> int:
    head_dim = size.hidden_size // size.num_heads
    if head_dim % 8:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 8 for multimodal rotary sections")
    return head_dim


def qwen2_5_vl_config(cfg: TinyConfig, size: LMSize, tokenizer) -> Qwen2_5_VLConfig:
    sections = mrope_sections(_head_dim(size) // 2, cfg.mrope_section)
    rope = {"rope_theta": cfg.rope_theta, "mrope_section": sections}
    # Windows of 2 x 2 merged tokens, the last block full attention: both of the family's paths run.
    vision = dict(
        _qwen_vision(cfg, size), window_size=4 * cfg.patch_size, fullatt_block_indexes=[cfg.vision_depth - 1]
    )
    return Qwen2_5_VLConfig(
        text_config=text_config(size, tokenizer, rope),
        vision_config=vision,
        **qwen_token_ids(tokenizer),
    )


def qwen3_vl_config(cfg: TinyConfig, size: LMSize, tokenizer) -> Qwen3VLConfig:
    head_dim = _head_dim(size)
    half = head_dim // 2
    if cfg.mrope_section:
        sections = mrope_sections(half, cfg.mrope_section)
    else:  # Qwen3-VL interleaves the sections, and its released split is 24/20/20 of 64
        sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    rope = {"rope_theta": cfg.rope_theta, "mrope_section": sections, "mrope_interleaved": True}
    side = cfg.image_size // cfg.patch_size
    vision = dict(
        _qwen_vision(cfg, size),
        # Learned positions of a side x side patch grid, interpolated for other sizes.
        num_position_embeddings=side * side,
        # Deepstack: the first blocks' features are also added after the first decoder layers.
        deepstack_visual_indexes=list(range(min(3, cfg.vision_depth))),
    )
    text = text_config(size, tokenizer, rope, head_dim=head_dim)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **qwen_token_ids(tokenizer))


# The tiny mixture of experts: each MoE layer has MOE_EXPERTS experts of half the dense MLP's width and
# routes every token to MOE_ACTIVE of them, so a token meets as many MLP weights as in the dense model (the
# "active" parameters) while the layer holds twice as many (the "total"), as in Qwen3-VL-30B-A3B.
MOE_EXPERTS = 4
MOE_ACTIVE = 2


def qwen3_vl_moe_config(cfg: TinyConfig, size: LMSize, tokenizer) -> Qwen3VLMoeConfig:
    dense = qwen3_vl_config(cfg, size, tokenizer).to_dict()
    text, vision = dense["text_config"], dense["vision_config"]
    for part in (text, vision):
        part.pop("model_type", None)
    text.update(
        num_experts=MOE_EXPERTS,
        num_experts_per_tok=MOE_ACTIVE,
        moe_intermediate_size=max(1, size.intermediate_size // MOE_ACTIVE),
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
    )
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **qwen_token_ids(tokenizer))


def anyres_pinpoints(tile: int) -> list[list[int]]:
    return [[tile * rows, tile * cols] for rows in ANYRES_SIDES for cols in ANYRES_SIDES]


def llava_onevision_config(cfg: TinyConfig, size: LMSize, tokenizer) -> LlavaOnevisionConfig:
    ids = special_ids(tokenizer, LLAVA_TOKENS)
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=cfg.vision_dim,
        intermediate_size=2 * cfg.vision_dim,
        num_hidden_layers=cfg.vision_depth,
        num_attention_heads=max(1, cfg.vision_dim // 16),
        image_size=cfg.image_size,
        # One feature per merged Qwen token: the same visual resolution as the Qwen families.
        patch_size=2 * cfg.patch_size,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **text_config(size, tokenizer, {"rope_theta": cfg.rope_theta})),
        vision_config=vision,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=anyres_pinpoints(cfg.image_size),
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def llava_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": LLAVA_TOKENS})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def llava_image_processor(cfg: TinyConfig) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size},
        image_grid_pinpoints=anyres_pinpoints(cfg.image_size),
    )


def llava_processor_config(cfg: TinyConfig) -> dict:
    """``processor_config.json`` of the stock ``LlavaOnevisionProcessor``."""
    features = cfg.image_size // (2 * cfg.patch_size)
    return {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": features * features,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        "image_token": "<image>",
        "video_token": "<video>",
    }


@dataclass(frozen=True)
class TinyFamily:
    """How one family's tiny checkpoints are built."""

    name: str
    model_cls: type
    make_config: Callable[[TinyConfig, LMSize, PreTrainedTokenizerFast], PretrainedConfig]
    make_tokenizer: Callable[[int], PreTrainedTokenizerFast]
    make_image_processor: Callable[[TinyConfig], object]
    chat_template: str
    processor_class: str
    video_processor_class: str
    processor_config: Callable[[TinyConfig], dict] | None = None


def _qwen_image_processor(cfg: TinyConfig):
    return build_image_processor(cfg.image_size, cfg.patch_size)


def _qwen(name: str, model_cls: type, make_config, processor: str, video: str) -> TinyFamily:
    return TinyFamily(
        name, model_cls, make_config, build_tokenizer, _qwen_image_processor, CHAT_TEMPLATE, processor, video
    )


TINY_FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in (
        _qwen(
            "qwen2_vl",
            Qwen2VLForConditionalGeneration,
            build_config,
            "Qwen2VLProcessor",
            "Qwen2VLVideoProcessor",
        ),
        _qwen(
            "qwen2_5_vl",
            Qwen2_5_VLForConditionalGeneration,
            qwen2_5_vl_config,
            "Qwen2_5_VLProcessor",
            "Qwen2VLVideoProcessor",
        ),
        _qwen(
            "qwen3_vl",
            Qwen3VLForConditionalGeneration,
            qwen3_vl_config,
            "Qwen3VLProcessor",
            "Qwen3VLVideoProcessor",
        ),
        _qwen(
            "qwen3_vl_moe",
            Qwen3VLMoeForConditionalGeneration,
            qwen3_vl_moe_config,
            "Qwen3VLProcessor",
            "Qwen3VLVideoProcessor",
        ),
        TinyFamily(
            "llava_onevision",
            LlavaOnevisionForConditionalGeneration,
            llava_onevision_config,
            llava_tokenizer,
            llava_image_processor,
            LLAVA_CHAT_TEMPLATE,
            "LlavaOnevisionProcessor",
            "LlavaOnevisionVideoProcessor",
            llava_processor_config,
        ),
    )
}


def tiny_family(name: str) -> TinyFamily:
    if name not in TINY_FAMILIES:
        raise ValueError(f"unknown family {name!r}; vlsi tiny builds {', '.join(TINY_FAMILIES)}")
    return TINY_FAMILIES[name]


def save_processor_files(out: Path, tokenizer: PreTrainedTokenizerFast, image_processor, family) -> None:
    """Write the files a stock checkpoint of ``family`` (a :class:`vlsi.model.tiny_models.TinyFamily`) carries,
    so ``AutoProcessor`` also loads it where torchvision is installed, while vlsi's own processor needs
    only the tokenizer, the image processor and the chat template."""
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = family.processor_class
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    video = dict(pre, video_processor_type=family.video_processor_class)
    video.pop("image_processor_type", None)
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (out / "chat_template.jinja").write_text(family.chat_template)


def build_tiny(cfg: TinyConfig) -> dict[str, Path]:
    """Builds and saves the tiny teacher and student of ``cfg.family``; returns their directories."""
    family = tiny_family(cfg.family)
    out = Path(cfg.out)
    tokenizer = family.make_tokenizer(cfg.vocab_size)
    image_processor = family.make_image_processor(cfg)
    paths = {}
    for offset, (name, size) in enumerate((("teacher", cfg.teacher), ("student", cfg.student))):
        torch.manual_seed(cfg.seed * 1000 + offset)
        model = family.model_cls(family.make_config(cfg, size, tokenizer))
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
        )
        path = out / name
        model.save_pretrained(path)
        save_processor_files(path, tokenizer, image_processor, family)
        if family.processor_config is not None:
            (path / "processor_config.json").write_text(json.dumps(family.processor_config(cfg), indent=2))
        paths[name] = path
    return paths
