"""Supervised fine-tuning (VLsI step 3; also how the tiny teacher and student bases are trained).

One explicit loop on accelerate, so the same command runs under ``accelerate launch``. The loss is
the next-token cross-entropy on assistant tokens, summed and divided by the number of response
tokens in the whole accumulation window across all processes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlsi.backbone import family_for, get_module
from vlsi.checkpointing import CheckpointManager
from vlsi.data import ChatDataset, Encoder
from vlsi.engines import whole_weights
from vlsi.evaluate import EvalConfig, evaluate
from vlsi.export import export_checkpoint
from vlsi.lora import apply_lora
from vlsi.losses import response_cross_entropy
from vlsi.models import load_model
from vlsi.processing import VLProcessor
from vlsi.runtime import (
    TrainingArgs,
    append_jsonl,
    global_response_tokens,
    global_token_mean,
    grad_sync,
    history_tail,
    make_accelerator,
    model_inputs,
    next_batch,
    optimizer_step,
    prepare_training,
    progress_bar,
    run_fingerprint,
)

log = logging.getLogger("vlsi.sft")


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
class SFTConfig(SFTSettings):
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


def learning_curve_point(accelerator, model, processor: VLProcessor, cfg: SFTConfig) -> dict:
    """Greedy accuracy on the first ``eval_limit`` held-out records, overall and per skill.

    Scored on the main process only (like ``vlsi eval``), then training resumes in train mode.
    """
    point = {}
    if accelerator.is_main_process:
        metrics = evaluate(
            EvalConfig(model=cfg.model, data=cfg.eval_data, image_root=cfg.image_root, limit=cfg.eval_limit),
            model=accelerator.unwrap_model(model),
            processor=processor,
            progress=False,
        )
        skills = metrics.get("per_skill", {})
        point = {"accuracy": metrics["accuracy"], **{s: m["accuracy"] for s, m in skills.items()}}
    model.train()
    accelerator.wait_for_everyone()
    return point


def train_sft(cfg: SFTConfig) -> dict:
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.precision, cfg.seed)
    processor = VLProcessor.from_pretrained(cfg.model)
    model = load_model(cfg.model, dtype=torch.float32)
    if cfg.freeze_vision:
        get_module(model, family_for(model).vision_tower).requires_grad_(False)
    if cfg.lora:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.lora)
    dataset = ChatDataset(cfg.data, Encoder(processor, cfg.max_length), cfg.image_root)
    world = accelerator.num_processes
    model, optimizer, scheduler, stream, total = prepare_training(accelerator, cfg, model, len(dataset))
    # The learning curve only reads the model: a resume may add or drop it.
    fp = run_fingerprint(cfg, world, ignore=("eval_data", "eval_every", "eval_limit"))
    ckpts = CheckpointManager(out / "checkpoints", cfg.keep_checkpoints)
    step, tokens_seen, losses = 0, 0, []
    log_file, curve_file = out / "train_log.jsonl", out / "curve.jsonl"
    if (state := ckpts.resume_or_reset(accelerator, cfg.resume, fp, [log_file, curve_file])) is not None:
        step, tokens_seen = state["step"], state["tokens_seen"]
        stream.load(state["data"])
        losses = state.get("history", [])
        log.info("resumed at step %d", step)

    model.train()
    bar = progress_bar(accelerator, total, step, "sft")
    out.mkdir(parents=True, exist_ok=True)
    start, run_tokens = time.perf_counter(), 0
    while step < total:
        window_tokens = 0
        micro = [next_batch(stream, dataset, processor.pad_token_id) for _ in range(cfg.grad_accum)]
        n_resp = global_response_tokens(accelerator, micro)
        step_loss = 0.0
        for i, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = grad_sync(accelerator, model, i, len(micro))
            with sync, accelerator.autocast():
                logits = model(**model_inputs(batch), use_cache=False).logits
                loss_sum = response_cross_entropy(logits, batch["labels"])
                # DDP averages gradients over processes; scaling by world makes it a global token mean.
                loss = loss_sum * world / n_resp
            accelerator.backward(loss)
            step_loss += loss_sum.item()
            window_tokens += int(batch["attention_mask"].sum())
        optimizer_step(
            accelerator, model, optimizer, scheduler, cfg.max_grad_norm, step + 1, step_loss, micro
        )
        step += 1
        tokens_seen += window_tokens
        run_tokens += window_tokens
        losses.append(global_token_mean(accelerator, torch.tensor([step_loss]), n_resp)[0])
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(
            loss=f"{losses[-1]:.3f}",
            lr=f"{scheduler.get_last_lr()[0]:.1e}",
            tok_s=f"{run_tokens / elapsed:.0f}",
        )
        if accelerator.is_main_process and (step % cfg.log_every == 0 or step == total):
            recent = losses[-cfg.log_every :]
            row = {"step": step, "loss": sum(recent) / len(recent), "lr": scheduler.get_last_lr()[0]}
            append_jsonl(log_file, row)
        if cfg.eval_data and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
            append_jsonl(
                curve_file, {"step": step, **learning_curve_point(accelerator, model, processor, cfg)}
            )
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            ckpts.save(
                accelerator,
                step,
                {
                    "fingerprint": fp,
                    "tokens_seen": tokens_seen,
                    "data": stream.state(),
                    "history": history_tail(losses, cfg),
                },
            )
    bar.close()

    summary = {
        "steps": step,
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None,
        "tokens_seen": tokens_seen,
        "seconds": round(time.perf_counter() - start, 1),
        "records": len(dataset),
        **dataset.skips.summary(),
    }
    accelerator.wait_for_everyone()
    # Entered on every process: under FSDP2 / ZeRO-3 gathering the shards is a collective.
    with whole_weights(accelerator, model):
        if accelerator.is_main_process:
            export_checkpoint(accelerator.unwrap_model(model), processor, out, extra={"sft": summary})
            (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary
