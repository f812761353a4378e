"""Divergences between the teacher's and the student's verbalized vocabulary distributions.

Every divergence takes teacher then student logits, ``[N, V]`` (any leading shape is flattened), already
restricted to response tokens and to the shared vocabulary (:func:`shared_vocab`), and returns the SUM over
the N rows: the caller divides by the response-token count of the whole accumulation window, as
:func:`vlsi.losses.tokens.response_cross_entropy` does, so short replies are not over-weighted.

Conventions
- Precision: logits are promoted to at least float32 and normalised with ``log_softmax``; bf16 logits of a
  151k vocabulary lose too much in ``softmax`` then ``log``.
- Temperature ``tau``: both logits are divided by ``tau`` and, with ``tau_squared=True`` (the default), the
  result is multiplied by ``tau**2`` as in Hinton et al. (2015), so the gradient's magnitude does not shrink
  as ``1/tau**2`` when ``tau`` grows and a change of ``tau`` needs no change of the loss weight. At
  ``tau = 1`` (this project's default) the factor is 1. The same factor applies to every divergence here,
  ``l2`` included, so that switching the operation never silently rescales the loss.
- Direction: ``forward_kl(t, s) = KL(p_t || p_s)`` is the default [design, docs/method.md "KL direction and averaging"];
  ``reverse_kl(t, s) = KL(p_s || p_t)``.
- Generalised JSD, as in GKD (Agarwal et al. 2024, eq. 1) and TRL's ``GKDTrainer.generalized_jsd_loss``:
  ``JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``, ``m = beta * p_t + (1 - beta) * p_s``.
  Here it is the plain mixture formula at every beta, so ``jsd(beta=0) == jsd(beta=1) == 0`` (the mixture
  equals one of the two distributions and its weight is 0). TRL special-cases the endpoints instead:
  its ``beta=0`` is forward KL and ``beta=1`` reverse KL. Those are the limits of the *rescaled*
  divergence, ``JSD_beta / beta -> KL(p_t || p_s)`` as beta -> 0 and ``JSD_beta / (1 - beta) ->
  KL(p_s || p_t)`` as beta -> 1; ask for ``forward_kl`` / ``reverse_kl`` by name to get them here.
  At ``beta = 0.5`` it is the symmetric Jensen-Shannon divergence.
- ``l2``: the paper's L2 operation compares hidden states, but teacher and student widths differ (3584 vs
  1536 for Qwen2-VL 7B / 2B) and cannot be compared without a projection the paper does not describe, so this
  project's ``l2`` is :func:`mse` on the verbalized probability vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "ce_to_teacher",
    "divergence",
    "forward_kl",
    "jsd",
    "log_prob_divergence",
    "mse",
    "reverse_kl",
    "shared_vocab",
]

# (teacher_logits [N, V], student_logits [N, V], tau) -> summed divergence, a 0-dim tensor.
Divergence = Callable[..., torch.Tensor]
# (teacher log-probs [c, V], student log-probs [c, V]) -> summed divergence over the c rows, without tau**2.
LogProbDivergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _log_probs(
    t_logits: torch.Tensor, s_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if t_logits.shape[-1] != s_logits.shape[-1]:
        raise ValueError(
            f"teacher and student vocabularies differ ({t_logits.shape[-1]} vs {s_logits.shape[-1]}); "
            "restrict both with shared_vocab() first"
        )
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    dtype = torch.promote_types(torch.promote_types(t_logits.dtype, s_logits.dtype), torch.float32)
    log_pt = F.log_softmax(t_logits.to(dtype).flatten(0, -2) / tau, dim=-1)  # [N, V]
    log_ps = F.log_softmax(s_logits.to(dtype).flatten(0, -2) / tau, dim=-1)  # [N, V]
    return log_pt, log_ps


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_rows KL(p || q) from log-probabilities."""
    # F.kl_div(input, target) is KL(target || input): the arguments read backwards on purpose.
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


def _scaled(value: torch.Tensor, tau: float, tau_squared: bool) -> torch.Tensor:
    return value * tau**2 if tau_squared else value


def log_prob_divergence(name: str, beta: float = 0.5) -> LogProbDivergence:
    """The formula of divergence ``name`` on log-probabilities already computed: the one place each is
    written. The functions below apply it to whole logits; :mod:`vlsi.losses.chunked` to chunks it normalised once
    per layer (scoring t_s x t_l pairs from logits would repeat each log-softmax t_l or t_s times)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}")
    if name == "forward_kl":
        return lambda log_pt, log_ps: _kl(log_pt, log_ps)
    if name == "reverse_kl":
        return lambda log_pt, log_ps: _kl(log_ps, log_pt)
    if name == "ce":
        return lambda log_pt, log_ps: -(log_pt.exp() * log_ps).sum()
    if name == "l2":
        return lambda log_pt, log_ps: (log_pt.exp() - log_ps.exp()).pow(2).sum()
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")

    def jsd_formula(log_pt: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
        log_beta = torch.tensor(beta, dtype=log_pt.dtype, device=log_pt.device).log()
        log_1m_beta = torch.tensor(1.0 - beta, dtype=log_pt.dtype, device=log_pt.device).log()
        # log m without leaving log space; logaddexp avoids the [2, N, V] copy a stacked logsumexp would make.
        log_m = torch.logaddexp(log_pt + log_beta, log_ps + log_1m_beta)  # [N, V]
        return beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)

    return jsd_formula


def forward_kl(
    t_logits: torch.Tensor, s_logits: torch.Tensor, tau: float = 1.0, *, tau_squared: bool = True
) -> torch.Tensor:
    """Summed KL(p_t || p_s): mass-covering, the student is pushed to cover every mode of the teacher."""
    return _scaled(log_prob_divergence("forward_kl")(*_log_probs(t_logits, s_logits, tau)), tau, tau_squared)


def reverse_kl(
    t_logits: torch.Tensor, s_logits: torch.Tensor, tau: float = 1.0, *, tau_squared: bool = True
) -> torch.Tensor:
    """Summed KL(p_s || p_t): mode-seeking, the student may drop teacher modes it cannot fit."""
    return _scaled(log_prob_divergence("reverse_kl")(*_log_probs(t_logits, s_logits, tau)), tau, tau_squared)


def jsd(
    t_logits: torch.Tensor,
    s_logits: torch.Tensor,
    beta: float = 0.5,
    tau: float = 1.0,
    *,
    tau_squared: bool = True,
) -> torch.Tensor:
    """Summed generalised JSD: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s.

    Zero at beta = 0 and beta = 1 (see the module docstring for how this differs from TRL's endpoints).
    """
    formula = log_prob_divergence("jsd", beta)  # checks beta before any work
    return _scaled(formula(*_log_probs(t_logits, s_logits, tau)), tau, tau_squared)


def ce_to_teacher(
    t_logits: torch.Tensor, s_logits: torch.Tensor, tau: float = 1.0, *, tau_squared: bool = True
) -> torch.Tensor:
    """Summed soft cross-entropy -sum_v p_t log p_s (the paper's "CE" operation).

    Equals forward KL plus the teacher's entropy: the same gradient for the student, but not zero at a
    perfect match, which is why it is not the matching score.
    """
    return _scaled(log_prob_divergence("ce")(*_log_probs(t_logits, s_logits, tau)), tau, tau_squared)


def mse(
    t_logits: torch.Tensor, s_logits: torch.Tensor, tau: float = 1.0, *, tau_squared: bool = True
) -> torch.Tensor:
    """Summed squared Euclidean distance between the probability vectors, sum_rows sum_v (p_t - p_s)**2.

    Summed, not averaged, over the vocabulary: a mean over 151k entries would shrink the loss (and its
    gradient) by the vocabulary size. The mean over tokens is the caller's, as for every divergence here.
    """
    return _scaled(log_prob_divergence("l2")(*_log_probs(t_logits, s_logits, tau)), tau, tau_squared)


_REGISTRY: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "ce": ce_to_teacher,
    "l2": mse,
}
DIVERGENCES = tuple(_REGISTRY)


def divergence(name: str, beta: float = 0.5) -> Divergence:
    """The divergence called ``name``, as ``fn(t_logits, s_logits, tau=1.0, *, tau_squared=True)``.

    ``beta`` is used by ``jsd`` only and is bound here, so every returned callable has the same signature.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}")
    if name == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")

        def bound_jsd(t_logits, s_logits, tau=1.0, *, tau_squared=True):
            return jsd(t_logits, s_logits, beta, tau, tau_squared=tau_squared)

        return bound_jsd
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------------------------
# Shared vocabulary
# ---------------------------------------------------------------------------------------------------------


def shared_vocab(t_logits: torch.Tensor, s_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits cut to the narrower vocabulary width (views, no copy). [..., V_t], [..., V_s] -> [..., V]

    Qwen2-VL 72B / 7B heads carry padding rows beyond the 2B head's width although the tokenizer is the
    same. Those rows are never a training target, so their probability is negligible and dropping them only
    renormalises the softmax over real tokens. Whether the narrower width really is a shared tokenizer is
    :func:`vlsi.model.loading.check_same_tokenizer`'s job; this function cannot tell.
    """
    width = min(t_logits.shape[-1], s_logits.shape[-1])
    return t_logits[..., :width], s_logits[..., :width]
