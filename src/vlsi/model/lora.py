"""LoRA adapters on a VLM's language model: which layers get them, and adding them.

:func:`lora_target_pattern` is the one definition of the adapted layers; :func:`apply_lora` adds adapters
there and :func:`vlsi.run.memory.lora_parameters` counts them for ``vlsi plan``.
"""

from __future__ import annotations

import re

import torch

from vlsi.model.backbone import Family, family_for

__all__ = ["apply_lora", "lora_target_pattern"]


def lora_target_pattern(family: Family) -> str:
    """Regex (for ``re.fullmatch`` on module names, as peft uses it) of the linear layers that get adapters:
    the projections of the language model's decoder layers only, since vision towers reuse the same names."""
    names = "|".join(family.lora_target_modules)
    return rf"{re.escape(family.decoder_layers)}\.\d+\..*({names})"


def apply_lora(model, rank: int, alpha: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    target = lora_target_pattern(family_for(model))
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target)
    return get_peft_model(model, config)
