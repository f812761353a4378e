"""Supervised fine-tuning (VLsI step 3; also how the tiny teacher and student bases are trained).

The loss of a micro-batch is the model's next-token cross-entropy summed over its response tokens; the
loop around it (:mod:`vlsi.train.training`, on accelerate, so the same command runs under ``accelerate launch``)
divides it by the response tokens of the whole accumulation window across all processes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from vlsi.data.processing import ImageSize, VLProcessor
from vlsi.data.records import ChatDataset, Encoder, refuse_unanswered
from vlsi.losses.tokens import response_cross_entropy
from vlsi.model.backbone import family_for, get_module
from vlsi.model.export import checkpoint_dtype, export_checkpoint
from vlsi.model.loading import load_model
from vlsi.model.lora import apply_lora
from vlsi.run.evaluate import EvalConfig, evaluate
from vlsi.train.engines import vision_on_every_batch
from vlsi.train.runtime import TrainingArgs, append_jsonl, make_accelerator, model_inputs
from vlsi.train.training import final_steps, prepare_run, resume, summary, train, whole_trained, write_summary


@dataclass(kw_only=True)
class SFTSettings(TrainingArgs):
    """How to fine-tune, without what: ``vlsi distill`` fills in the model, data and output of step 3."""

    lora: bool = field(default=False, metadata={"help": "train LoRA adapters on the LLM, merged on save"})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (paper: 64)"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (paper: 64)"})
    freeze_vision: bool = field(default=False, metadata={"help": "keep the vision encoder frozen"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward"}
    )
    eval_data: str = field(
        default="", metadata={"help": "held-out file scored every --eval-every steps (the learning curve)"}
    )
    eval_every: int = field(default=0, metadata={"help": "steps between learning-curve points (0 = off)"})
    eval_limit: int = field(default=200, metadata={"help": "records of --eval-data scored per point"})


@dataclass(kw_only=True)
class SFTConfig(SFTSettings, ImageSize):
    model: str = field(metadata={"help": "checkpoint path or hub id of the model to fine-tune"})
    data: str = field(metadata={"help": "LLaVA-format JSON/JSONL training file"})
    out: str = field(metadata={"help": "output directory: the fine-tuned plain checkpoint"})


def enable_gradient_checkpointing(model, lora: bool) -> None:
    # Non-reentrant: the layer hooks that read hidden states see the forward once, not again in backward.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        # With frozen embeddings nothing before the first adapter needs a gradient, and the checkpointed
        # layers would then see inputs without grad and skip their backward.
        model.enable_input_require_grads()


def _reshards_after_forward(unit) -> bool:
    # FSDP2 has a setter and no getter: a unit that reshards after forward has a post-forward mesh.
    return any(g.post_forward_mesh_info is not None for g in unit._get_fsdp_state()._fsdp_param_groups)


@contextlib.contextmanager
def whole_for_generation(model):
    """An FSDP2-sharded ``model`` whole on every process while inside, for generation.

    transformers' ``generate`` runs the vision tower outside the model's forward, where FSDP2 has not gathered
    the parameters the root unit holds (the patch embedding, the merger), and a sharded parameter cannot be used
    there. So every unit is all-gathered once on entry (a collective: enter it on every process) with
    resharding after forward switched off, FSDP2's own switch for evaluation; on exit each is resharded and the
    switch restored. The whole model is held on every process meanwhile. Anything else is left as it is."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    before = [_reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in zip(units, before, strict=True):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def learning_curve_point(accelerator, model, processor: VLProcessor, cfg: SFTConfig) -> dict:
    """Greedy accuracy on the first ``eval_limit`` held-out records, overall and per skill.

    Scored on the main process (like ``vlsi eval``), then training resumes in train mode. A sharded student
    (FSDP2, ZeRO-3) is scored by every process, on the same records, the main process keeping the score: on
    such a model transformers' ``generate`` keeps the processes' loops in step with a collective per token
    (and under ZeRO-3 each forward fetches every layer's partitions from all processes), so a main process
    generating alone would wait forever. Under FSDP2 the student is made whole for it
    (:func:`whole_for_generation`).
    """
    from torch.distributed.tensor import DTensor

    unwrapped = accelerator.unwrap_model(model)
    sharded = any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in unwrapped.parameters())
    point = {}
    with whole_for_generation(unwrapped):
        if accelerator.is_main_process or sharded:
            config = EvalConfig(
                model=cfg.model, data=cfg.eval_data, image_root=cfg.image_root, limit=cfg.eval_limit
            )
            metrics = evaluate(config, model=unwrapped, processor=processor, progress=False)
            skills = metrics.get("per_skill", {})
            if accelerator.is_main_process:
                point = {"accuracy": metrics["accuracy"], **{s: m["accuracy"] for s, m in skills.items()}}
        accelerator.wait_for_everyone()
    model.train()
    return point


def build_model(cfg: SFTConfig):
    """The model to fine-tune: fp32 master weights, the vision tower frozen and LoRA adapters as asked."""
    model = load_model(cfg.model, dtype=torch.float32)
    if cfg.freeze_vision:
        get_module(model, family_for(model).vision_tower).requires_grad_(False)
    if cfg.lora:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.lora)
    return model


def train_sft(cfg: SFTConfig) -> dict:
    accelerator = make_accelerator(cfg.precision, cfg.seed)
    processor = VLProcessor.from_pretrained(cfg.model, **cfg.pixel_bounds())
    model = build_model(cfg)
    vision_on_every_batch(accelerator, model, processor)
    dataset = ChatDataset(cfg.data, Encoder(processor, cfg.max_length), cfg.image_root)
    refuse_unanswered(cfg.data, dataset.records, "vlsi sft")
    run = prepare_run(accelerator, cfg, model, dataset)
    curve_file = run.out / "curve.jsonl"
    # The learning curve only reads the model: a resume may add or drop it.
    resume(run, ignore=("eval_data", "eval_every", "eval_limit"), logs=[curve_file])

    def micro_loss(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = run.module(**model_inputs(batch), use_cache=False).logits
        loss_sum = response_cross_entropy(logits, batch["labels"])
        # Summed over the window in float64, as the logged loss always has been.
        return loss_sum, loss_sum.detach().double().reshape(1)

    def after_step(step: int) -> None:
        if cfg.eval_data and cfg.eval_every and (step % cfg.eval_every == 0 or step == run.total):
            point = learning_curve_point(accelerator, run.module, processor, cfg)
            append_jsonl(curve_file, {"step": step, **point})

    train(
        run,
        "sft",
        micro_loss,
        entry=lambda means: means[0],
        row=lambda recent: {"loss": sum(recent) / len(recent)},
        pad_id=processor.pad_token_id,
        after_step=after_step,
    )

    final = final_steps(run)
    result = summary(
        run, len(dataset), final_loss=sum(final) / len(final) if final else None, tokens_seen=run.tokens_seen
    )
    with whole_trained(run) as trained:
        if accelerator.is_main_process:
            # Trained in fp32, saved in the dtype of the checkpoint it started from.
            dtype = checkpoint_dtype(cfg.model)
            export_checkpoint(trained, processor, run.out, extra={"sft": result}, dtype=dtype)
            write_summary(run.out, result)
    return result
