"""VLsI step 2 (interaction): the student's verbalized layers learn from matched teacher layers.

Per micro-batch (docs/method.md, "Algorithm 1"):

1. The frozen teacher runs once under ``no_grad``; its hidden states at its verbalizers' target layers and
   its last layer are kept at response positions only (``[N, D]`` each, never ``[B, T, V]``).
2. The student runs with its graph; its verbalizers give ``[N, V]`` logits per target layer.
3. Every (student layer, teacher layer) pair is scored, detached, with the KL averaged over the micro-batch's
   response tokens; :func:`vlsi.losses.matching.match_layers` picks the pairs with a seeded CPU generator.
4. Only the chosen pairs are recomputed with the graph (intermediate op ``--il``), plus the last-layer op
   ``--ll`` between the teacher's and the student's own output logits, plus ``--ar-weight`` x the student's
   next-token cross-entropy. The sum is divided by the response tokens of the whole accumulation window
   across processes, as in every step (:mod:`vlsi.train.training`).

The student backbone (or only its LoRA adapters) and its verbalizers are trained by one optimizer. Every
match is recorded: ``match_log.jsonl`` (main process, one line per step) and ``matches.json`` plus heat maps
of how often each student layer took each teacher layer in the first and the last 10% of steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, gather_object
from torch import nn

from vlsi.data.pairs import TEACHER_INPUTS, PairEncoder, collate_pairs
from vlsi.data.processing import ImageSize, VLProcessor
from vlsi.data.records import ChatDataset, Encoder, collate, refuse_unanswered
from vlsi.losses.chunked import (
    LABELS,
    Term,
    chunk_tokens,
    chunked_unsupported,
    default_chunk_tokens,
    head_losses,
    head_weight,
    score_chunk_tokens,
    score_matrix,
)
from vlsi.losses.divergences import divergence
from vlsi.losses.matching import Match, MatchingConfig, match_counts, match_layers
from vlsi.losses.sparse import sparse_score_matrix
from vlsi.losses.vocab import SharedVocab
from vlsi.model.backbone import Backbone
from vlsi.model.export import checkpoint_dtype, export_checkpoint
from vlsi.model.loading import check_pair, load_model
from vlsi.model.lora import apply_lora
from vlsi.model.verbalizer import Verbalizers, base_model_info, response_states
from vlsi.train import on_policy
from vlsi.train.engines import (
    load_frozen,
    load_frozen_verbalizers_sharded,
    prepare_frozen,
    prepare_frozen_verbalizers,
    refuse_frozen_under_zero3,
    vision_on_every_batch,
    whole_load,
)
from vlsi.train.runtime import (
    VerbalizedLossArgs,
    append_jsonl,
    batch_loader,
    make_accelerator,
    mixed_precision,
)
from vlsi.train.sft import enable_gradient_checkpointing
from vlsi.train.teacher_cache import TeacherCache
from vlsi.train.teacher_responses import (
    RESPONSE_SOURCES,
    file_sha256,
    responses_path,
    teacher_responses,
)
from vlsi.train.training import final_steps, prepare_run, resume, summary, train, whole_trained, write_summary

log = logging.getLogger("vlsi.train.interact")

IL_OPS = ("kld", "ce", "l2", "none")
LL_OPS = ("kld", "ce", "none")
KL_DIRECTIONS = ("forward_kl", "reverse_kl", "jsd")
# Share of the run at each end whose matches make the "first" and "last" heat maps.
WINDOW_FRACTION = 0.1

_MATCHING = {f.name: f for f in dataclasses.fields(MatchingConfig)}


def _matching_field(name: str):
    # The matching options are MatchingConfig's own, flattened so the flags read --strategy, --k, ...
    return field(default=_MATCHING[name].default, metadata=_MATCHING[name].metadata)


@dataclass(kw_only=True)
class InteractSettings(VerbalizedLossArgs):
    """How to interact, without on what: ``vlsi distill`` fills in the models, verbalizers, data and output."""

    lora: bool = field(
        default=False, metadata={"help": "train LoRA adapters (merged on save) instead of the whole student"}
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (paper: 64)"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (paper: 64)"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute the student's activations in backward"}
    )
    il: str = field(
        default="kld",
        metadata={
            "help": "intermediate-layer op against the matched teacher layer: kld | ce (soft, teacher as "
            "target) | l2 | none (paper: kld)"
        },
    )
    ll: str = field(default="kld", metadata={"help": "last-layer op: kld | ce (to the labels) | none"})
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "what kld means, for the loss and the matching scores: forward_kl | reverse_kl | jsd"
        },
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "mixture weight of --divergence jsd"})
    kd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the divergences"})
    strategy: str = _matching_field("strategy")
    search_range: bool = _matching_field("search_range")
    order_preservation: bool = _matching_field("order_preservation")
    adaptive_temperature: bool = _matching_field("adaptive_temperature")
    temperature: float = _matching_field("temperature")
    scale: float = _matching_field("scale")
    k: int = _matching_field("k")
    eps: float = _matching_field("eps")
    ar_weight: float = field(
        default=0.0, metadata={"help": "weight of the student's next-token CE (paper: off, it hurts)"}
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "fraction of batches whose responses the current student generates, then both models "
            "score teacher-forced (GKD's lambda; 0 = the dataset's responses, the paper's step 2)"
        },
    )
    gen_temperature: float = field(
        default=0.0, metadata={"help": "sampling temperature of the on-policy responses (0 = greedy)"}
    )
    gen_max_new_tokens: int = field(
        default=32, metadata={"help": "token budget of an on-policy (or --responses teacher) response"}
    )
    responses: str = field(
        default="data",
        metadata={
            "help": "the responses of the off-policy batches: data (the dataset's) | teacher (the teacher's "
            "greedy answers, sequence-level KD; written once beside the data, rebuilt when stale)"
        },
    )
    teacher_cache: str = field(
        default="",
        metadata={
            "help": "a 'vlsi teacher-cache' directory: the teacher's top-k distributions are read from it and "
            "the teacher is never loaded"
        },
    )

    def matching(self) -> MatchingConfig:
        return MatchingConfig(**{name: getattr(self, name) for name in _MATCHING})

    def validate(self) -> None:
        for name, value, valid in (
            ("--il", self.il, IL_OPS),
            ("--ll", self.ll, LL_OPS),
            ("--divergence", self.divergence, KL_DIRECTIONS),
        ):
            if value not in valid:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(valid)}")
        if self.il == "none" and self.ll == "none" and self.ar_weight == 0:
            raise ValueError("--il none --ll none --ar-weight 0 leaves nothing to train on")
        chunk_tokens(self.loss_impl, self.loss_chunk_tokens)
        if self.teacher_cache and self.loss_impl != "chunked":
            raise ValueError("--teacher-cache works with --loss-impl chunked only")
        on_policy.validate(self.lmbda, self.gen_temperature, self.gen_max_new_tokens)
        if self.responses not in RESPONSE_SOURCES:
            raise ValueError(f"--responses {self.responses!r} is not one of {', '.join(RESPONSE_SOURCES)}")
        if self.teacher_cache and self.responses != "data":
            raise ValueError(
                "--teacher-cache holds the teacher on the dataset's responses; not --responses teacher"
            )
        if self.teacher_cache and self.lmbda > 0:
            raise ValueError(
                "--teacher-cache holds the teacher on the dataset's responses; --lmbda needs it live"
            )


@dataclass(kw_only=True)
class InteractConfig(InteractSettings, ImageSize):
    teacher: str = field(default="", metadata={"help": "checkpoint path of the (frozen) teacher"})
    teacher_verbalizers: str = field(
        default="", metadata={"help": "the teacher's verbalizers ('vlsi verbalize-train')"}
    )
    student: str = field(metadata={"help": "checkpoint path of the student to train"})
    student_verbalizers: str = field(metadata={"help": "the student's verbalizers ('vlsi verbalize-train')"})
    data: str = field(metadata={"help": "LLaVA-format JSON/JSONL training file"})
    out: str = field(metadata={"help": "output directory: student checkpoint, verbalizers/, matches.json"})


class Reader:
    """``read(layer, states [N, D]) -> logits [N, V]``: a target layer through its verbalizer, or "final" (the
    model's own output) through the final norm, then the shared language head. The chunked losses take the
    two halves apart: :meth:`features` (small, ``[N, D]``) and the head."""

    def __init__(self, backbone: Backbone, verbalizers: Verbalizers):
        self.backbone = backbone
        self.verbalizers = verbalizers

    @property
    def head(self) -> nn.Module:
        return self.backbone.lm_head

    def features(self, layer: int | str, states: torch.Tensor) -> torch.Tensor:
        if layer == "final":
            return self.backbone.final_norm(states)
        return self.verbalizers.features(layer, states)

    def __call__(self, layer: int | str, states: torch.Tensor) -> torch.Tensor:
        if layer == "final":
            return self.backbone.output_logits(states)
        return self.verbalizers.logits(layer, states)


# The logged parts of the loss: matched intermediate layers, last layer, the student's own next-token CE.
PARTS = ("il", "ll", "ar")


@dataclass(frozen=True)
class LossTerm:
    """One trained term, ``weight x op(student, teacher)``, before it is evaluated.

    ``student`` and ``teacher`` name what is read: a target layer through its verbalizer or "final", the
    model's own output. ``op`` is a divergence against the teacher, or :data:`LABELS` (cross-entropy to the
    response tokens, no teacher). ``part`` is the logged part it adds to.
    """

    part: str
    student: int | str
    op: str
    weight: float = 1.0
    teacher: int | str | None = None


def _add_part(parts: dict, term: LossTerm, value: torch.Tensor) -> None:
    # Logged as the reference always has: il weighted by the match, ar before --ar-weight.
    parts[term.part] = parts[term.part] + (term.weight * value if term.part == "il" else value)


class InteractingStudent(nn.Module):
    """The trained student with its verbalizers; its forward is one micro-batch's summed step-2 loss.

    One module so that DDP sees every trained parameter's forward; the teacher is an argument, not a
    submodule, so it is neither wrapped, saved in checkpoints nor handed to the optimizer. The loss terms
    are listed once (:meth:`terms`) and evaluated either on whole ``[N, V]`` logits, the reference
    (:class:`_ReferenceLosses`), or a chunk of tokens at a time (:class:`_ChunkedLosses`, :mod:`vlsi.losses.chunked`).
    """

    def __init__(self, student: nn.Module, verbalizers: Verbalizers, cfg: InteractConfig):
        super().__init__()
        self.student = student
        self.verbalizers = verbalizers
        self.cfg = cfg
        self.matching = cfg.matching()
        # Plain attributes: they only hold references to modules registered above.
        self.backbone = Backbone(student)
        self.read = Reader(self.backbone, verbalizers)
        # What the divergences compare: every id below the narrower head, or a cross-family pair's shared ids.
        self.vocab = SharedVocab()
        self._warned = False

    def forward(
        self,
        batch: dict,
        teacher_states: dict[int | str, torch.Tensor],
        teacher_read: Reader | None,
        teacher_layers: list[int],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Match | None]:
        """Summed loss (caller normalises), its detached parts, and the match (None when --il none).

        ``teacher_read`` None: a cached teacher (:mod:`vlsi.train.teacher_cache`), whose states are top-k
        distributions, evaluated chunked.
        """
        layers, last = self.verbalizers.layers, self.backbone.num_layers - 1
        hidden = self.backbone.layer_states(sorted({*layers, last}), batch)
        states = {layer: response_states(hidden[layer], batch["labels"])[0] for layer in layers}
        states["final"], target = response_states(hidden[last], batch["labels"])
        impl = self._impl(teacher_read)(self, states, target, teacher_read, teacher_states)
        match = None
        if self.cfg.il != "none":
            scores = impl.scores(layers, teacher_layers) / max(1, target.numel())
            match = match_layers(scores, self.matching, generator)
        loss, parts = impl.evaluate(self.terms(match, teacher_layers))
        return loss, parts, match

    def terms(self, match: Match | None, teacher_layers: list[int]) -> list[LossTerm]:
        """The trained terms: each matched pair (``--il``), the last layer (``--ll``), the student's own
        next-token cross-entropy (``--ar-weight``)."""
        cfg, terms = self.cfg, []
        if match is not None:
            # ce and l2 compare with the matched teacher layer too, so the matching matters for every op.
            op = cfg.il if cfg.il in ("ce", "l2") else cfg.divergence
            for i_s, i_l, weight in match.terms():
                terms.append(LossTerm("il", self.verbalizers.layers[i_s], op, weight, teacher_layers[i_l]))
        if cfg.ll == "kld":
            terms.append(LossTerm("ll", "final", cfg.divergence, teacher="final"))
        elif cfg.ll == "ce":
            terms.append(LossTerm("ll", "final", LABELS))
        if cfg.ar_weight:
            terms.append(LossTerm("ar", "final", LABELS, cfg.ar_weight))
        return terms

    def _impl(self, teacher_read: Reader | None) -> type:
        """How the terms are evaluated: chunked when asked for and both heads allow it (a cached teacher:
        always), else the reference."""
        if teacher_read is None:
            return _ChunkedLosses
        if self.cfg.loss_impl == "chunked":
            reason = chunked_unsupported(self.backbone.lm_head) or chunked_unsupported(teacher_read.head)
            if reason is None:
                return _ChunkedLosses
            if not self._warned:
                log.warning("--loss-impl chunked: %s; using the reference losses", reason)
                self._warned = True
        return _ReferenceLosses


class _ReferenceLosses:
    """The reference: every term on whole ``[N, V]`` logits (:mod:`vlsi.losses.divergences`). Each student layer's
    logits are computed once, with their graph, and kept; the teacher's are computed where used."""

    def __init__(self, model: InteractingStudent, states, target, teacher_read: Reader, teacher_states):
        self.cfg, self.read, self.states, self.target = model.cfg, model.read, states, target
        self.teacher_read, self.teacher_states = teacher_read, teacher_states
        self.restrict = model.vocab.restrict
        self.zero = states["final"].new_zeros((), dtype=torch.float32)
        self.score_fn = divergence(self.cfg.divergence, self.cfg.jsd_beta)
        self._logits: dict[int | str, torch.Tensor] = {}
        self._teacher: dict[int | str, torch.Tensor] = {}

    def student(self, key: int | str) -> torch.Tensor:
        if key not in self._logits:
            self._logits[key] = self.read(key, self.states[key])
        return self._logits[key]

    @torch.no_grad()
    def teacher(self, key: int | str) -> torch.Tensor:
        """The teacher's ``[N, V]`` logits, recomputed from its features (``[N, D]``), which are kept: each
        verbalizer then runs once per micro-batch, in the scores' order on every process, as FSDP2's sharded
        verbalizers need (the matched layers differ per process). The same ops as ``teacher_read(key, ...)``."""
        if key not in self._teacher:
            self._teacher[key] = self.teacher_read.features(key, self.teacher_states[key])
        return self.teacher_read.head(self._teacher[key])

    def scores(self, layers: list[int], teacher_layers: list[int]) -> torch.Tensor:
        """``[t_s, t_l]`` summed divergence of every student layer from every teacher layer, no graph."""
        student = [self.student(layer) for layer in layers]
        tau = self.cfg.kd_temperature
        with torch.no_grad():
            scores = self.zero.new_zeros(len(layers), len(teacher_layers))  # one device sync, in match_layers
            for j, t_layer in enumerate(teacher_layers):
                t_logits = self.teacher(t_layer)
                for i, s_logits in enumerate(student):
                    scores[i, j] = self.score_fn(*self.restrict(t_logits, s_logits.detach()), tau)
        return scores

    def evaluate(self, terms: list[LossTerm]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        parts = dict.fromkeys(PARTS, self.zero)
        for term in terms:
            s_logits = self.student(term.student)
            if term.op == LABELS:
                value = F.cross_entropy(s_logits.float(), self.target, reduction="sum")
            else:
                t_logits = self.teacher(term.teacher)
                value = divergence(term.op, cfg.jsd_beta)(
                    *self.restrict(t_logits, s_logits), cfg.kd_temperature
                )
            _add_part(parts, term, value)
        loss = parts["il"] + parts["ll"] + cfg.ar_weight * parts["ar"]
        return loss, {k: v.detach() for k, v in parts.items()}


class _ChunkedLosses:
    """The same terms through :mod:`vlsi.losses.chunked`: only ``[chunk, V]`` logits ever exist, the scores carry
    no graph. The student's features (``[N, D]``) are computed once each with their graph, the teacher's
    once each without; a cached teacher's states are its top-k distributions already."""

    def __init__(
        self, model: InteractingStudent, states, target, teacher_read: Reader | None, teacher_states
    ):
        self.cfg, self.read, self.states, self.target = model.cfg, model.read, states, target
        self.teacher_read, self.teacher_states = teacher_read, teacher_states
        s_head = head_weight(model.backbone.lm_head)  # refuses a head the chunked losses cannot use
        t_head = None if teacher_read is None else head_weight(teacher_read.head)
        # A cross-family pair's compared ids lead the student's rows, its labels mapped to match.
        self.s_head, self.t_head, position = model.vocab.heads(s_head, t_head)
        if position is not None:
            self.target = position[target]
        # A config built outside train_interaction may still say 0: the chunk of the device the states are on.
        self.chunk = self.cfg.loss_chunk_tokens or default_chunk_tokens(states["final"].device)
        self._features: dict[int | str, torch.Tensor] = {}
        self._teacher: dict[int | str, torch.Tensor] = {}

    def student(self, key: int | str) -> torch.Tensor:
        if key not in self._features:
            self._features[key] = self.read.features(key, self.states[key])
        return self._features[key]

    @torch.no_grad()
    def teacher(self, key: int | str):
        if key not in self._teacher:
            state = self.teacher_states[key]
            self._teacher[key] = state if self.t_head is None else self.teacher_read.features(key, state)
        return self._teacher[key]

    def scores(self, layers: list[int], teacher_layers: list[int]) -> torch.Tensor:
        cfg = self.cfg
        features = [self.student(layer) for layer in layers]
        with torch.no_grad():
            s_features = [f.detach() for f in features]
            t_features = [self.teacher(layer) for layer in teacher_layers]
            opts = dict(beta=cfg.jsd_beta, tau=cfg.kd_temperature)
            if self.t_head is None:
                # Cached: top-k buckets per layer (vlsi.losses.sparse) instead of features. One [chunk, V]
                # block is alive at a time, fewer than in the loss pass, so the loss pass's chunk fits.
                chunk = self.chunk
                return sparse_score_matrix(
                    s_features, self.s_head, t_features, cfg.divergence, chunk=chunk, **opts
                )
            chunk = score_chunk_tokens(self.chunk, len(features))
            return score_matrix(
                s_features, self.s_head, t_features, self.t_head, cfg.divergence, chunk=chunk, **opts
            )

    def evaluate(self, terms: list[LossTerm]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        chunked = [
            Term(self.student(t.student), t.op, t.weight, target=self.target)
            if t.op == LABELS
            else Term(self.student(t.student), t.op, t.weight, self.teacher(t.teacher))
            for t in terms
        ]
        loss, values = head_losses(
            chunked,
            self.s_head,
            self.t_head,
            tau=cfg.kd_temperature,
            beta=cfg.jsd_beta,
            chunk=self.chunk,
        )
        parts = dict.fromkeys(PARTS, values.new_zeros(()))
        for term, value in zip(terms, values, strict=True):
            _add_part(parts, term, value)
        return loss, parts


@torch.no_grad()
def teacher_response_states(
    backbone: Backbone, layers: list[int], batch: dict
) -> dict[int | str, torch.Tensor]:
    """The teacher's hidden states at response positions, [N, D] per target layer and "final"."""
    last = backbone.num_layers - 1
    hidden = backbone.layer_states(sorted({*layers, last}), batch)
    states: dict[int | str, torch.Tensor] = {
        layer: response_states(hidden[layer], batch["labels"])[0] for layer in layers
    }
    states["final"] = response_states(hidden[last], batch["labels"])[0]
    return states


def plot_matches(counts: list[list[int]], teacher_layers, student_layers, title: str, path) -> Path:
    """Student rows x teacher columns heat map of how often each pair was matched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(teacher_layers), 1 + 0.5 * len(student_layers)))
    image = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(teacher_layers)), [str(x) for x in teacher_layers])
    ax.set_yticks(range(len(student_layers)), [str(x) for x in student_layers])
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="matches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _load_teacher(cfg: InteractConfig, accelerator) -> tuple[Backbone, Verbalizers]:
    """The frozen teacher and its verbalizers, placed for inference under the run's engine (whole per process
    under DDP and DeepSpeed ZeRO-1/2, decoder layers sharded under FSDP2; ZeRO-3 is refused before this); it
    is never handed to the optimizer nor saved in checkpoints."""
    # A frozen teacher needs no fp32 master weights; bf16 halves its memory.
    dtype = torch.bfloat16 if mixed_precision(cfg.precision) == "bf16" else torch.float32
    # Under FSDP2 no process ever holds the whole teacher, in host RAM or on its GPU.
    model = load_frozen(accelerator, cfg.teacher, dtype)
    backbone = Backbone(model)
    # Frozen, so kept in the teacher's dtype like the teacher itself (saved in fp32: an fp32 teacher reads
    # them unchanged). Under FSDP2 read sharded, like the teacher.
    if accelerator.distributed_type == DistributedType.FSDP:
        path, device = cfg.teacher_verbalizers, accelerator.device
        verbalizers = load_frozen_verbalizers_sharded(path, backbone, dtype, device)
    else:
        # Loaded while the model is whole: each verbalizer's norm starts from a copy of the final norm.
        verbalizers = (
            Verbalizers.load(cfg.teacher_verbalizers, backbone).to(dtype).eval().requires_grad_(False)
        )
        verbalizers = prepare_frozen_verbalizers(accelerator, verbalizers)
    # The same modules run either way; under DeepSpeed the forward goes through the teacher's own engine.
    backbone.model = prepare_frozen(accelerator, model, backbone.layers)
    return backbone, verbalizers


def _interacting_student(cfg: InteractConfig, accelerator, processor: VLProcessor) -> InteractingStudent:
    """The student to train (fp32; LoRA adapters if asked) with the verbalizers it starts from."""
    with whole_load(accelerator):  # the student's verbalizers copy its final norm, which must be whole
        student = load_model(cfg.student, dtype=torch.float32)
    vision_on_every_batch(accelerator, student, processor)
    if cfg.lora:
        student = apply_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student, cfg.lora)
    verbalizers = Verbalizers.load(cfg.student_verbalizers, Backbone(student))
    if cfg.il == "none":
        # Unused parameters would stall DDP's gradient reduction.
        verbalizers.requires_grad_(False)
    return InteractingStudent(student, verbalizers, cfg)


def _generation_copy(cfg: InteractConfig, accelerator) -> on_policy.GenerationCopy:
    """Under FSDP2 / ZeRO-3: a whole copy of the student, built as the trained one is (LoRA adapters too, so
    the state dicts match), that generates the on-policy answers (:class:`vlsi.train.on_policy.GenerationCopy`)."""
    dtype = torch.bfloat16 if mixed_precision(cfg.precision) == "bf16" else torch.float32
    with whole_load(accelerator):
        model = load_model(cfg.student, dtype=dtype)
    if cfg.lora:
        with torch.random.fork_rng(devices=[]):  # apply_lora seeds; the run's RNG stays as it was
            model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    return on_policy.GenerationCopy(model.to(accelerator.device))


class MatchRecord:
    """Every match of a run: the seeded generator that samples them (one per process), one line per step in
    ``match_log.jsonl`` (main process), and how often each student layer took each teacher layer in the
    first and the last ``WINDOW_FRACTION`` of the steps (``matches.json`` and heat maps)."""

    def __init__(self, accelerator, cfg: InteractConfig, student_layers, teacher_layers, total: int):
        self.accelerator = accelerator
        self.student_layers, self.teacher_layers, self.total = student_layers, teacher_layers, total
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000003 + accelerator.process_index)
        self.window = max(1, math.ceil(WINDOW_FRACTION * total))
        shape = (len(student_layers), len(teacher_layers))
        self.counts = {key: torch.zeros(shape, dtype=torch.int64) for key in ("first", "last")}
        self.file = Path(cfg.out) / "match_log.jsonl"
        self.step_matches: list[Match] = []  # this step's, one per micro-batch

    def add(self, match: Match | None) -> None:
        if match is not None:  # None: --il none, nothing matched
            self.step_matches.append(match)

    def step_done(self, step: int) -> None:
        shape = (len(self.student_layers), len(self.teacher_layers))
        if step <= self.window:
            self.counts["first"] += match_counts(self.step_matches, *shape)
        if step > self.total - self.window:
            self.counts["last"] += match_counts(self.step_matches, *shape)
        if self.accelerator.is_main_process and self.step_matches:
            row = {"step": step, "teacher_index": [m.teacher_index for m in self.step_matches]}
            append_jsonl(self.file, row)
        self.step_matches = []

    def state(self) -> dict:
        """For a checkpoint; called on every process, since each samples its own matches and all of them
        are needed for an exact resume."""
        mine = {"generator": self.generator.get_state().tolist()}
        mine |= {key: counts.tolist() for key, counts in self.counts.items()}
        return {"per_process": gather_object([mine])}

    def load(self, state: dict) -> None:
        mine = state["per_process"][self.accelerator.process_index]
        self.generator.set_state(torch.tensor(mine["generator"], dtype=torch.uint8))
        self.counts = {key: torch.tensor(mine[key], dtype=torch.int64) for key in self.counts}

    def totals(self) -> dict[str, list]:
        """The counts summed over processes (a collective)."""
        device = self.accelerator.device
        return {
            k: self.accelerator.reduce(v.to(device), "sum").cpu().tolist() for k, v in self.counts.items()
        }

    def write(self, out: Path, totals: dict, steps: int, micro_batches_per_step: int) -> None:
        """``matches.json`` and the two heat maps."""
        matches = {
            "teacher_layers": self.teacher_layers,
            "student_layers": self.student_layers,
            **totals,
            "steps": steps,
            "window_steps": self.window,
            "micro_batches_per_step": micro_batches_per_step,
        }
        (out / "matches.json").write_text(json.dumps(matches, indent=2))
        for key in ("first", "last"):
            title = f"{key} {self.window} of {self.total} steps"
            path = out / f"matches_{key}.png"
            plot_matches(totals[key], self.teacher_layers, self.student_layers, title, path)


def _off_policy_data(cfg: InteractConfig, accelerator) -> tuple[str, dict]:
    """The file the off-policy batches read, and what a resume must find unchanged about it: ``cfg.data``
    itself, or with ``--responses teacher`` its records answered by the teacher (written by the main process
    when missing or stale). Not built when every batch is on-policy."""
    if cfg.responses == "data" or cfg.lmbda == 1:
        return cfg.data, {}
    if accelerator.is_main_process:
        teacher_responses(
            cfg.teacher,
            cfg.data,
            cfg.image_root,
            max_new_tokens=cfg.gen_max_new_tokens,
            max_length=cfg.max_length,
        )
    accelerator.wait_for_everyone()
    path = responses_path(cfg.data)
    return str(path), {"teacher_responses": file_sha256(path)}


def _mean_parts(recent: list[dict]) -> dict:
    return {k: sum(h[k] for h in recent) / len(recent) for k in recent[0]}


def train_interaction(cfg: InteractConfig) -> dict:
    cfg.validate()
    if not cfg.teacher_cache and not (cfg.teacher and cfg.teacher_verbalizers):
        raise ValueError("step 2 needs --teacher and --teacher-verbalizers, or --teacher-cache")
    accelerator = make_accelerator(cfg.precision, cfg.seed)
    if not cfg.teacher_cache:
        refuse_frozen_under_zero3(accelerator, "step 2 with a live teacher")
    cfg = cfg.on_device(accelerator.device)
    # Comparing distributions over differently-indexed vocabularies would train on noise without an error;
    # a cache is checked against the student's tokenizer and data below.
    cache = TeacherCache(cfg.teacher_cache) if cfg.teacher_cache else None
    pair = check_pair(cfg.teacher, cfg.student) if cache is None else None
    if pair is not None and pair.cross_family and cfg.lmbda > 0:
        raise ValueError(
            f"--lmbda {cfg.lmbda}: on-policy batches need the teacher to read the student's own answers as its "
            f"family renders them, which a cross-family pair ({pair.teacher_family} -> {pair.student_family}) "
            "does not support yet; use --lmbda 0"
        )
    # A same-family teacher reads the same inputs: the student's processor, image bounds included.
    processor = VLProcessor.from_pretrained(cfg.student, **cfg.pixel_bounds())
    student = _interacting_student(cfg, accelerator, processor)
    encoder, collate_fn = Encoder(processor, cfg.max_length), collate
    if cache is not None:
        student.vocab = cache.vocab
    elif pair.cross_family:
        # Each model reads the record as its own family renders it; the responses must be one id sequence.
        teacher_processor = VLProcessor.from_pretrained(cfg.teacher, **cfg.pixel_bounds())
        encoder = PairEncoder(encoder, Encoder(teacher_processor, cfg.max_length))
        collate_fn = collate_pairs(teacher_processor.pad_token_id)
        student.vocab = pair.vocab
    data, responses = _off_policy_data(cfg, accelerator)
    dataset = ChatDataset(data, encoder, cfg.image_root)
    if cfg.lmbda < 1:  # some batches are the dataset's responses
        refuse_unanswered(data, dataset.records, f"vlsi interact with --lmbda {cfg.lmbda} (< 1)")
    if cache is not None:  # before any training: a run the cache does not fit is refused, naming why
        cache.check(processor, cfg.data, cfg.kd_temperature, student.backbone.vocab_size)
        cache.verify(dataset)
    run = prepare_run(accelerator, cfg, student, dataset)
    # After the student: DeepSpeed (ZeRO-1/2) builds the teacher's engine from the config the student's prepare
    # completed.
    if cache is None:
        teacher, teacher_verbalizers = _load_teacher(cfg, accelerator)
        teacher_read, teacher_layers = Reader(teacher, teacher_verbalizers), teacher_verbalizers.layers
    else:
        teacher_read, teacher_layers = None, cache.layers
    student_layers = student.verbalizers.layers
    matches = MatchRecord(accelerator, cfg, student_layers, teacher_layers, run.total)
    copy = _generation_copy(cfg, accelerator) if cfg.lmbda > 0 and on_policy.sharded(accelerator) else None
    # The batches: the dataset's (with the cached teacher's distributions), built in --num-workers workers or
    # here; with --lmbda some are answered by the student instead.
    pad_id = processor.pad_token_id
    loader = batch_loader(cfg, pad_id, collate_fn, build=None if cache is None else cache.build(pad_id))
    batches = on_policy.OnPolicyBatches(run, cfg, processor, run.out / "on_policy.jsonl", copy, loader)
    state = resume(
        run,
        # Options at values that change nothing are left out: checkpoints written before they existed resume.
        ignore=(
            *(on_policy.OPTIONS if cfg.lmbda == 0 else ()),
            *(("responses",) if cfg.responses == "data" else ()),
        ),
        logs=[matches.file, batches.file],
        teacher_layers=teacher_layers,
        student_layers=student_layers,
        **responses,
    )
    if state is not None:
        matches.load(state)
        batches.load(state)

    def micro_loss(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        cached = batch.pop("teacher", None)  # a cached teacher's distributions
        own = batch.pop(TEACHER_INPUTS, None)  # a cross-family teacher's own encoding of the records
        if cached is not None:
            teacher_states = {key: dist.to(accelerator.device) for key, dist in cached.items()}
        elif own is not None:
            own = {k: v.to(accelerator.device) for k, v in own.items()}
            teacher_states = teacher_response_states(teacher, teacher_layers, own)
        else:
            teacher_states = teacher_response_states(teacher, teacher_layers, batch)
        loss_sum, parts, match = run.module(
            batch, teacher_states, teacher_read, teacher_layers, matches.generator
        )
        matches.add(match)
        return loss_sum, torch.tensor([parts["il"].item(), parts["ll"].item(), parts["ar"].item()])

    def entry(means: list[float]) -> dict:
        il, ll, ar = means
        return {"loss": il + ll + cfg.ar_weight * ar, "il": il, "ll": ll, "ar": ar}

    train(
        run,
        "interact",
        micro_loss,
        entry=entry,
        row=_mean_parts,
        pad_id=processor.pad_token_id,
        fetch=batches if cfg.lmbda > 0 else loader,
        after_step=matches.step_done,
        saved=lambda: matches.state() | (batches.state() if cfg.lmbda > 0 else {}),
    )

    totals = matches.totals()
    final = _mean_parts(final_steps(run)) if run.history else None
    result = summary(
        run,
        len(dataset),
        final_loss=final["loss"] if final else None,
        final_loss_parts={k: final[k] for k in PARTS} if final else None,
        tokens_seen=run.tokens_seen,
    )
    if cfg.lmbda > 0:
        result["on_policy"] = batches.summary(result["seconds"])
        log.info("on-policy: %s", result["on_policy"])
    with whole_trained(run) as trained:
        if accelerator.is_main_process:
            trained.verbalizers.save(run.out / "verbalizers", base_model_info(trained.backbone))
            matches.write(run.out, totals, run.step, cfg.grad_accum * accelerator.num_processes)
            # Trained in fp32, saved in the dtype of the student checkpoint it started from.
            dtype = checkpoint_dtype(cfg.student)
            export_checkpoint(trained.student, processor, run.out, extra={"interact": result}, dtype=dtype)
            write_summary(run.out, result)
    return result
