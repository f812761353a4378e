"""Plumbing every training step shares: the accelerator, batches, the global token count, and the optimizer
step with its guard against a non-finite loss or gradient norm."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from vlsi.data.loading import Batch, BatchLoader, BuildBatch
from vlsi.data.records import BatchStream, collate
from vlsi.losses.chunked import GPU_CHUNK_TOKENS, default_chunk_tokens
from vlsi.losses.tokens import count_response_tokens
from vlsi.train.checkpointing import fingerprint
from vlsi.train.engines import configure_deepspeed
from vlsi.train.optim import build_optimizer


def mixed_precision(precision: str) -> str:
    """auto -> bf16 on GPUs that have it, else fp32 ("no")."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    choices = {"bf16": "bf16", "fp32": "no"}
    if precision not in choices:
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    return choices[precision]


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator_device() -> bool:
    available = getattr(getattr(torch, "accelerator", None), "is_available", None)
    return available() if available else torch.cuda.is_available()


def make_accelerator(precision: str, seed: int) -> Accelerator:
    # Launched as several processes on a machine without GPUs (the CI, `configs/accelerate/cpu.yaml`),
    # accelerate joins them over gloo only when told cpu=True; otherwise each would train alone.
    cpu = _launched_world() > 1 and not _has_accelerator_device()
    # The scheduler steps once per optimizer step, not once per process.
    accelerator = Accelerator(
        mixed_precision=mixed_precision(precision), step_scheduler_with_optimizer=False, cpu=cpu
    )
    if accelerator.num_processes != _launched_world():
        raise RuntimeError(
            f"launched as {_launched_world()} processes but accelerate sees {accelerator.num_processes}; "
            "each would train alone on the same files (check the accelerate config)"
        )
    set_seed(seed)
    if accelerator.device.type == "cpu":
        # Tiny weights and Adam states drift into denormal floats, which made CPU steps ~5x slower.
        torch.set_flush_denormal(True)
    return accelerator


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def batch_loader(cfg: TrainingArgs, pad_id: int, collate_fn=collate, build: BuildBatch | None = None):
    """The run's ``fetch``: batches of ``build`` (encode and ``collate_fn``) built in ``--num-workers``
    ``DataLoader`` workers, ``--prefetch-factor`` each ahead, or in this process (0)."""
    return BatchLoader(build or BuildBatch(pad_id, collate_fn), cfg.num_workers, cfg.prefetch_factor)


def global_response_tokens(accelerator: Accelerator, micro_batches: list[dict]) -> torch.Tensor:
    """Response tokens in one accumulation window summed over all processes: the loss denominator."""
    n = torch.tensor(
        sum(count_response_tokens(b["labels"]) for b in micro_batches), device=accelerator.device
    )
    return accelerator.reduce(n, "sum").clamp(min=1)


def global_token_mean(accelerator: Accelerator, sums: torch.Tensor, n_resp: torch.Tensor) -> list[float]:
    """Per-response-token means of this window's loss sums over all processes: what is logged, not one
    process's share scaled up."""
    total = accelerator.reduce(sums.to(accelerator.device, torch.float64), "sum")
    return (total / n_resp.item()).tolist()


@dataclass(kw_only=True)
class TrainingArgs:
    """The knobs every training step shares; each step's config adds its own fields to these.

    keyword-only so a step's required fields (model, data, out) can follow these defaults.
    """

    image_root: str | None = field(default=None, metadata={"help": "image folder (default: the data file's)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = derive from --epochs"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data when --max-steps is 0"})
    batch_size: int = field(default=8, metadata={"help": "micro-batch size per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (paper: 1e-4)"})
    min_lr: float = field(default=1e-6, metadata={"help": "final learning rate of the cosine (paper: 1e-6)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment tracker through accelerate: tensorboard (files in OUT/tracker), wandb, mlflow "
            "or none; the logged rows (every loss part, lr) go there too"
        },
    )
    # On for training; the built-in tiny setting turns it off (its numbers come from the plain shuffle), and
    # a resumed run keeps the order it started with (vlsi.train.training.started_order).
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "batches of records of similar token count (image tokens included), shuffled in groups: "
            "little padding (--no-group-by-length: a plain shuffle)"
        },
    )
    num_workers: int = field(
        default=0,
        metadata={
            "help": "DataLoader worker processes that read, decode, encode and collate batches ahead of the "
            "step (0: in the training process); the same batches in the same order either way"
        },
    )
    prefetch_factor: int = field(default=2, metadata={"help": "batches each worker builds ahead"})
    max_length: int = field(default=2048, metadata={"help": "records longer than this are skipped"})
    precision: str = field(
        default="auto", metadata={"help": "auto | bf16 | fp32 (auto: bf16 on GPUs with it)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for new weights, data order and sampling"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    resume: bool = field(default=True, metadata={"help": "resume from the latest checkpoint in OUT"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines in train_log.jsonl"})


@dataclass(kw_only=True)
class VerbalizedLossArgs(TrainingArgs):
    """How steps 1 and 2 compute their losses through the verbalized heads (one definition for both)."""

    loss_impl: str = field(
        default="chunked",
        metadata={
            "help": "verbalized losses: chunked (response tokens in chunks, logits never stored; "
            "vlsi.losses.chunked) | reference (whole [N, V] logits per layer, kept for tests and benchmarks)"
        },
    )
    loss_chunk_tokens: int = field(
        default=0,
        metadata={
            "help": "response tokens per chunk of --loss-impl chunked: memory ~ chunk x vocabulary; 0 = by "
            f"device: {default_chunk_tokens('cpu')} on a CPU, {GPU_CHUNK_TOKENS} on a GPU, where fewer leave "
            "the head matmuls waiting on memory (vlsi.losses.chunked.default_chunk_tokens)"
        },
    )

    def on_device(self, device=None):
        """This config with ``loss_chunk_tokens`` 0 replaced by the chunk of ``device`` (None: the device a run
        started now would use), so that checkpoints and recorded configs name the chunk a run computed with."""
        if self.loss_chunk_tokens:
            return self
        return dataclasses.replace(self, loss_chunk_tokens=default_chunk_tokens(device))


# Settings that do not change what a run computes, so a resume may differ in them.
BOOKKEEPING = (
    "out", "save_every", "keep_checkpoints", "resume", "log_every", "report_to", "num_workers",
    "prefetch_factor",
)  # fmt: skip
# Options added after runs could have started; left out of the fingerprint while unset, so that a checkpoint
# written before they existed still resumes.
ADDED_UNSET = ("min_pixels", "max_pixels")
# Options added after runs could have started, with the value that does what runs did before them: a
# checkpoint (or a run's record) without the option reads as that value.
ADDED_WAS = {"group_by_length": False}


def prepare_training(
    accelerator: Accelerator, cfg: TrainingArgs, module: torch.nn.Module, n_records: int, lengths=None
):
    """AdamW + schedule over ``module``'s trainable parameters and the data order (grouped by ``lengths``
    when given), prepared by accelerate.

    Returns (module, optimizer, scheduler, stream, total_steps).
    """
    world = accelerator.num_processes
    per_step = cfg.batch_size * cfg.grad_accum * world
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_records / per_step))
    optimizer, scheduler = build_optimizer(
        module.parameters(), cfg.lr, cfg.min_lr, cfg.weight_decay, total, cfg.warmup_steps
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    stream = BatchStream(
        n_records, cfg.batch_size, cfg.seed, accelerator.process_index, world, lengths=lengths,
        window=cfg.grad_accum,
    )  # fmt: skip
    return module, optimizer, scheduler, stream, total


def run_fingerprint(cfg: TrainingArgs, world: int, ignore: tuple[str, ...] = (), **extra) -> str:
    """What a checkpoint must have been written with to be resumed exactly."""
    settings = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in (*BOOKKEEPING, *ignore) and not (k in ADDED_UNSET and v is None)
    }
    if settings.get("group_by_length"):
        # Grouped in spans of an optimizer step's records (BatchStream.window) since this key came: a grouped
        # checkpoint of the earlier span (a micro-batch's) is refused rather than resumed in another order.
        extra = {"length_groups": "per optimizer step", **extra}
    fp = fingerprint(dict(settings, world=world, **extra))
    fp.assumed = {k: v for k, v in ADDED_WAS.items() if k in settings}
    return fp


def progress_bar(accelerator: Accelerator, total: int, initial: int, desc: str) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True
    )


def grad_sync(accelerator: Accelerator, module: torch.nn.Module, index: int, count: int):
    """Gradient sync only on the last micro-batch of an accumulation window: DDP's all-reduce, FSDP2's
    reduce-scatter (``set_requires_gradient_sync``, which accelerate's ``no_sync`` sets and which FSDP2 reads
    in backward, so the backward must run inside)."""
    return contextlib.nullcontext() if index == count - 1 else accelerator.no_sync(module)


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient norm is inf or nan; the run stops there instead of training on garbage."""


def _non_finite(accelerator: Accelerator, step: int, what: str, micro: list[Batch]) -> NonFiniteError:
    ids = [rid for batch in micro for rid in getattr(batch, "record_ids", [])]
    where = f" on process {accelerator.process_index}" if accelerator.num_processes > 1 else ""
    return NonFiniteError(
        f"step {step}: non-finite training values ({what}); records in this step's batches{where}: "
        f"{', '.join(ids)}. Stopped before the optimizer step: the weights and the checkpoints already "
        "written are as they were (check these records, or lower --lr, then resume)"
    )


def check_finite(
    accelerator: Accelerator, step: int, loss, grad_norm: torch.Tensor | None, micro: list[Batch]
) -> None:
    """Raises :class:`NonFiniteError` naming the step and the records of its micro-batches when this process's
    loss sums (``loss``: a number or a tensor of them) or the gradient norm is not finite.

    Every process reaches the same verdict (one all-reduce of a flag), so none is left waiting in a collective
    for one that stopped. Called before the optimizer step, so nothing of the bad step reaches the weights
    or a checkpoint.
    """
    local = torch.as_tensor(loss, dtype=torch.float64).detach().cpu()
    local_bad = not bool(torch.isfinite(local).all())
    norm = None if grad_norm is None else float(grad_norm)
    flag = torch.tensor([float(local_bad)], device=accelerator.device)
    if float(accelerator.reduce(flag, "sum").item()) == 0 and (norm is None or math.isfinite(norm)):
        return
    if local_bad:
        what = f"loss {local.flatten().tolist()}"
    elif norm is None or math.isfinite(norm):
        what = "loss not finite on another process"
    else:
        what = "loss finite"
    raise _non_finite(accelerator, step, f"{what}, gradient norm {norm}", micro)


@contextlib.contextmanager
def names_step(accelerator: Accelerator, step: int, micro: list[Batch]):
    """Within a step's forward: a FloatingPointError raised there (the layer matching refusing NaN scores,
    :class:`vlsi.losses.matching.NonFiniteScores`) becomes a :class:`NonFiniteError` naming the step and records."""
    try:
        yield
    except NonFiniteError:
        raise
    except FloatingPointError as e:
        raise _non_finite(accelerator, step, str(e), micro) from e


def steps_in_backward(accelerator: Accelerator) -> bool:
    """Whether ``accelerator.backward`` also takes the optimizer step: under DeepSpeed accelerate calls
    ``engine.step()`` (clipping, update, zero grad) inside the backward of the last micro-batch, so a step's
    loss must be checked before that backward; DeepSpeed knows the gradient norm only after its step."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def optimizer_step(
    accelerator: Accelerator,
    module: torch.nn.Module,
    optimizer,
    scheduler,
    max_grad_norm: float,
    step: int,
    loss,
    micro: list[Batch],
):
    """Clip (if asked), check the step is finite (:func:`check_finite`), step the optimizer and the
    schedule, clear the gradients. ``step`` is the number of the step being taken (1-based), ``loss`` this
    process's loss sums over ``micro``, its micro-batches."""
    if not steps_in_backward(accelerator):
        # max_norm inf measures without clipping.
        grad_norm = accelerator.clip_grad_norm_(module.parameters(), max_grad_norm or math.inf)
        check_finite(accelerator, step, loss, grad_norm, micro)
    # Under DeepSpeed the update was applied by the last backward, after the loop checked the loss
    # (vlsi.train.training); these calls are accelerate's no-ops there.
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


TRACKERS = ("none", "tensorboard", "wandb", "mlflow")


def open_tracker(cfg: TrainingArgs, out: Path, name: str):
    """The run's accelerate tracker (``--report-to``), started; None for ``none``. Main process only."""
    if cfg.report_to not in TRACKERS:
        raise ValueError(f"--report-to {cfg.report_to!r}: expected one of {', '.join(TRACKERS)}")
    if cfg.report_to == "none":
        return None
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[cfg.report_to]
    tracker = (
        cls(name, logging_dir=str(out / "tracker")) if cfg.report_to != "wandb" else cls(name, dir=str(out))
    )
    tracker.start()
    tracker.store_init_configuration(
        {k: v for k, v in asdict(cfg).items() if v is None or isinstance(v, int | float | str | bool)}
    )
    return tracker


def flat_row(row: dict) -> dict:
    """A logged row as scalars: a per-part or per-layer dict becomes ``loss/il``, ``loss/6``, ..."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat |= {f"{key}/{sub}": float(v) for sub, v in value.items() if isinstance(v, int | float)}
        elif isinstance(value, list):
            flat |= {f"{key}/{i}": float(v) for i, v in enumerate(value) if isinstance(v, int | float)}
        elif isinstance(value, int | float):
            flat[key] = float(value)
    return flat


def history_tail(history: list, cfg: TrainingArgs) -> list:
    """The recent per-step losses a checkpoint keeps, so that after a resume the log averages and the
    summary's final loss (last 10 steps) are those of an uninterrupted run."""
    return history[-max(cfg.log_every, 10) :]


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
