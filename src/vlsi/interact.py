"""VLsI step 2 (interaction): the student's verbalized layers learn from matched teacher layers.

Per micro-batch (docs/method.md, "Algorithm 1"):

1. The frozen teacher runs once under ``no_grad``; its hidden states at its verbalizers' target layers and
   its last layer are kept at response positions only (``[N, D]`` each, never ``[B, T, V]``).
2. The student runs with its graph; its verbalizers give ``[N, V]`` logits per target layer.
3. Every (student layer, teacher layer) pair is scored, detached, with the KL averaged over the micro-batch's
   response tokens; :func:`vlsi.matching.match_layers` picks the pairs with a seeded CPU generator.
4. Only the chosen pairs are recomputed with the graph (intermediate op ``--il``), plus the last-layer op
   ``--ll`` between the teacher's and the student's own output logits, plus ``--ar-weight`` x the student's
   next-token cross-entropy. The sum is divided by the response tokens of the whole accumulation window
   across processes, as in :mod:`vlsi.sft`.

The student backbone (or only its LoRA adapters) and its verbalizers are trained by one optimizer. Every
match is recorded: ``match_log.jsonl`` (main process, one line per step) and ``matches.json`` plus heat maps
of how often each student layer took each teacher layer in the first and the last 10% of steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn

from vlsi.backbone import Backbone
from vlsi.checkpointing import CheckpointManager
from vlsi.chunked import (
    DEFAULT_CHUNK_TOKENS,
    LABELS,
    Term,
    chunk_tokens,
    chunked_unsupported,
    head_losses,
    head_weight,
    score_chunk_tokens,
    score_matrix,
)
from vlsi.data import ChatDataset, Encoder
from vlsi.divergences import divergence, shared_vocab
from vlsi.engines import prepare_frozen, whole_load, whole_weights
from vlsi.export import export_checkpoint
from vlsi.lora import apply_lora
from vlsi.matching import Match, MatchingConfig, match_counts, match_layers
from vlsi.models import load_model
from vlsi.processing import VLProcessor, check_pair
from vlsi.runtime import (
    TrainingArgs,
    append_jsonl,
    global_response_tokens,
    global_token_mean,
    grad_sync,
    history_tail,
    make_accelerator,
    mixed_precision,
    names_step,
    next_batch,
    optimizer_step,
    prepare_training,
    progress_bar,
    run_fingerprint,
)
from vlsi.sft import enable_gradient_checkpointing
from vlsi.sparse import sparse_score_matrix
from vlsi.teacher_cache import TeacherCache
from vlsi.verbalizer import Verbalizers, base_model_info, response_states

log = logging.getLogger("vlsi.interact")

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
class InteractSettings(TrainingArgs):
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
    loss_impl: str = field(
        default="chunked",
        metadata={
            "help": "verbalized losses: chunked (response tokens in chunks, logits never stored; vlsi.chunked) "
            "| reference (whole [N, V] logits per layer, kept for tests and benchmarks)"
        },
    )
    loss_chunk_tokens: int = field(
        default=DEFAULT_CHUNK_TOKENS,
        metadata={"help": "response tokens per chunk of --loss-impl chunked: memory ~ chunk x vocabulary"},
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


@dataclass(kw_only=True)
class InteractConfig(InteractSettings):
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


class InteractionLoss(nn.Module):
    """The student and its verbalizers, whose forward is one micro-batch's summed loss.

    One module so that DDP sees every trained parameter's forward; the teacher is an argument, not a
    submodule, so it is neither wrapped, saved in checkpoints nor handed to the optimizer.
    """

    def __init__(self, student: nn.Module, verbalizers: Verbalizers, cfg: InteractConfig):
        super().__init__()
        self.student = student
        self.verbalizers = verbalizers
        self.cfg = cfg
        self.matching = cfg.matching()
        self.score_fn = divergence(cfg.divergence, cfg.jsd_beta)
        # ce and l2 compare with the matched teacher layer too, so the matching matters for every op.
        self.il_fn = divergence(cfg.il) if cfg.il in ("ce", "l2") else self.score_fn
        backbone = Backbone(student)
        self._read = Reader(backbone, verbalizers)
        self._last = backbone.num_layers - 1
        # A plain attribute: Backbone only holds references to modules registered above.
        self.backbone = backbone
        self._warned = False

    def forward(
        self,
        batch: dict,
        teacher_states: dict[int | str, torch.Tensor],
        teacher_read: Reader,
        teacher_layers: list[int],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Match | None]:
        """Summed loss (caller normalises), its detached parts, and the match (None when --il none)."""
        layers = self.verbalizers.layers
        hidden = self.backbone.layer_states(sorted({*layers, self._last}), batch)
        states = {layer: response_states(hidden[layer], batch["labels"])[0] for layer in layers}
        final_states, target = response_states(hidden[self._last], batch["labels"])
        losses = self._reference_losses
        if teacher_read is None:  # a cached teacher (vlsi.teacher_cache): sparse states, chunked losses only
            head_weight(self.backbone.lm_head)  # refuses a head the chunked losses cannot use
            losses = self._chunked_losses
        elif self.cfg.loss_impl == "chunked":
            reason = chunked_unsupported(self.backbone.lm_head) or chunked_unsupported(teacher_read.head)
            if reason is None:
                losses = self._chunked_losses
            elif not self._warned:
                log.warning("--loss-impl chunked: %s; using the reference losses", reason)
                self._warned = True
        return losses(states, final_states, target, teacher_states, teacher_read, teacher_layers, generator)

    def _reference_losses(
        self, states, final_states, target, teacher_states, teacher_read, teacher_layers, generator
    ):
        """The straightforward losses on whole [N, V] logits: every student layer's logits and graphs at once."""
        cfg, tau = self.cfg, self.cfg.kd_temperature
        layers = self.verbalizers.layers
        zero = final_states.new_zeros((), dtype=torch.float32)
        parts = {"il": zero, "ll": zero, "ar": zero}
        n_tokens = max(1, target.numel())
        match = None

        if cfg.il != "none":
            student_logits = [self._read(layer, states[layer]) for layer in layers]
            with torch.no_grad():
                kl = zero.new_zeros(len(layers), len(teacher_layers))  # one device sync, in match_layers
                for j, t_layer in enumerate(teacher_layers):
                    t_logits = teacher_read(t_layer, teacher_states[t_layer])
                    for i, s_logits in enumerate(student_logits):
                        kl[i, j] = self.score_fn(*shared_vocab(t_logits, s_logits.detach()), tau) / n_tokens
            match = match_layers(kl, self.matching, generator)
            for i_s, i_l, weight in match.terms():
                with torch.no_grad():
                    t_logits = teacher_read(teacher_layers[i_l], teacher_states[teacher_layers[i_l]])
                term = self.il_fn(*shared_vocab(t_logits, student_logits[i_s]), tau)
                parts["il"] = parts["il"] + weight * term

        if cfg.ll != "none" or cfg.ar_weight:
            s_final = self._read("final", final_states)
            if cfg.ll == "kld":
                with torch.no_grad():
                    t_final = teacher_read("final", teacher_states["final"])
                parts["ll"] = self.score_fn(*shared_vocab(t_final, s_final), tau)
            elif cfg.ll == "ce":
                parts["ll"] = F.cross_entropy(s_final.float(), target, reduction="sum")
            if cfg.ar_weight:
                parts["ar"] = F.cross_entropy(s_final.float(), target, reduction="sum")
        loss = parts["il"] + parts["ll"] + cfg.ar_weight * parts["ar"]
        return loss, {k: v.detach() for k, v in parts.items()}, match

    def _chunked_losses(
        self, states, final_states, target, teacher_states, teacher_read, teacher_layers, generator
    ):
        """The same losses through :mod:`vlsi.chunked`: only [chunk, V] logits ever exist, scores carry no graph."""
        cfg, tau, chunk = self.cfg, self.cfg.kd_temperature, self.cfg.loss_chunk_tokens
        s_head = head_weight(self.backbone.lm_head)
        t_head = None if teacher_read is None else head_weight(teacher_read.head)
        n_tokens = max(1, target.numel())
        terms: list[Term] = []
        part_of: list[str] = []  # which logged part each term adds to
        match = None

        if cfg.il != "none":
            features = [self._read.features(layer, states[layer]) for layer in self.verbalizers.layers]
            with torch.no_grad():
                s_features = [f.detach() for f in features]
                opts = dict(beta=cfg.jsd_beta, tau=tau, chunk=score_chunk_tokens(chunk, len(features)))
                if t_head is None:  # cached: top-k buckets per layer (vlsi.sparse) instead of features
                    t_features = [teacher_states[layer] for layer in teacher_layers]
                    scores = sparse_score_matrix(s_features, s_head, t_features, cfg.divergence, **opts)
                else:
                    t_features = [
                        teacher_read.features(layer, teacher_states[layer]) for layer in teacher_layers
                    ]
                    scores = score_matrix(s_features, s_head, t_features, t_head, cfg.divergence, **opts)
            match = match_layers(scores / n_tokens, self.matching, generator)
            il_op = cfg.il if cfg.il in ("ce", "l2") else cfg.divergence
            for i_s, i_l, weight in match.terms():
                terms.append(Term(features[i_s], il_op, weight, t_features[i_l]))
                part_of.append("il")

        if cfg.ll != "none" or cfg.ar_weight:
            s_final = self._read.features("final", final_states)
            if cfg.ll == "kld":
                with torch.no_grad():
                    t_final = (
                        teacher_states["final"]
                        if t_head is None
                        else teacher_read.features("final", teacher_states["final"])
                    )
                terms.append(Term(s_final, cfg.divergence, 1.0, t_final))
                part_of.append("ll")
            elif cfg.ll == "ce":
                terms.append(Term(s_final, LABELS, 1.0, target=target))
                part_of.append("ll")
            if cfg.ar_weight:
                terms.append(Term(s_final, LABELS, cfg.ar_weight, target=target))
                part_of.append("ar")

        loss, values = head_losses(terms, s_head, t_head, tau=tau, beta=cfg.jsd_beta, chunk=chunk)
        # Logged parts as the reference reports them: il weighted by the match, ar before --ar-weight.
        parts = dict.fromkeys(("il", "ll", "ar"), values.new_zeros(()))
        for term, part, value in zip(terms, part_of, values, strict=True):
            parts[part] = parts[part] + (term.weight * value if part == "il" else value)
        return loss, parts, match


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
    under DDP, decoder layers sharded under FSDP2, partitioned by its own ZeRO-3 engine under DeepSpeed); it is
    never handed to the optimizer nor saved in checkpoints."""
    # A frozen teacher needs no fp32 master weights; bf16 halves its memory.
    dtype = torch.bfloat16 if mixed_precision(cfg.precision) == "bf16" else torch.float32
    with whole_load(accelerator):
        model = load_model(cfg.teacher, dtype=dtype)
    backbone = Backbone(model)
    # Loaded while the model is whole: each verbalizer starts from a copy of the final norm.
    verbalizers = Verbalizers.load(cfg.teacher_verbalizers, backbone).eval().requires_grad_(False)
    # The same modules run either way; under DeepSpeed the forward goes through the teacher's own engine.
    backbone.model = prepare_frozen(accelerator, model, backbone.layers)
    return backbone, verbalizers.to(accelerator.device)


def train_interaction(cfg: InteractConfig) -> dict:
    cfg.validate()
    if not cfg.teacher_cache and not (cfg.teacher and cfg.teacher_verbalizers):
        raise ValueError("step 2 needs --teacher and --teacher-verbalizers, or --teacher-cache")
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.precision, cfg.seed)
    # Comparing distributions over differently-indexed vocabularies would train on noise without an error;
    # a cache is checked against the student's tokenizer and data below.
    cache = TeacherCache(cfg.teacher_cache) if cfg.teacher_cache else None
    if cache is None:
        check_pair(cfg.teacher, cfg.student)
    processor = VLProcessor.from_pretrained(cfg.student)

    with whole_load(accelerator):  # the student's verbalizers copy its final norm, which must be whole
        student = load_model(cfg.student, dtype=torch.float32)
    if cfg.lora:
        student = apply_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student, cfg.lora)
    verbalizers = Verbalizers.load(cfg.student_verbalizers, Backbone(student))
    if cfg.il == "none":
        # Unused parameters would stall DDP's gradient reduction.
        verbalizers.requires_grad_(False)
    student_layers = verbalizers.layers
    loss_module = InteractionLoss(student, verbalizers, cfg)

    dataset = ChatDataset(cfg.data, Encoder(processor, cfg.max_length), cfg.image_root)
    if cache is not None:  # before any training: a run the cache does not fit is refused, naming why
        cache.check(processor, cfg.data, cfg.kd_temperature, Backbone(student).vocab_size)
        cache.verify(dataset)
    world = accelerator.num_processes
    loss_module, optimizer, scheduler, stream, total = prepare_training(
        accelerator, cfg, loss_module, len(dataset)
    )
    # After the student: DeepSpeed builds the teacher's engine from the config the student's prepare completed.
    if cache is None:
        teacher, teacher_verbalizers = _load_teacher(cfg, accelerator)
        teacher_read, teacher_layers = Reader(teacher, teacher_verbalizers), teacher_verbalizers.layers
    else:
        teacher_read, teacher_layers = None, cache.layers
    generator = torch.Generator().manual_seed(cfg.seed * 1000003 + accelerator.process_index)

    t_s, t_l = len(student_layers), len(teacher_layers)
    counts = {
        "first": torch.zeros(t_s, t_l, dtype=torch.int64),
        "last": torch.zeros(t_s, t_l, dtype=torch.int64),
    }
    window = max(1, math.ceil(WINDOW_FRACTION * total))

    fp = run_fingerprint(cfg, world, teacher_layers=teacher_layers, student_layers=student_layers)
    ckpts = CheckpointManager(out / "checkpoints", cfg.keep_checkpoints)
    step, tokens_seen, history = 0, 0, []
    log_file, match_file = out / "train_log.jsonl", out / "match_log.jsonl"
    if (state := ckpts.resume_or_reset(accelerator, cfg.resume, fp, [log_file, match_file])) is not None:
        step, tokens_seen = state["step"], state["tokens_seen"]
        stream.load(state["data"])
        mine = state["per_process"][accelerator.process_index]
        generator.set_state(torch.tensor(mine["generator"], dtype=torch.uint8))
        counts = {k: torch.tensor(mine[k], dtype=torch.int64) for k in counts}
        history = state.get("history", [])
        log.info("resumed at step %d", step)

    loss_module.train()
    bar = progress_bar(accelerator, total, step, "interact")
    out.mkdir(parents=True, exist_ok=True)
    start, run_tokens = time.perf_counter(), 0
    while step < total:
        fetch = next_batch if cache is None else cache.next_batch
        micro = [fetch(stream, dataset, processor.pad_token_id) for _ in range(cfg.grad_accum)]
        n_resp = global_response_tokens(accelerator, micro)
        sums = torch.zeros(3)  # il, ll, ar, summed over the window
        matches, window_tokens = [], 0
        for i, batch in enumerate(micro):
            cached = batch.pop("teacher", None)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            if cached is not None:
                teacher_states = {key: dist.to(accelerator.device) for key, dist in cached.items()}
            else:
                with accelerator.autocast():
                    teacher_states = teacher_response_states(teacher, teacher_layers, batch)
            sync = grad_sync(accelerator, loss_module, i, len(micro))
            with sync, accelerator.autocast(), names_step(accelerator, step + 1, micro):
                loss_sum, parts, match = loss_module(
                    batch, teacher_states, teacher_read, teacher_layers, generator
                )
                # DDP averages gradients over processes; scaling by world makes it a global token mean.
                loss = loss_sum * world / n_resp
            accelerator.backward(loss)
            sums += torch.tensor([parts["il"].item(), parts["ll"].item(), parts["ar"].item()])
            window_tokens += int(batch["attention_mask"].sum())
            if match is not None:
                matches.append(match)
        optimizer_step(
            accelerator, loss_module, optimizer, scheduler, cfg.max_grad_norm, step + 1, sums, micro
        )
        step += 1
        tokens_seen += window_tokens
        run_tokens += window_tokens

        if step <= window:
            counts["first"] += match_counts(matches, t_s, t_l)
        if step > total - window:
            counts["last"] += match_counts(matches, t_s, t_l)
        il, ll, ar = global_token_mean(accelerator, sums, n_resp)
        history.append({"loss": il + ll + cfg.ar_weight * ar, "il": il, "ll": ll, "ar": ar})
        bar.update(1)
        bar.set_postfix(
            loss=f"{history[-1]['loss']:.3f}",
            il=f"{il:.3f}",
            ll=f"{ll:.3f}",
            tok_s=f"{run_tokens / (time.perf_counter() - start):.0f}",
        )
        if accelerator.is_main_process:
            if matches:
                row = {"step": step, "teacher_index": [m.teacher_index for m in matches]}
                append_jsonl(match_file, row)
            if step % cfg.log_every == 0 or step == total:
                recent = history[-cfg.log_every :]
                row = {k: sum(h[k] for h in recent) / len(recent) for k in recent[0]}
                row = {"step": step, **row, "lr": scheduler.get_last_lr()[0]}
                append_jsonl(log_file, row)
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            mine = {"generator": generator.get_state().tolist(), **{k: v.tolist() for k, v in counts.items()}}
            state = {
                "fingerprint": fp,
                "tokens_seen": tokens_seen,
                "data": stream.state(),
                "history": history_tail(history, cfg),
                # Each process samples its own matches; all of them are needed for an exact resume.
                "per_process": gather_object([mine]),
            }
            ckpts.save(accelerator, step, state)
    bar.close()

    totals = {
        k: accelerator.reduce(v.to(accelerator.device), "sum").cpu().tolist() for k, v in counts.items()
    }
    recent = history[-10:]
    summary = {
        "steps": step,
        "final_loss": sum(h["loss"] for h in recent) / len(recent) if recent else None,
        "final_loss_parts": {k: sum(h[k] for h in recent) / len(recent) for k in ("il", "ll", "ar")}
        if recent
        else None,
        "tokens_seen": tokens_seen,
        "seconds": round(time.perf_counter() - start, 1),
        "records": len(dataset),
        **dataset.skips.summary(),
    }
    accelerator.wait_for_everyone()
    # Entered on every process: under FSDP2 / ZeRO-3 gathering the shards is a collective.
    with whole_weights(accelerator, loss_module):
        if accelerator.is_main_process:
            trained = accelerator.unwrap_model(loss_module)
            trained.verbalizers.save(out / "verbalizers", base_model_info(trained.backbone))
            matches_json = {
                "teacher_layers": teacher_layers,
                "student_layers": student_layers,
                **totals,
                "steps": step,
                "window_steps": window,
                "micro_batches_per_step": cfg.grad_accum * world,
            }
            (out / "matches.json").write_text(json.dumps(matches_json, indent=2))
            for key in ("first", "last"):
                title = f"{key} {window} of {total} steps"
                plot_matches(totals[key], teacher_layers, student_layers, title, out / f"matches_{key}.png")
            export_checkpoint(trained.student, processor, out, extra={"interact": summary})
            (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary
