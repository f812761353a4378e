"""Plumbing every training step shares: the accelerator, batches, and the global token count."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vlsi.data import BatchStream, ChatDataset, collate
from vlsi.losses import count_response_tokens


def mixed_precision(precision: str) -> str:
    """auto -> bf16 on GPUs that have it, else fp32 ("no")."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": "bf16", "fp32": "no"}[precision]


def make_accelerator(precision: str, seed: int) -> Accelerator:
    # The scheduler steps once per optimizer step, not once per process.
    accelerator = Accelerator(mixed_precision=mixed_precision(precision), step_scheduler_with_optimizer=False)
    set_seed(seed)
    if accelerator.device.type == "cpu":
        # Tiny weights and Adam states drift into denormal floats, which made CPU steps ~5x slower.
        torch.set_flush_denormal(True)
    return accelerator


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def next_batch(stream: BatchStream, dataset: ChatDataset, pad_id: int) -> dict:
    """The next non-empty micro-batch; a batch whose every record was bad is skipped whole."""
    for _ in range(1000):
        batch = collate([dataset[i] for i in stream.next_indices()], pad_id)
        if batch is not None:
            return batch
    raise RuntimeError(f"{dataset.path}: 1000 consecutive batches had no usable record")


def global_response_tokens(accelerator: Accelerator, micro_batches: list[dict]) -> torch.Tensor:
    """Response tokens in one accumulation window summed over all processes: the loss denominator."""
    n = torch.tensor(
        sum(count_response_tokens(b["labels"]) for b in micro_batches), device=accelerator.device
    )
    return accelerator.reduce(n, "sum").clamp(min=1)
