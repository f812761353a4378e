"""Loss functions as pure tensor functions (unit-tested on hand-made tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The label of a position that is not trained on (prompt, image, padding): cross-entropy's ignore_index.
IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t predicts token t+1. [B, T]"""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_response_tokens(labels: torch.Tensor) -> int:
    return int((shift_labels(labels) != IGNORE_INDEX).sum())


def response_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over response tokens.

    Returns a sum, not a mean, so the caller can divide by the token count of the whole
    accumulation window (or of all processes): averaging per micro-batch would weight a short
    reply's tokens more than a long one's.
    logits: [B, T, V]; labels: [B, T] with IGNORE_INDEX outside the assistant turns.
    """
    target = shift_labels(labels)
    keep = target != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), target[keep], reduction="sum")
