"""The built-in tiny setting: a random-weight Qwen2-VL teacher and student, built locally
(other families, and the builder of every pair: :mod:`vlsi.model.tiny_models`).

Both models are ordinary Qwen2-VL checkpoints (``Qwen2VLForConditionalGeneration``) saved with a
tokenizer, an image processor and a chat template, so every later step loads them through the
same ``from_pretrained`` code path as a real 2B / 72B checkpoint. Nothing is downloaded.

Sizes follow the Qwen2-VL family: one vision encoder architecture for every size, and language
models that differ in depth and width. The image pipeline is sized to the synthetic data
(48 px boards of 16 px cells): 8 px patches merged 2x2 make one visual token per board cell,
which is what lets a from-scratch model learn the task on a CPU in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Special tokens with the same spelling (and roles) as the real Qwen2-VL tokenizer.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat format, minus the default system prompt (it would only lengthen every tiny sequence).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the byte-level BPE. A small merge budget keeps frequent words whole and splits
# rarer ones, so answers such as "yellow triangle" span several tokens, as with the real tokenizer.
_SCAFFOLD = (
    "user assistant system What How Is Which Answer the shape shapes at is are there many colour "
    "of to in this pattern with letter top middle bottom left right center directly above below Describe board "
    "digit digits largest smallest sum product last minus odd"
)
_ANSWERS = (
    "red green blue yellow purple circle square triangle cross circles squares triangles crosses "
    "zero one two three four five six seven eight nine yes no missing row column A B C D"
)


@dataclass
class LMSize:
    """Width and depth of one language model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass
class TinyConfig:
    out: str = field(metadata={"help": "output directory; writes OUT/teacher and OUT/student"})
    family: str = field(
        default="qwen2_vl",
        metadata={"help": "model family: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe or llava_onevision"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})
    vocab_size: int = field(default=512, metadata={"help": "byte-level BPE vocabulary size (incl. specials)"})
    image_size: int = field(default=48, metadata={"help": "pixels per side the image processor resizes to"})
    patch_size: int = field(default=8, metadata={"help": "vision patch size (pixels)"})
    vision_depth: int = field(default=2, metadata={"help": "vision encoder blocks (shared architecture)"})
    vision_dim: int = field(default=64, metadata={"help": "vision encoder width (shared architecture)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary base of the language model"})
    vision_rope_theta: float = field(default=10000.0, metadata={"help": "rotary base of the vision encoder"})
    mrope_section: str = field(
        default="",
        metadata={
            "help": "rotary frequencies for time,rows,columns, e.g. 1,3,12 (sum: head_dim / 2; empty = Qwen's split)"
        },
    )
    teacher: LMSize = field(
        default_factory=lambda: LMSize(
            hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=384
        ),
        metadata={"help": "teacher language model size"},
    )
    student: LMSize = field(
        default_factory=lambda: LMSize(
            hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=128
        ),
        metadata={"help": "student language model size"},
    )


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens and chat format."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Scaffolding is frequent and merges into whole words; answer words are rare and stay split.
    corpus = [_SCAFFOLD] * 20 + [_ANSWERS] * 3 + _ANSWERS.split() * 2 + _SCAFFOLD.split() * 5
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor(image_size: int, patch_size: int) -> Qwen2VLImageProcessorPil:
    # Images up to image_size x image_size keep their size (a multiple of the merged patch), so a
    # 48 x 32 row of digits is 3 x 2 visual tokens; larger ones are scaled down to that many pixels.
    merged = 2 * patch_size
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, min_pixels=merged * merged, max_pixels=image_size * image_size
    )


def mrope_sections(half: int, spec: str = "") -> list[int]:
    """M-RoPE's temporal / height / width split of the rotary half-dimension ``half``: Qwen's proportions
    (16/24/24 of 64) or, from ``spec`` ("1,3,12"), a checked custom split."""
    if not spec:
        return [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    # The sections take the frequencies in order, highest first: columns always get the lowest.
    parts = spec.split(",")
    sections = [int(x) for x in parts] if all(x.strip().isdigit() for x in parts) else []
    if len(sections) != 3 or min(sections) < 1 or sum(sections) != half:
        raise ValueError(f"mrope_section {spec!r} must be 3 positive counts summing to head_dim / 2 = {half}")
    return sections


def special_ids(tokenizer: PreTrainedTokenizerFast, tokens: list[str]) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


def text_config(size: LMSize, tokenizer: PreTrainedTokenizerFast, rope: dict, **extra) -> dict:
    ids = special_ids(tokenizer, SPECIAL_TOKENS)
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", **rope},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **extra,
    )


def qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    ids = special_ids(tokenizer, SPECIAL_TOKENS)
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_config(cfg: TinyConfig, size: LMSize, tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    head_dim = size.hidden_size // size.num_heads
    if head_dim % 8:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 8 for multimodal rotary sections")
    rope = {"rope_theta": cfg.rope_theta, "mrope_section": mrope_sections(head_dim // 2, cfg.mrope_section)}
    vision = dict(
        depth=cfg.vision_depth,
        embed_dim=cfg.vision_dim,
        num_heads=max(1, cfg.vision_dim // 16),
        mlp_ratio=2,
        hidden_size=size.hidden_size,
        patch_size=cfg.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        rope_parameters={"rope_type": "axial", "rope_theta": cfg.vision_rope_theta},
    )
    ids = special_ids(tokenizer, SPECIAL_TOKENS)
    return Qwen2VLConfig(
        text_config=text_config(size, tokenizer, rope),
        vision_config=vision,
        **qwen_token_ids(tokenizer),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
