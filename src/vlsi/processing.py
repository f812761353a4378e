"""Turning chat messages and images into model inputs, without torchvision.

transformers' stock Qwen2-VL processor insists on a video processor, which needs torchvision; on a
CPU-only machine beside the CPU build of torch that import fails. Everything ``vlsi`` needs from a
processor is the tokenizer, the chat template and the image processor (which has a PIL backend),
plus one family rule: how many placeholder tokens an image expands to. ``VLProcessor`` is exactly
that, and it reads the ordinary files of a checkpoint (tokenizer, ``preprocessor_config.json``,
chat template), so it works on real Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from vlsi.models import resolve_model

# Families whose image placeholder expands to grid_t * grid_h * grid_w / merge_size**2 copies.
_GRID_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


@dataclass
class VLProcessor:
    tokenizer: object
    image_processor: object
    model_type: str
    image_token: str = "<|image_pad|>"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VLProcessor:
        path = resolve_model(path)  # a mistyped folder is named as one, not as a failed hub connection
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in _GRID_FAMILIES:
            raise ValueError(
                f"{path}: vlsi's processor supports model types {sorted(_GRID_FAMILIES)}, "
                f"not {config.model_type!r}"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.chat_template is None:
            template = Path(path) / "chat_template.jinja"
            if not template.exists():
                raise ValueError(
                    f"{path}: no chat template (neither in the tokenizer nor chat_template.jinja)"
                )
            tokenizer.chat_template = template.read_text()
        # The PIL backend needs no torchvision and gives the same numbers as the torchvision one.
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        return cls(tokenizer=tokenizer, image_processor=image_processor, model_type=config.model_type)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.tokenizer.chat_template is not None:
            (path / "chat_template.jinja").write_text(self.tokenizer.chat_template)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def process_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def image_token_counts(self, image_inputs: dict[str, torch.Tensor]) -> list[int]:
        if not image_inputs:
            return []
        merge = self.image_processor.merge_size
        return [int(n) // merge**2 for n in image_inputs["image_grid_thw"].prod(-1)]

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
