"""Turning chat messages and images into model inputs, without torchvision.

transformers' stock processors for these families insist on a video processor, which needs torchvision;
on a CPU-only machine beside the CPU build of torch that import fails. Everything ``vlsi`` needs from a
processor is the tokenizer, the chat template and the image processor (which has a PIL backend), plus one
family rule: how many placeholder tokens an image expands to, and which tensors the model reads.
``VLProcessor`` is exactly that, and it reads the ordinary files of a checkpoint (tokenizer,
``preprocessor_config.json``, chat template, ``config.json``), so it works on real Qwen2-VL / Qwen2.5-VL /
Qwen3-VL / LLaVA-OneVision checkpoints too. The rules are checked token for token against the stock
processors in ``tests/test_processing.py``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.image_processing_utils import select_best_resolution

from vlsi.hub import resolve_model

# Processor files that vlsi does not read but that ``AutoProcessor`` needs (where torchvision exists);
# an export copies them from the checkpoint it started from.
_STOCK_PROCESSOR_FILES = ("processor_config.json", "video_preprocessor_config.json")


class GridRule:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: an image is ``grid_t * grid_h * grid_w`` patches, merged
    ``merge_size``² to one placeholder each; patches of all images are concatenated, with their grids."""

    # transformers v5 builds these families' 3-D rotary positions from the token types (1 = image).
    token_types = True

    def __init__(self, image_processor, config):
        self.merge = image_processor.merge_size

    def process(self, image_processor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        return [int(n) // self.merge**2 for n in image_inputs["image_grid_thw"].prod(-1)]


class AnyresRule:
    """LLaVA-OneVision: a record's only image is a base tile (the whole image resized) plus the grid of
    tiles of the pinpoint resolution that fits it best; each tile gives ``p × p`` features
    (``p = image_size / patch_size`` of the vision tower). The grid's features are cut to the image's
    aspect ratio, shrunk when they exceed ``anyres_max_N`` tiles, and end every row with a newline token.
    In a record with several images each is one padded-to-square tile plus one newline.
    """

    token_types = False

    def __init__(self, image_processor, config):
        vision = config.vision_config
        self.features = vision.image_size // vision.patch_size
        self.pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
        self.max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        # "default" drops the vision tower's first (CLS) position, so one placeholder fewer.
        self.drop_first = config.vision_feature_select_strategy == "default"
        # The processor tiles with its pinpoints, the model unpacks with the config's: they must agree.
        model_pinpoints = [list(p) for p in config.image_grid_pinpoints]
        if model_pinpoints != self.pinpoints:
            raise ValueError(
                f"image processor pinpoints {self.pinpoints} differ from the model's {model_pinpoints}"
            )

    def process(self, image_processor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        # One record is one sample: a nested list tells the processor how many images share it.
        out = image_processor(images=[images], return_tensors="pt")
        return {k: out[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}

    def counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        sizes = image_inputs["image_sizes"].tolist()
        tile = tuple(image_inputs["pixel_values"].shape[-2:])
        base = self.features**2
        if len(sizes) > 1:
            counts = [base + 1] * len(sizes)
        else:
            counts = [base + self.grid_features(h, w, tile) for h, w in sizes]
        return [n - self.drop_first for n in counts]

    def grid_features(self, height: int, width: int, tile: tuple[int, int]) -> int:
        """Features and row newlines of the anyres grid of one ``height × width`` image."""
        best_h, best_w = select_best_resolution([height, width], self.pinpoints)
        rows, cols = self.features * (best_h // tile[0]), self.features * (best_w // tile[1])
        # The grid was padded to the pinpoint's aspect ratio; the model cuts the padding back off.
        if width / height > cols / rows:
            pad = (rows - int(round(height * (cols / width), 7))) // 2
            rows -= 2 * pad
        else:
            pad = (cols - int(round(width * (rows / height), 7))) // 2
            cols -= 2 * pad
        ratio = math.sqrt(rows * cols / (self.max_tiles * self.features**2))
        if ratio > 1.1:  # the model interpolates the grid down to about max_tiles tiles
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows * cols + rows


@dataclass(kw_only=True)
class ImageSize:
    """The pixel bounds of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL image processors, named as the stock processors
    name them (``AutoProcessor.from_pretrained(..., min_pixels=, max_pixels=)``), overriding the checkpoint's.

    An image is resized, aspect kept, so its area lies between them, then cut into one placeholder token per
    ``(patch_size * merge_size)²`` pixels (28² for Qwen2-VL). The stock ceiling is 12,845,056 px, up to 16,384
    tokens per image: at --max-length 2048 any image above ~1.6 MP makes its record too long to train on.
    The bounds are written into every exported checkpoint's ``preprocessor_config.json``.
    """

    min_pixels: int | None = field(
        default=None,
        metadata={"help": "smaller images are upscaled to this many pixels (default: the checkpoint's)"},
    )
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "larger images are downscaled to this many pixels, e.g. 1003520 (= 1280 tokens of 28x28 "
            "px); default: the checkpoint's (Qwen2-VL: 12845056, which at --max-length 2048 skips any "
            "record with an image over ~1.6 MP as too long)"
        },
    )

    def pixel_bounds(self) -> dict[str, int]:
        """The bounds that are set, as keyword arguments of :meth:`VLProcessor.from_pretrained`."""
        return {k: v for k in ("min_pixels", "max_pixels") if (v := getattr(self, k)) is not None}


def _check_bounds(image_processor, model_type: str, bounds: dict[str, int], path) -> None:
    """``min_pixels`` / ``max_pixels`` refused for a family without them, or when they leave no valid size."""
    if not bounds:
        return
    if PLACEHOLDERS[model_type][1] is not GridRule:
        raise ValueError(
            f"{path}: the {model_type} image processor has no min_pixels / max_pixels (an image becomes at most "
            "a fixed number of tiles whatever its size); leave them unset"
        )
    if image_processor is None:
        return
    low, high = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]
    token = (image_processor.patch_size * image_processor.merge_size) ** 2
    if high < token or not 0 < low <= high:
        raise ValueError(
            f"{path}: need 0 < min_pixels ({low}) <= max_pixels ({high}), and max_pixels at least one token's "
            f"{token} px"
        )


# Per model type (the families of vlsi.model.backbone.FAMILIES): the image placeholder its chat template
# writes and the rule of how many copies of it an image becomes.
PLACEHOLDERS = {
    "qwen2_vl": ("<|image_pad|>", GridRule),
    "qwen2_5_vl": ("<|image_pad|>", GridRule),
    "qwen3_vl": ("<|image_pad|>", GridRule),
    "qwen3_vl_moe": ("<|image_pad|>", GridRule),
    "llava_onevision": ("<image>", AnyresRule),
}


def _chat_template(path: Path) -> str:
    """The template beside the tokenizer: ``chat_template.jinja``, or the ``chat_template.json`` that
    processors saved by older transformers write (LLaVA-OneVision's released checkpoints among them)."""
    jinja, legacy = path / "chat_template.jinja", path / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text()
    if legacy.is_file():
        template = json.loads(legacy.read_text()).get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{legacy}: no 'chat_template' string")
        return template
    raise ValueError(
        f"{path}: no chat template (not in the tokenizer, chat_template.jinja or chat_template.json)"
    )


@dataclass
class VLProcessor:
    tokenizer: object
    image_processor: object
    model_type: str
    image_token: str
    rule: GridRule | AnyresRule
    source: Path | None = None

    @classmethod
    def from_pretrained(
        cls, path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> VLProcessor:
        """The processor of checkpoint ``path``; ``min_pixels`` / ``max_pixels`` (:class:`ImageSize`) replace
        its image processor's bounds, and :meth:`save_pretrained` writes them with the rest."""
        path = resolve_model(path)  # a mistyped folder is named as one, not as a failed hub connection
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in PLACEHOLDERS:
            raise ValueError(
                f"{path}: unsupported model type {config.model_type!r}; supported model types: "
                + ", ".join(sorted(PLACEHOLDERS))
            )
        image_token, rule_cls = PLACEHOLDERS[config.model_type]
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = _chat_template(Path(path))
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        expected = getattr(config, "image_token_id", None)
        if expected is None:
            expected = getattr(config, "image_token_index", None)
        if token_id is None or token_id == tokenizer.unk_token_id or token_id != expected:
            raise ValueError(
                f"{path}: the tokenizer spells {image_token!r} as id {token_id}, "
                f"but the model's image token id is {expected}"
            )
        # The PIL backend needs no torchvision and gives the same numbers as the torchvision one.
        bounds = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        bounds = {k: v for k, v in bounds.items() if v is not None}
        _check_bounds(None, config.model_type, bounds, path)
        # The bounds as keyword arguments, as the stock processors take them; they replace the file's.
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", **bounds)
        _check_bounds(image_processor, config.model_type, bounds, path)
        try:
            rule = rule_cls(image_processor, config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        local = Path(path) if Path(path).is_dir() else None
        return cls(tokenizer, image_processor, config.model_type, image_token, rule, local)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.tokenizer.chat_template is not None:
            (path / "chat_template.jinja").write_text(self.tokenizer.chat_template)
        for name in _STOCK_PROCESSOR_FILES:
            if self.source is not None and (self.source / name).is_file():
                shutil.copyfile(self.source / name, path / name)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def token_types(self) -> bool:
        """Whether the model reads ``mm_token_type_ids`` beside ``input_ids``."""
        return self.rule.token_types

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def process_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The pixel tensors of one record's images, in the layout the family's model reads."""
        if not images:
            return {}
        return self.rule.process(self.image_processor, images)

    def image_token_counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        """Placeholder tokens of each image of one record."""
        if not image_inputs:
            return []
        return self.rule.counts(image_inputs)

    def expand_image_tokens(self, text: str, counts: list[int]) -> str:
        """Replace the i-th image placeholder by counts[i] copies of it."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"text has {len(pieces) - 1} image placeholders but {len(counts)} images")
        out = [pieces[0]]
        for n, piece in zip(counts, pieces[1:], strict=True):
            out.append(self.image_token * n)
            out.append(piece)
        return "".join(out)
