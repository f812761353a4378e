"""Each divergence written out from the probabilities, independently of :mod:`vlsi.losses.divergences`: the
reference the tests hold the library's one formula per divergence (``log_prob_divergence``) against."""

from __future__ import annotations

import torch


def divergence_by_hand(name: str, log_pt: torch.Tensor, log_ps: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed over rows, in float64, from teacher and student log-probabilities ``[N, V]``; no tau**2."""
    log_pt, log_ps = log_pt.double(), log_ps.double()
    pt, ps = log_pt.exp(), log_ps.exp()
    if name == "forward_kl":
        return (pt * (log_pt - log_ps)).sum()
    if name == "reverse_kl":
        return (ps * (log_ps - log_pt)).sum()
    if name == "jsd":
        log_m = (beta * pt + (1 - beta) * ps).log()
        return beta * (pt * (log_pt - log_m)).sum() + (1 - beta) * (ps * (log_ps - log_m)).sum()
    if name == "ce":
        return -(pt * log_ps).sum()
    assert name == "l2", name
    return (pt - ps).pow(2).sum()
