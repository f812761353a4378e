"""Verbalizers: one small head per target layer that reads a hidden state as a vocabulary distribution.

verbalizer_l(h) = lm_head(norm_l(verb_ffn_l(h)))  [paper, with this project's defaults marked design]

- ``verb_ffn_l`` is a transformer block's gated FFN without the expansion: gate, up and down are each
  hidden x hidden. [paper] It is residual, ``h + down(silu(gate(h)) * up(h))``, with ``down`` zero-initialised,
  and ``norm_l`` is a trainable copy of the backbone's final norm, so an untrained verbalizer *is* the logit
  lens ``lm_head(final_norm(h))``. [design] Training starts from what the layer already says, and weight decay
  pulls back toward it.
- ``lm_head`` is the backbone's own head, shared and frozen. [design] It is deliberately not a submodule here:
  it is neither saved with the verbalizers nor handed to the optimiser, and one copy serves every layer.

The head is the expensive part (hidden x vocabulary per token; see docs/method.md "Where the compute and memory
go"), so losses go through :func:`verbalized_ce`, which applies it only at response positions.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vlsi.losses.chunked import LABELS, Term, head_losses, head_weight
from vlsi.losses.tokens import IGNORE_INDEX, shift_labels
from vlsi.model.backbone import Backbone

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "VerbFFN",
    "Verbalizer",
    "VerbalizerConfig",
    "Verbalizers",
    "base_model_info",
    "build_verbalizers",
    "response_states",
    "verbalized_ce",
]

WEIGHTS_FILE = "verbalizers.safetensors"
CONFIG_FILE = "verbalizers.json"
# What must agree between the model the verbalizers were trained on and the one they are loaded onto.
_MUST_MATCH = ("model_type", "num_layers", "hidden_size", "vocab_size")


@dataclass
class VerbalizerConfig:
    layers: list[int] = field(default_factory=list, metadata={"help": "target decoder layers (0-based)"})
    residual: bool = field(default=True, metadata={"help": "verb-FFN computes h + FFN(h) [design]"})
    zero_init: bool = field(
        default=True, metadata={"help": "zero-init the down projection: untrained = logit lens [design]"}
    )
    use_norm: bool = field(
        default=True, metadata={"help": "a trainable copy of the final norm before the head [design]"}
    )


class VerbFFN(nn.Module):
    """The gated FFN of a decoder block without the expansion: three hidden x hidden matrices. [paper]"""

    def __init__(self, hidden: int, residual: bool = True, zero_init: bool = True):
        super().__init__()
        self.residual = residual
        self.gate = nn.Linear(hidden, hidden, bias=False)
        self.up = nn.Linear(hidden, hidden, bias=False)
        self.down = nn.Linear(hidden, hidden, bias=False)
        if zero_init:
            nn.init.zeros_(self.down.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.down(F.silu(self.gate(h)) * self.up(h))
        return h + out if self.residual else out


class Verbalizer(nn.Module):
    """Everything of one layer's verbalizer before the shared head: verb-FFN, then (optionally) the norm."""

    def __init__(self, hidden: int, final_norm: nn.Module | None, cfg: VerbalizerConfig):
        super().__init__()
        self.ffn = VerbFFN(hidden, cfg.residual, cfg.zero_init)
        self.norm = copy.deepcopy(final_norm) if cfg.use_norm and final_norm is not None else nn.Identity()
        for p in self.norm.parameters():
            p.requires_grad_(True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.ffn(h))


class Verbalizers(nn.Module):
    """One :class:`Verbalizer` per target layer in front of the backbone's shared, frozen language head.

    Hidden states may have any leading shape ``[..., D]``; logits come back as ``[..., V]``.
    """

    def __init__(
        self, cfg: VerbalizerConfig, hidden_size: int, lm_head: nn.Module, final_norm: nn.Module | None
    ):
        super().__init__()
        if not cfg.layers:
            raise ValueError("VerbalizerConfig.layers is empty: no target layer to verbalize")
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.per_layer = nn.ModuleDict(
            {str(layer): Verbalizer(hidden_size, final_norm, cfg) for layer in cfg.layers}
        )
        self.attach_head(lm_head)

    def attach_head(self, lm_head: nn.Module) -> None:
        # object.__setattr__ bypasses nn.Module registration, so the head stays out of
        # parameters(), state_dict() and .to(): it belongs to (and moves with) the backbone.
        object.__setattr__(self, "lm_head", lm_head)

    @property
    def layers(self) -> list[int]:
        return list(self.cfg.layers)

    def _module(self, layer: int) -> Verbalizer:
        key = str(layer)
        if key not in self.per_layer:
            raise KeyError(f"no verbalizer for layer {layer}; target layers are {self.layers}")
        return self.per_layer[key]

    def features(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., D]``: what layer ``layer``'s verbalizer hands the shared head, in its dtype."""
        module = self._module(layer)
        return module(hidden.to(module.ffn.gate.weight.dtype)).to(self.lm_head.weight.dtype)

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., V]`` through layer ``layer``'s verbalizer and the shared head."""
        return self.lm_head(self.features(layer, hidden))

    def log_probs(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logits(layer, hidden).float(), dim=-1)

    def forward(self, hidden_by_layer: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {layer: self.logits(layer, h) for layer, h in hidden_by_layer.items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, out: str | Path, base_model: dict) -> Path:
        """Writes ``verbalizers.safetensors`` (without the head) and ``verbalizers.json`` to ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        meta = {
            "target_layers": self.layers,
            "hidden_size": self.hidden_size,
            "verb_ffn_shape": {
                "gate": [self.hidden_size] * 2,
                "up": [self.hidden_size] * 2,
                "down": [self.hidden_size] * 2,
            },
            "options": {k: v for k, v in asdict(self.cfg).items() if k != "layers"},
            "base_model": base_model,
        }
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone) -> Verbalizers:
        """Loads verbalizers saved by :meth:`save` onto ``backbone``; refuses a model of another shape."""
        verbalizers = cls.for_model(path, backbone)
        verbalizers.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))
        return verbalizers.to(backbone.lm_head.weight.device)

    @classmethod
    def for_model(cls, path: str | Path, backbone: Backbone) -> Verbalizers:
        """The verbalizers saved in ``path`` as built for ``backbone``, before their weights are read (a
        sharded load reads them itself: :func:`vlsi.train.engines.load_frozen_verbalizers_sharded`); refuses
        a model of another shape."""
        path = Path(path)
        meta_file = path / CONFIG_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a verbalizers directory")
        meta = json.loads(meta_file.read_text())
        trained_on, target = meta["base_model"], base_model_info(backbone)
        if any(trained_on.get(k) != target[k] for k in _MUST_MATCH):
            raise ValueError(
                f"verbalizers in {path} were trained on {_describe(trained_on)}, "
                f"but the model is {_describe(target)}; they only load onto a model of the same shape"
            )
        cfg = VerbalizerConfig(layers=list(meta["target_layers"]), **meta["options"])
        return cls(cfg, backbone.hidden_size, backbone.lm_head, backbone.final_norm)


def _describe(info: dict) -> str:
    shape = ", ".join(f"{k} {info.get(k)}" for k in _MUST_MATCH)
    return f"{info.get('name_or_path')!r} ({shape})"


def base_model_info(backbone: Backbone) -> dict:
    """What ``verbalizers.json`` records about the model the verbalizers belong to."""
    config = backbone.model.config
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "model_type": config.model_type,
        "num_layers": backbone.num_layers,
        "hidden_size": backbone.hidden_size,
        "vocab_size": backbone.vocab_size,
    }


def build_verbalizers(
    backbone: Backbone, layers: list[int] | None = None, cfg: VerbalizerConfig | None = None
) -> Verbalizers:
    """Fresh fp32 verbalizers for ``layers`` (or ``cfg.layers``) of ``backbone``, on the backbone's device."""
    cfg = copy.deepcopy(cfg) if cfg is not None else VerbalizerConfig()
    if layers is not None:
        cfg.layers = list(layers)
    bad = [layer for layer in cfg.layers if not 0 <= layer < backbone.num_layers]
    if bad or len(set(cfg.layers)) != len(cfg.layers):
        raise ValueError(
            f"target layers {cfg.layers} must be distinct and within 0..{backbone.num_layers - 1}"
        )
    # fp32 even beside a bf16 backbone: these are the only trained weights, and the norm copy inherits the
    # backbone's dtype otherwise.
    verbalizers = Verbalizers(cfg, backbone.hidden_size, backbone.lm_head, backbone.final_norm).float()
    return verbalizers.to(backbone.lm_head.weight.device)


def response_states(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a response token, and those tokens: ``[B, T, D] -> [N, D], [N]``.

    Position t predicts token t+1, so a state is kept where the *shifted* label is not IGNORE_INDEX.
    """
    target = shift_labels(labels)
    keep = target != IGNORE_INDEX
    return hidden[keep], target[keep]


def verbalized_ce(
    verbalizers: Verbalizers,
    layer: int,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy of layer ``layer``'s verbalizer over response tokens.

    The head runs only on the gathered response positions (``[N, V]``, never ``[B, T, V]``); with
    ``chunk_tokens`` only ``[chunk_tokens, V]`` at a time, through :func:`vlsi.losses.chunked.head_losses` (the
    logits are not kept for backward). A sum, like :func:`vlsi.losses.tokens.response_cross_entropy`, so the caller
    normalises over the whole accumulation window.
    hidden: [B, T, D]; labels: [B, T].
    """
    states, target = response_states(hidden, labels)
    if chunk_tokens is None:
        return F.cross_entropy(verbalizers.logits(layer, states).float(), target, reduction="sum")
    term = Term(verbalizers.features(layer, states), LABELS, target=target)
    return head_losses([term], head_weight(verbalizers.lm_head), chunk=chunk_tokens)[0]
