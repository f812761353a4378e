"""Optimiser and learning-rate schedule shared by every training step."""

from __future__ import annotations

import math

import torch


def cosine_with_warmup(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``total`` (paper: 1e-4 -> 1e-6)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(params, lr: float, min_lr: float, weight_decay: float, total: int, warmup: int):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total, warmup, lr, min_lr) / lr
    )
    return optimizer, scheduler
