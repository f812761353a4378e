"""The training loop of steps 1-3, written once.

Each step (:mod:`vlsi.train.verbalize`, :mod:`vlsi.train.interact`, :mod:`vlsi.train.sft`) builds its models and says what
is particular to it: the loss of one micro-batch, what a step's losses look like in the log, and what it
exports. The rest is here, as plain functions called in this order:

1. :func:`prepare_run`: AdamW, the cosine schedule and the data order over the trained module, prepared by
   accelerate (:func:`vlsi.train.runtime.prepare_training`).
2. :func:`resume`: the latest checkpoint in OUT, refused when it was written with other settings.
3. :func:`train`: per optimizer step, a window of ``--grad-accum`` micro-batches, the optimizer step with
   its guard against non-finite values, a log row every ``--log-every`` steps and a checkpoint every
   ``--save-every`` steps.
4. :func:`summary` and :func:`whole_trained`: ``train_summary.json`` and the trained weights, whole, for
   the step to export.

A micro-batch's loss is summed over its response tokens and divided by the response tokens of the whole
window across processes, so every token weighs the same whatever the batch shapes and process count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from vlsi.data.records import BatchStream, ChatDataset, record_lengths, scan_skips, skip_report
from vlsi.train.checkpointing import STATE_FILE, CheckpointManager
from vlsi.train.engines import whole_weights
from vlsi.train.runtime import (
    ADDED_WAS,
    Batch,
    TrainingArgs,
    append_jsonl,
    batch_loader,
    check_finite,
    flat_row,
    global_response_tokens,
    global_token_mean,
    grad_sync,
    history_tail,
    names_step,
    open_tracker,
    optimizer_step,
    prepare_training,
    progress_bar,
    run_fingerprint,
    steps_in_backward,
)

log = logging.getLogger("vlsi.train.training")

# The summary's final loss is the mean of this many last steps.
FINAL_STEPS = 10

# (summed loss of one micro-batch, with its graph; its detached sums, 1-D, what the log reports)
MicroLoss = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Run:
    """One training run: what is trained, on which records, and how far it has come."""

    accelerator: Accelerator
    cfg: TrainingArgs
    out: Path
    module: nn.Module  # as prepared by accelerate; its forward computes the loss
    optimizer: Any
    scheduler: Any
    stream: BatchStream
    dataset: ChatDataset
    total: int  # optimizer steps of the whole run
    fingerprint: str = ""
    checkpoints: CheckpointManager | None = None
    step: int = 0
    tokens_seen: int = 0
    # One entry per step, in the step's own shape (a number, a list per layer, a dict of parts); checkpoints
    # keep the tail, so after a resume the log averages are those of an uninterrupted run.
    history: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def log_file(self) -> Path:
        return self.out / "train_log.jsonl"


def prepare_run(
    accelerator: Accelerator,
    cfg: TrainingArgs,
    module: nn.Module,
    dataset: ChatDataset,
    n_records: int | None = None,
) -> Run:
    """The run of ``module``'s trainable parameters over the first ``n_records`` of ``dataset`` (all).

    First the main process reports the share of records that will be skipped, by reason, from a sample spread
    over them: the run's summary counts them only at its end, and a high rate (say, images too large for
    --max-length) is worth stopping for in the first minutes."""
    n_records = len(dataset) if n_records is None else n_records
    cfg = started_order(cfg)
    if accelerator.is_main_process:
        print(skip_report(scan_skips(dataset, n=n_records), n_records, cfg.max_length), flush=True)
    lengths = None
    if cfg.group_by_length:
        # The first process of the node builds the lengths, the others wait on its lock and map them.
        lengths = record_lengths(dataset.records, dataset.encoder.processor)
    module, optimizer, scheduler, stream, total = prepare_training(
        accelerator, cfg, module, n_records, lengths
    )
    if accelerator.is_main_process:
        # What was read: for a mixture, each source, its size and the records drawn from it.
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "data.json").write_text(json.dumps(dataset.records.describe(), indent=2))
    return Run(accelerator, cfg, Path(cfg.out), module, optimizer, scheduler, stream, dataset, total)


def started_order(cfg: TrainingArgs) -> TrainingArgs:
    """``cfg`` with the data order of the run it resumes: ``group_by_length`` as the latest checkpoint in OUT
    has it, off where the checkpoint predates the option (:data:`vlsi.train.runtime.ADDED_WAS`; such runs
    shuffled plainly). The order is the run's since its first step, and the checkpoint's position means
    nothing in another one: a run started under the old default (off) resumes as it started, where
    refusing it would leave only --no-resume. ``cfg`` itself when nothing is resumed."""
    latest = CheckpointManager(Path(cfg.out) / "checkpoints").latest() if cfg.resume else None
    if latest is None:
        return cfg
    settings = json.loads((latest / STATE_FILE).read_text()).get("settings", {})
    started = settings.get("group_by_length", ADDED_WAS["group_by_length"])
    if started == cfg.group_by_length:
        return cfg
    log.warning(
        "%s: resuming a run that started %s; it goes on so (--no-resume starts it again %s)",
        latest,
        *(("grouped by length", "shuffled") if started else ("shuffled, not grouped by length", "grouped")),
    )
    return dataclasses.replace(cfg, group_by_length=started)


def resume(run: Run, ignore: tuple[str, ...] = (), logs: tuple | list = (), **settings) -> dict | None:
    """Continues ``run`` from the latest checkpoint in OUT, or, with ``--no-resume`` or none there, starts it
    clean (old checkpoints, train_log.jsonl and the step's other ``logs`` removed).

    The checkpoint must have been written with the same settings: the config less ``ignore`` and the
    bookkeeping fields, plus ``settings``. Called once every model of the run is placed, frozen ones
    included. Returns the checkpoint's state, where a step finds what it saved of its own; None on a clean
    start.
    """
    accelerator, cfg = run.accelerator, run.cfg
    run.fingerprint = run_fingerprint(cfg, accelerator.num_processes, ignore, **settings)
    run.checkpoints = CheckpointManager(run.out / "checkpoints", cfg.keep_checkpoints)
    state = run.checkpoints.resume_or_reset(accelerator, cfg.resume, run.fingerprint, [run.log_file, *logs])
    if state is not None:
        run.step, run.tokens_seen = state["step"], state.get("tokens_seen", 0)
        run.stream.load(state["data"])
        run.history = state.get("history", [])
        log.info("resumed at step %d", run.step)
    return state


def train(
    run: Run,
    name: str,
    micro_loss: MicroLoss,
    *,
    entry: Callable[[list[float]], Any],
    row: Callable[[list], dict],
    pad_id: int,
    fetch: Callable[[BatchStream, ChatDataset, int], Batch] | None = None,
    after_step: Callable[[int], None] | None = None,
    saved: Callable[[], dict] | None = None,
) -> None:
    """Trains ``run`` to its last step.

    Per step: ``--grad-accum`` micro-batches from ``fetch``, each through ``micro_loss``; the optimizer
    step; the step's per-token means (over every process) into the history as ``entry(means)``; every
    ``--log-every`` steps the row ``{"step", **row(recent entries), "lr"}``; ``after_step(step)``; every
    ``--save-every`` steps a checkpoint, with ``saved()`` added to its state. ``fetch`` None: the records
    encoded and collated, in ``--num-workers`` workers or here (:func:`vlsi.train.runtime.batch_loader`); a
    fetch with a ``close`` is closed at the end.
    """
    fetch = fetch or batch_loader(run.cfg, pad_id)
    try:
        _train(run, name, micro_loss, entry, row, pad_id, fetch, after_step, saved)
    finally:
        close = getattr(fetch, "close", None)
        if close is not None:
            close()


def _train(run: Run, name: str, micro_loss: MicroLoss, entry, row, pad_id: int, fetch, after_step, saved):
    accelerator, cfg = run.accelerator, run.cfg
    run.module.train()
    bar = progress_bar(accelerator, run.total, run.step, name)
    run.out.mkdir(parents=True, exist_ok=True)
    run.started, run_tokens = time.perf_counter(), 0
    tracker = open_tracker(cfg, run.out, name) if accelerator.is_main_process else None
    while run.step < run.total:
        micro = [fetch(run.stream, run.dataset, pad_id) for _ in range(cfg.grad_accum)]
        sums, n_resp, tokens = _window(run, micro, micro_loss)
        optimizer_step(
            accelerator,
            run.module,
            run.optimizer,
            run.scheduler,
            cfg.max_grad_norm,
            run.step + 1,
            sums,
            micro,
        )
        run.step += 1
        run.tokens_seen += tokens
        run_tokens += tokens
        # The means are taken of float32 sums, whatever precision a step summed its window in.
        run.history.append(entry(global_token_mean(accelerator, sums.float(), n_resp)))
        bar.update(1)
        bar.set_postfix(_postfix(row(run.history[-1:]), run, run_tokens))
        if accelerator.is_main_process and (run.step % cfg.log_every == 0 or run.step == run.total):
            recent = run.history[-cfg.log_every :]
            logged = {**row(recent), "lr": run.scheduler.get_last_lr()[0]}
            append_jsonl(run.log_file, {"step": run.step, **logged})
            if tracker is not None:
                seconds = max(time.perf_counter() - run.started, 1e-9)
                tracker.log(
                    flat_row(logged)
                    | {"tokens_per_s": run_tokens / seconds, "skipped": float(run.dataset.skips.total)},
                    step=run.step,
                )
        if after_step is not None:
            after_step(run.step)
        if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.total:
            _save(run, saved)
    bar.close()
    if tracker is not None:
        tracker.finish()


def _window(run: Run, micro: list[Batch], micro_loss: MicroLoss) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward of one accumulation window: (this process's loss sums, the window's response
    tokens over all processes, the tokens this process saw)."""
    accelerator = run.accelerator
    n_resp = global_response_tokens(accelerator, micro)
    sums, tokens = 0, 0
    for i, batch in enumerate(micro):
        # Tensors go to the device; anything else (a cached teacher's distributions) is the step's to place.
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync = grad_sync(accelerator, run.module, i, len(micro))
        # The backward too runs inside: FSDP2 reads its gradient-sync flag in backward (DDP in forward).
        with sync:
            with accelerator.autocast(), names_step(accelerator, run.step + 1, micro):
                loss_sum, logged = micro_loss(batch)
                # DDP averages gradients over processes; scaling by world makes it a global token mean.
                loss = loss_sum * accelerator.num_processes / n_resp
            sums = sums + logged
            if steps_in_backward(accelerator) and i == len(micro) - 1:
                # This backward also applies the update: the window's loss is checked before it.
                check_finite(accelerator, run.step + 1, sums, None, micro)
            accelerator.backward(loss)
        tokens += int(batch["attention_mask"].sum())
    return sums, n_resp, tokens


def _postfix(row: dict, run: Run, run_tokens: int) -> dict[str, str]:
    """The progress bar's losses (a per-layer dict flattened to loss2, loss6, ...), learning rate and speed."""
    flat = {}
    for key, value in row.items():
        parts = value.items() if isinstance(value, dict) else [("", value)]
        flat |= {f"{key}{sub}": f"{v:.3f}" for sub, v in parts}
    seconds = max(time.perf_counter() - run.started, 1e-9)
    return flat | {"lr": f"{run.scheduler.get_last_lr()[0]:.1e}", "tok_s": f"{run_tokens / seconds:.0f}"}


def _save(run: Run, saved: Callable[[], dict] | None) -> None:
    state = {
        "fingerprint": run.fingerprint,
        "tokens_seen": run.tokens_seen,
        "data": run.stream.state(),
        "history": history_tail(run.history, run.cfg),
    }
    # Called on every process: what a step adds may be gathered from all of them.
    run.checkpoints.save(run.accelerator, run.step, state | (saved() if saved else {}))


def final_steps(run: Run) -> list:
    """The history entries the summary's final loss averages."""
    return run.history[-FINAL_STEPS:]


def summary(run: Run, records: int, **fields) -> dict:
    """``train_summary.json``: the steps taken, the step's own ``fields``, the seconds of this process's
    training, the records trained on and those skipped (by reason)."""
    return {
        "steps": run.step,
        **fields,
        "seconds": round(time.perf_counter() - run.started, 1),
        "records": records,
        "data": run.dataset.records.describe(),
        **run.dataset.skips.summary(),
    }


def write_summary(out: Path, summary: dict) -> None:
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))


@contextlib.contextmanager
def whole_trained(run: Run) -> Iterator[nn.Module]:
    """The trained module, unwrapped, with whole weights while inside (to measure, save or export).

    Entered on every process once all have finished training: under FSDP2 / ZeRO-3 gathering the shards is
    a collective.
    """
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    with whole_weights(accelerator, run.module):
        yield accelerator.unwrap_model(run.module)
    accelerator.wait_for_everyone()
