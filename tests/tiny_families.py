"""Tiny random-weight models of every supported VLM family, with a matching one-image input batch.

Everything is built from configs (no hub access). Sizes are the smallest the modelling code accepts, so a forward
pass takes milliseconds on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

VOCAB = 320
HIDDEN = 32
HEADS = 2
HEAD_DIM = HIDDEN // HEADS
NUM_LAYERS = 3
MAX_PARAMS = 2_000_000

# Special tokens live inside the tiny vocabulary; text tokens are drawn from below them.
IMAGE_TOKEN_ID = VOCAB - 4
VIDEO_TOKEN_ID = VOCAB - 3
VISION_START_ID = VOCAB - 2
VISION_END_ID = VOCAB - 1
TEXT_TOKEN_MAX = VOCAB - 10

# Qwen vision: 8-pixel patches, 2 frames per temporal patch, 2x2 merge; a 4x4 patch grid -> 4 LLM tokens.
PATCH = 8
TEMPORAL_PATCH = 2
MERGE = 2
GRID_THW = (1, 4, 4)

# LLaVA-OV: SigLIP on 16x16 tiles of 8-pixel patches, i.e. a 2x2 feature map per tile.
SIGLIP_IMAGE = 16
SIGLIP_PATCH = 8


def _text_kwargs(**extra) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=256,
        # The Qwen defaults (151643...) lie outside the tiny vocabulary and trigger config warnings.
        bos_token_id=VOCAB - 6,
        eos_token_id=VOCAB - 5,
        pad_token_id=None,
        **extra,
    )


def _qwen_token_ids() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def qwen2_vl_config() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        # M-RoPE splits head_dim / 2 rotary frequencies over (temporal, height, width).
        text_config=_text_kwargs(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=HIDDEN,
            num_heads=2,
            mlp_ratio=2,
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL_PATCH,
            spatial_merge_size=MERGE,
        ),
        **_qwen_token_ids(),
    )


def qwen2_5_vl_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=_text_kwargs(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=HIDDEN,
            num_heads=2,
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL_PATCH,
            spatial_merge_size=MERGE,
            # Windows of 2x2 merged tokens; block 1 is full attention so both code paths run.
            window_size=2 * MERGE * PATCH,
            fullatt_block_indexes=[1],
        ),
        **_qwen_token_ids(),
    )


def qwen3_vl_config() -> Qwen3VLConfig:
    return Qwen3VLConfig(
        text_config=_text_kwargs(
            head_dim=HEAD_DIM,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=HIDDEN,
            num_heads=2,
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL_PATCH,
            spatial_merge_size=MERGE,
            num_position_embeddings=16,
            # Deepstack features of both vision blocks are added after text layers 0 and 1.
            deepstack_visual_indexes=[0, 1],
        ),
        **_qwen_token_ids(),
    )


def qwen3_vl_moe_config() -> Qwen3VLMoeConfig:
    dense = qwen3_vl_config().to_dict()
    text, vision = dense["text_config"], dense["vision_config"]
    for part in (text, vision):
        part.pop("model_type", None)
    # Four experts, two per token; layer 1 keeps a dense MLP, so both kinds of layer run.
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN, mlp_only_layers=[1])
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_qwen_token_ids())


def llava_onevision_config() -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text_kwargs()),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=SIGLIP_IMAGE,
            patch_size=SIGLIP_PATCH,
            vision_use_head=False,
        ),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        # A single pinpoint equal to the tile size: every image is one base tile plus a 1x1 grid of tiles.
        image_grid_pinpoints=[[SIGLIP_IMAGE, SIGLIP_IMAGE]],
    )


def _text_ids(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, TEXT_TOKEN_MAX, (n,), generator=generator)


def qwen_inputs(generator: torch.Generator, batch: int = 2) -> dict:
    """One image per sample, as the Qwen processors emit it: flattened patches, the (t, h, w) patch grid,
    ``<|vision_start|>`` + one ``<|image_pad|>`` per merged token + ``<|vision_end|>``, and ``mm_token_type_ids``
    (which v5 requires to build the 3-D M-RoPE positions)."""
    t, h, w = GRID_THW
    num_patches = t * h * w
    n_image_tokens = num_patches // MERGE**2
    pixel_values = torch.randn(batch * num_patches, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=generator)
    image_grid_thw = torch.tensor([GRID_THW] * batch)
    rows = []
    for _ in range(batch):
        rows.append(
            torch.cat(
                [
                    _text_ids(3, generator),
                    torch.tensor([VISION_START_ID]),
                    torch.full((n_image_tokens,), IMAGE_TOKEN_ID),
                    torch.tensor([VISION_END_ID]),
                    _text_ids(4, generator),
                ]
            )
        )
    input_ids = torch.stack(rows)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).int(),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
    )


def llava_onevision_inputs(generator: torch.Generator, batch: int = 2) -> dict:
    """One square tile-sized image per sample: ``pixel_values`` [B, tiles, 3, S, S] (base tile + the 1x1 anyres
    grid) and ``image_sizes`` [B, 2]. The image occupies p*p base features + p rows of (p features + a newline)
    for the grid, p = S / patch."""
    p = SIGLIP_IMAGE // SIGLIP_PATCH
    n_image_tokens = p * p + p * (p + 1)
    pixel_values = torch.randn(batch, 2, 3, SIGLIP_IMAGE, SIGLIP_IMAGE, generator=generator)
    image_sizes = torch.tensor([[SIGLIP_IMAGE, SIGLIP_IMAGE]] * batch)
    rows = [
        torch.cat(
            [_text_ids(3, generator), torch.full((n_image_tokens,), IMAGE_TOKEN_ID), _text_ids(4, generator)]
        )
        for _ in range(batch)
    ]
    input_ids = torch.stack(rows)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixel_values,
        image_sizes=image_sizes,
    )


@dataclass(frozen=True)
class TinySpec:
    family: str
    make_config: Callable
    model_cls: type
    make_inputs: Callable


TINY = {
    "qwen2_vl": TinySpec("qwen2_vl", qwen2_vl_config, Qwen2VLForConditionalGeneration, qwen_inputs),
    "qwen2_5_vl": TinySpec("qwen2_5_vl", qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration, qwen_inputs),
    "qwen3_vl": TinySpec("qwen3_vl", qwen3_vl_config, Qwen3VLForConditionalGeneration, qwen_inputs),
    "qwen3_vl_moe": TinySpec(
        "qwen3_vl_moe", qwen3_vl_moe_config, Qwen3VLMoeForConditionalGeneration, qwen_inputs
    ),
    "llava_onevision": TinySpec(
        "llava_onevision",
        llava_onevision_config,
        LlavaOnevisionForConditionalGeneration,
        llava_onevision_inputs,
    ),
}


def build(family: str, seed: int = 0):
    """(model in eval mode, inputs) for a tiny model of ``family``; deterministic in ``seed``."""
    spec = TINY[family]
    torch.manual_seed(seed)
    model = spec.model_cls(spec.make_config()).eval()
    generator = torch.Generator().manual_seed(seed)
    return model, spec.make_inputs(generator)
