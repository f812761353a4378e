"""Per-GPU memory of each VLsI step, estimated from model sizes alone (what ``vlsi plan`` prints).

:func:`estimate_memory` states the formula; the parameter counts come from models built on the meta
device (:mod:`vlsi.run.plan`), never from weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from vlsi.model.backbone import Backbone, family_for, parse_layers
from vlsi.model.lora import lora_target_pattern

GIB = 1024**3


@dataclass
class ModelSummary:
    """What the plan needs of one model; ``model`` is its meta-device instance."""

    name: str
    source: str
    config: object
    model: nn.Module
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    head_width: int
    total: int
    language: int
    largest_layer: int
    # A mixture of experts computes with each token's routed experts only: the parameters one token meets.
    active: int | None = None
    decoder: int = 0  # parameters of all decoder layers: what FSDP2 shards of a frozen model

    @property
    def vision(self) -> int:
        """Vision tower plus projector: everything outside the language model and its head."""
        return self.total - self.language

    @property
    def backbone(self) -> Backbone:
        return Backbone(self.model)


# Bytes per parameter, following what the steps do today (interact.py, sft.py, verbalize.py): frozen
# backbones, the teacher and the teacher's verbalizers in bf16; the trained student keeps fp32 master weights
# under bf16 autocast; a trained parameter adds its fp32 gradient and AdamW's two fp32 moments.
FROZEN_BF16 = 2
FP32 = 4
GRAD_AND_ADAM = 4 + 8
# DDP reduces gradients through a bucket copy of every trained gradient.
DDP_BUCKET = 4
REFERENCE_HEAD_BYTES = 12


def verbalizer_parameters(backbone: Backbone, layers: list[int]) -> int:
    """Parameters of the real :class:`~vlsi.model.verbalizer.Verbalizers` for ``layers``, built on the meta device
    (three hidden x hidden matrices plus a norm copy per layer)."""
    from vlsi.model.verbalizer import build_verbalizers

    with torch.device("meta"):
        return build_verbalizers(backbone, layers).num_parameters()


def lora_parameters(model: nn.Module, rank: int) -> int:
    """LoRA parameters ``rank x (in + out)`` of every linear layer that :func:`vlsi.model.lora.apply_lora` adapts
    (:func:`vlsi.model.lora.lora_target_pattern`)."""
    pattern = re.compile(lora_target_pattern(family_for(model)))
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and pattern.fullmatch(name)
    )


@dataclass
class Memory:
    """Bytes per GPU by kind."""

    weights: float = 0.0
    states: float = 0.0
    activations: float = 0.0
    heads: float = 0.0
    # The part of ``weights`` that is gathered only while a sharded unit runs (two decoder layers); the rest
    # of ``weights`` is what a GPU holds between forwards.
    gathered: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.states + self.activations + self.heads


def _layer_activation_bytes(m: ModelSummary) -> int:
    # Per token and decoder layer, saved for backward under bf16 autocast: the fp32 residual stream in and out
    # and the two norm outputs (4 x 4D), the bf16 q/k/v/attention/o-proj inputs (~4D x 2) and the bf16 gate,
    # up, activation and product of the MLP (4I x 2). Flash / SDPA attention: no T x T scores.
    return 24 * m.hidden_size + 8 * m.intermediate_size


def _trained_activations(m: ModelSummary, tokens: int, checkpointing: bool) -> float:
    per_layer = _layer_activation_bytes(m) * tokens
    if checkpointing:
        # Each layer keeps only its fp32 input; one layer at a time is recomputed in full.
        return m.num_layers * tokens * m.hidden_size * FP32 + per_layer
    return m.num_layers * per_layer


def _frozen_forward(m: ModelSummary, tokens: int) -> float:
    # No graph: one layer's working set at a time.
    return _layer_activation_bytes(m) * tokens


def _verb_ffn_graph(m: ModelSummary, layers: int, tokens: int) -> float:
    # Per token and verbalizer: bf16 gate, up, activation, product, down (5 x 2D) and the fp32 sum and norm.
    return layers * tokens * 18 * m.hidden_size


def _verbalized_heads(cfg: dict, live: int, vocab: int, tokens: int, engine: str) -> float:
    # ZeRO-3 partitions the head, which the chunked losses cannot read outside the forward: they fall back.
    if cfg["loss_impl"] == "reference" or engine == "zero3":
        # Whole [n, V] logits for each of the ``live`` heads: bf16 logits plus the fp32 copy and log-softmax
        # kept for backward, ~12 bytes (measured: benchmarks/gpu_interact.py, --loss-impl reference).
        return live * tokens * vocab * REFERENCE_HEAD_BYTES
    # About 4 fp32 [chunk, V] blocks at a time (vlsi.losses.chunked): logits, log-softmax, the other side's, gradient;
    # step 2's scoring shrinks its chunk so that all student layers together hold about as much.
    return 4 * min(cfg["loss_chunk_tokens"], tokens) * vocab * FP32


@dataclass
class Part:
    """One group of parameters on a GPU: how many, bytes each as stored, whether they are trained, and
    whether FSDP2 shards them (what ZeRO-3 would shard: everything)."""

    params: int
    bytes_each: int
    trained: bool = False
    sharded: bool = True


def _place(parts: list[Part], engine: str, gpus: int, gather: int) -> Memory:
    shard = gpus if engine in ("fsdp", "zero3") else 1
    memory = Memory()
    for part in parts:
        held = part.params / (shard if part.sharded or engine == "zero3" else 1)
        memory.weights += held * part.bytes_each
        if part.trained:
            memory.states += held * (GRAD_AND_ADAM + (DDP_BUCKET if engine == "ddp" and gpus > 1 else 0))
    if shard > 1:
        memory.weights += gather  # the unit being gathered and the next one, prefetched
        memory.gathered = gather
    return memory


def _frozen_parts(m: ModelSummary, bytes_each: int) -> list[Part]:
    """A frozen model as :func:`vlsi.train.engines.prepare_frozen` places it under FSDP2: its decoder layers
    sharded; its embeddings, final norm, head and vision tower whole on every GPU (the verbalizers call the
    head outside the model's forward)."""
    return [Part(m.decoder, bytes_each), Part(m.total - m.decoder, bytes_each, sharded=False)]


def estimate_memory(
    teacher: ModelSummary,
    student: ModelSummary,
    recipe: dict,
    engine: str,
    gpus: int,
    seq_len: int | None = None,
    n_params: dict | None = None,
    frozen_bytes: int = FROZEN_BF16,
) -> dict[str, tuple[Memory, int, int]]:
    """Per-GPU memory of each step: ``{row: (Memory, batch, seq_len)}``.

    Formula (bytes; D hidden, I intermediate, L layers, V head width, n = batch x seq-len tokens per GPU,
    every token counted as a response token, an upper bound):

    - weights: frozen backbones and the frozen teacher's verbalizers in ``frozen_bytes`` per parameter (bf16:
      2, as the steps load them under bf16; 4 for an fp32 run); the trained student fp32 master weights
      (4/param, steps 2-3, as the code loads it); trained verbalizers fp32 (4/param). A trained parameter
      (LoRA adapters or the whole student, and the verbalizers being trained) adds grads + AdamW moments
      (12/param) and under ddp a gradient bucket (4/param). Under fsdp what each GPU really holds: the
      trained modules and the teacher's verbalizers divided by the GPU count; of a frozen model the decoder
      layers divided, its embeddings, final norm, head and vision tower whole on every GPU; plus two gathered
      decoder layers (``Memory.gathered``). zero3 divides everything (it is refused for steps 1 and 2).
    - activations of a trained model: L x n x (24D + 8I) (fp32 residual stream and norms, bf16
      projections, flash attention); with gradient checkpointing L x n x 4D + one layer's n x (24D + 8I).
      A frozen forward holds one layer's n x (24D + 8I) plus the hidden states it hands on (bf16 [n, D] per
      target layer). A verb-FFN graph: 18D per token and layer.
    - heads: steps 1-2 with ``loss_impl: chunked`` apply the head to ``loss_chunk_tokens`` at a time (fp32
      [chunk, V] blocks, about 4 at a time), never layers x tokens x V; with ``reference``, and under zero3
      (whose partitioned head the chunked losses cannot read), 12 bytes per token and vocabulary entry for
      every live head (step 1: each target layer; step 2: the student's layers and its output).
      Step 3 keeps the model's own [n, V] logits (bf16) plus an fp32 copy and its gradient (10 bytes).

    Not counted: vision-tower activations (text-dominated batches), the CUDA context and allocator slack
    (add 1-3 GiB).
    """
    n_params = n_params or {}
    t_layers, s_layers = parse_layers(recipe["teacher_layers"]), parse_layers(recipe["student_layers"])
    t_verb = n_params.get("teacher_verbalizers") or verbalizer_parameters(teacher.backbone, t_layers)
    s_verb = n_params.get("student_verbalizers") or verbalizer_parameters(student.backbone, s_layers)
    v_cfg, i_cfg, s_cfg = recipe["verbalize"], recipe["interact"], recipe["sft"]
    where = (engine, gpus, seq_len, frozen_bytes)
    return {
        "1 verbalize teacher": _verbalize(teacher, t_verb, len(t_layers), v_cfg, where),
        "1 verbalize student": _verbalize(student, s_verb, len(s_layers), v_cfg, where),
        "2 interact": _interact(
            teacher, student, (t_verb, len(t_layers)), (s_verb, len(s_layers)), i_cfg, n_params, where
        ),
        "3 sft": _sft(student, s_cfg, n_params, where),
    }


# where: (engine, GPUs, sequence length or None for each step's max_length, bytes per frozen parameter).
Where = tuple[str, int, "int | None", int]
StepMemory = tuple[Memory, int, int]  # (per GPU, batch, sequence length)


def _tokens(cfg: dict, where: Where) -> tuple[int, int, int]:
    """(tokens per GPU, batch, sequence length) of one micro-batch."""
    length = where[2] or cfg["max_length"]
    return cfg["batch_size"] * length, cfg["batch_size"], length


def _placed(parts: list[Part], where: Where, gathered: ModelSummary) -> Memory:
    """:func:`_place`, gathering two of ``gathered``'s largest decoder layers (bf16) when sharded."""
    return _place(parts, where[0], where[1], 2 * gathered.largest_layer * where[3])


def _verbalize(m: ModelSummary, verb: int, layers: int, cfg: dict, where: Where) -> StepMemory:
    """Step 1: one frozen backbone, its verbalizers trained."""
    n, batch, length = _tokens(cfg, where)
    mem = _placed([*_frozen_parts(m, where[3]), Part(verb, FP32, True)], where, m)
    mem.activations = (
        _frozen_forward(m, n) + layers * n * m.hidden_size * FROZEN_BF16 + _verb_ffn_graph(m, layers, n)
    )
    mem.heads = _verbalized_heads(cfg, layers, m.head_width, n, where[0])
    return mem, batch, length


def _interact(
    teacher: ModelSummary, student: ModelSummary, t: tuple, s: tuple, cfg: dict, n_params: dict, where: Where
) -> StepMemory:
    """Step 2: the frozen teacher and its verbalizers; the student (LoRA or whole) and its verbalizers
    trained. ``t`` and ``s``: (verbalizer parameters, target layers) of the teacher and the student."""
    (t_verb, t_layers), (s_verb, s_layers) = t, s
    n, batch, length = _tokens(cfg, where)
    # The teacher's verbalizers are frozen: in the teacher's dtype, sharded one unit per verbalizer.
    parts = [*_frozen_parts(teacher, where[3]), Part(t_verb, where[3]), Part(s_verb, FP32, True)]
    mem = _placed(parts + _student_parts(student, cfg, n_params), where, teacher)
    mem.activations = (
        _trained_activations(student, n, cfg["gradient_checkpointing"])
        + _verb_ffn_graph(student, s_layers, n)
        + _frozen_forward(teacher, n)
        + (t_layers + 1) * n * teacher.hidden_size * FROZEN_BF16
    )
    vocab = max(teacher.head_width, student.head_width)
    mem.heads = _verbalized_heads(cfg, s_layers + 1, vocab, n, where[0])
    return mem, batch, length


def _sft(student: ModelSummary, cfg: dict, n_params: dict, where: Where) -> StepMemory:
    """Step 3: the student alone, its own head over every position."""
    n, batch, length = _tokens(cfg, where)
    mem = _placed(_student_parts(student, cfg, n_params), where, student)
    mem.activations = _trained_activations(student, n, cfg["gradient_checkpointing"])
    mem.heads = n * student.head_width * (FROZEN_BF16 + FP32 + FP32)
    return mem, batch, length


def _student_parts(student: ModelSummary, cfg: dict, n_params: dict) -> list[Part]:
    if cfg["lora"]:
        lora = n_params.get(("lora", cfg["lora_rank"])) or lora_parameters(student.model, cfg["lora_rank"])
        return [Part(student.total, FP32), Part(lora, FP32, True)]
    if cfg.get("freeze_vision", False):
        return [Part(student.vision, FP32), Part(student.language, FP32, True)]
    return [Part(student.total, FP32, True)]
