"""Uniform access to the parts of a Hugging Face VLM that VLsI needs.

VLsI's verbalizers read intermediate decoder layers through the model's own final norm and language head, so
for every supported family we need the decoder layers, the final norm, the language head, the vocabulary size and
per-layer hidden states. Families differ only in *where* those parts live, so each family is a row of data
(dotted attribute paths) rather than a subclass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "MEDIA_TOKEN_KEYS",
    "Backbone",
    "Family",
    "family_for",
    "get_module",
    "parse_layers",
    "target_layers",
]

# Config entries (top level or text config, as the family keeps them) naming the ids of the tokens that place
# media in a prompt: image / video placeholders and the vision start / end marks. Every family names its own
# with some of these keys; a text answer never holds one of them.
MEDIA_TOKEN_KEYS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
)

_DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """Where the VLsI-relevant parts of one model family live, as dotted paths from the top-level
    ``*ForConditionalGeneration`` model."""

    name: str
    model_types: tuple[str, ...]
    decoder_layers: str
    final_norm: str
    lm_head: str
    embed_tokens: str
    vision_tower: str
    text_config_attr: str = "text_config"
    lora_target_modules: tuple[str, ...] = _DEFAULT_LORA_TARGETS
    # Qwen3-VL ("deepstack") adds visual features to the residual stream *between* decoder layers, outside the
    # layer modules. A layer's own output then is not what the next layer (or the final norm) reads, so for such
    # families the state is taken at the input of whichever module consumes it.
    injects_between_layers: bool = False


# The transformers v5 layout is shared by all of them: the *ForConditionalGeneration wraps a `model` holding the
# vision tower and the text `language_model`, and owns `lm_head` itself.
_V5_TEXT = dict(
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    embed_tokens="model.language_model.embed_tokens",
)
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(name="qwen2_vl", model_types=("qwen2_vl",), vision_tower="model.visual", **_V5_TEXT),
        Family(name="qwen2_5_vl", model_types=("qwen2_5_vl",), vision_tower="model.visual", **_V5_TEXT),
        Family(
            name="qwen3_vl",
            model_types=("qwen3_vl",),
            vision_tower="model.visual",
            injects_between_layers=True,
            **_V5_TEXT,
        ),
        # Qwen3-VL's mixture-of-experts sizes (30B-A3B, 235B-A22B): the same layout and deepstack; the
        # experts are fused 3-D parameters, not linear layers, so LoRA adapts attention (and any dense MLP).
        Family(
            name="qwen3_vl_moe",
            model_types=("qwen3_vl_moe",),
            vision_tower="model.visual",
            injects_between_layers=True,
            **_V5_TEXT,
        ),
        Family(
            name="llava_onevision",
            model_types=("llava_onevision",),
            vision_tower="model.vision_tower",
            **_V5_TEXT,
        ),
    )
}

_BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def _supported_model_types() -> str:
    return ", ".join(sorted(_BY_MODEL_TYPE))


def _unwrap(model: nn.Module) -> nn.Module:
    # PEFT wrappers put the HF model under `base_model.model`; the family paths are relative to the HF model.
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def family_for(model_or_config) -> Family:
    """The :class:`Family` of a model (HF or PEFT-wrapped) or of a config, from its ``model_type``."""
    if isinstance(model_or_config, nn.Module):
        config = getattr(_unwrap(model_or_config), "config", None)
    else:
        config = model_or_config
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"Unsupported model type {model_type!r}; supported model types: {_supported_model_types()}"
        )
    return _BY_MODEL_TYPE[model_type]


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """The submodule of ``model`` at the dotted path ``dotted`` (e.g. ``"model.language_model.norm"``)."""
    try:
        module = model.get_submodule(dotted)
    except AttributeError as err:
        raise AttributeError(f"{type(model).__name__} has no submodule at {dotted!r}: {err}") from err
    if not isinstance(module, nn.Module):
        raise TypeError(f"{dotted!r} on {type(model).__name__} is a {type(module).__name__}, not a module")
    return module


def target_layers(num_layers: int, start: int = 2, every: int = 4) -> list[int]:
    """The layers VLsI attaches verbalizers to: ``start, start + every, ...`` below ``num_layers``
    (Qwen2-VL's 28 layers give ``[2, 6, 10, 14, 18, 22, 26]``)."""
    if num_layers <= 0 or start < 0 or every <= 0:
        raise ValueError(f"need num_layers > 0, start >= 0, every > 0; got {num_layers}, {start}, {every}")
    return list(range(start, num_layers, every))


_LAYER_SPEC = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*$")


def parse_layers(spec: str) -> list[int]:
    """Parses a comma-separated layer list such as ``"2, 6,10"`` into ``[2, 6, 10]``."""
    if not isinstance(spec, str) or not _LAYER_SPEC.match(spec):
        raise ValueError(
            f"bad layer spec {spec!r}; expected comma-separated non-negative integers, e.g. '2,6,10'"
        )
    layers = [int(part) for part in spec.split(",") if part.strip()]
    if len(set(layers)) != len(layers):
        raise ValueError(f"bad layer spec {spec!r}: duplicate layers")
    return layers


def _first_tensor(value) -> torch.Tensor:
    # Decoder layers in transformers v5 return either the hidden state or a tuple led by it.
    if isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a hidden-state tensor, got {type(value).__name__}")
    return value


class Backbone:
    """Access to the parts of a HF VLM that VLsI needs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_for(model)
        inner = _unwrap(model)
        self._inner = inner
        self.text_config = getattr(inner.config, self.family.text_config_attr)
        layers = get_module(inner, self.family.decoder_layers)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(
                f"{self.family.decoder_layers!r} is a {type(layers).__name__}, not an nn.ModuleList"
            )
        self.layers: nn.ModuleList = layers
        self.final_norm: nn.Module = get_module(inner, self.family.final_norm)
        self.lm_head: nn.Module = get_module(inner, self.family.lm_head)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        # The head's width, not config.vocab_size: checkpoints pad the head and logits have this width.
        return int(self.lm_head.out_features)

    @property
    def embed_tokens(self) -> nn.Module:
        return get_module(self._inner, self.family.embed_tokens)

    @property
    def vision_tower(self) -> nn.Module:
        return get_module(self._inner, self.family.vision_tower)

    def _validate(self, layers: Sequence[int]) -> list[int]:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise ValueError(f"layers must be a sequence of ints, got {layers!r}")
        n = self.num_layers
        out: list[int] = []
        for idx in layers:
            # bool is an int subclass; a stray True would silently mean layer 1.
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n:
                raise ValueError(f"layer index {idx!r} out of range; valid layers are 0..{n - 1}")
            if idx not in out:
                out.append(idx)
        return out

    def hidden_states(self, layers: Sequence[int], **model_inputs) -> tuple[dict[int, torch.Tensor], Any]:
        """Runs the model once; returns ``({layer: hidden state [B, T, D]}, model output)``.

        The state for ``layer`` is the residual stream after decoder layer ``layer`` (0-based), before any final
        norm, i.e. what the next layer or the final norm reads. Only the requested layers are hooked, so memory
        is O(len(layers)); the autograd graph is kept (the caller chooses ``torch.no_grad``), and the hooks are
        removed even if the forward raises.
        """
        wanted = self._validate(layers)
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def on_output(idx):
            def hook(_module, _args, output):
                captured[idx] = _first_tensor(output)

            return hook

        def on_input(idx):
            def hook(_module, args, kwargs):
                captured[idx] = _first_tensor(args if args else (kwargs["hidden_states"],))

            return hook

        try:
            for idx in wanted:
                if not self.family.injects_between_layers:
                    handles.append(self.layers[idx].register_forward_hook(on_output(idx)))
                else:
                    consumer = self.layers[idx + 1] if idx + 1 < self.num_layers else self.final_norm
                    handles.append(consumer.register_forward_pre_hook(on_input(idx), with_kwargs=True))
            output = self.model(**model_inputs)
        finally:
            for handle in handles:
                handle.remove()

        missing = [idx for idx in wanted if idx not in captured]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run during the forward pass")
        return {idx: captured[idx] for idx in wanted}, output

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own next-token logits from its last layer's state: ``lm_head(final_norm(h))``."""
        return self.lm_head(self.final_norm(hidden))

    def layer_states(self, layers: Sequence[int], batch: dict) -> dict[int, torch.Tensor]:
        """Hidden states ``[B, T, D]`` of ``layers`` for a collated batch (labels ignored). The model's
        own ``[B, T, V]`` logits are cut to one position: callers read only the states."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden, _ = self.hidden_states(layers, **inputs, use_cache=False, logits_to_keep=1)
        return hidden
