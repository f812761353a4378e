"""A teacher distribution kept as its top-k tokens plus one tail bucket, and the divergences against it.

A cached teacher (:mod:`vlsi.train.teacher_cache`) stores, per response token and target layer, the ``k`` most
likely token ids with their log-probabilities and the log of the mass left over, ``log(1 - sum p_topk)``.
That is a distribution over ``k + 1`` outcomes. The student's distribution is collapsed the same way on
the teacher's ids: its probability on each of the ``k`` ids, and the rest in one bucket. Every divergence
of :mod:`vlsi.losses.divergences` is then the same formula (:func:`vlsi.losses.divergences.log_prob_divergence`) over
those ``k + 1`` outcomes. It is exact when the ids cover the vocabulary (``k = V``: no tail bucket) and a
lower bound otherwise (collapsing outcomes never increases an f-divergence), whose gap shrinks as ``k``
grows and the tail's share of the divergence with it.

Only ``[chunk, V]`` student blocks ever exist, as in :mod:`vlsi.losses.chunked`, whose :func:`head_losses`
takes a :class:`SparseDist` in place of teacher features (it calls :meth:`SparseDist.value_and_grad`);
:func:`sparse_score_matrix` is :func:`vlsi.losses.chunked.score_matrix` against cached teachers.

The cached log-probabilities are already at the distillation temperature ``tau`` (the tail mass of a
tempered distribution cannot be recovered from an untempered one); ``tau`` here divides the student's
logits and scales the result by ``tau**2``, the conventions of :mod:`vlsi.losses.divergences`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlsi.losses.chunked import DEFAULT_CHUNK_TOKENS, _chunks, _compute_dtype, _log_softmax
from vlsi.losses.divergences import log_prob_divergence

__all__ = ["SparseDist", "sparse_from_logits", "sparse_score_matrix"]

# The smallest positive float32: a student tail that underflows is floored here rather than becoming
# log(0) = -inf, which would turn every divergence with a positive teacher tail into inf or NaN.
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SparseDist:
    """A teacher's distribution at N response tokens: ``ids [N, k]`` (long), ``logp [N, k]`` (float32, at
    the distillation temperature), ``tail [N]`` (float32, log of the mass outside ``ids``) or None when the
    ids cover the whole vocabulary of ``width`` tokens. ``width`` is the vocabulary the distribution is
    over: the student's logits are cut to it, as :func:`vlsi.losses.divergences.shared_vocab` cuts the live ones."""

    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor | None
    width: int

    def __post_init__(self):
        if self.ids.shape != self.logp.shape or self.ids.dim() != 2:
            raise ValueError(f"ids {tuple(self.ids.shape)} and logp {tuple(self.logp.shape)} must be [N, k]")
        if self.tail is not None and self.tail.shape != self.ids.shape[:1]:
            raise ValueError(f"tail {tuple(self.tail.shape)} must be [N] for ids {tuple(self.ids.shape)}")

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows) -> SparseDist:
        tail = None if self.tail is None else self.tail[rows]
        return SparseDist(self.ids[rows], self.logp[rows], tail, self.width)

    def to(self, device) -> SparseDist:
        tail = None if self.tail is None else self.tail.to(device)
        return SparseDist(self.ids.to(device), self.logp.to(device), tail, self.width)

    def detach(self) -> SparseDist:
        return self  # never carries a graph; head_losses detaches every teacher input

    @staticmethod
    def cat(parts: Sequence[SparseDist]) -> SparseDist:
        if not parts:
            raise ValueError("no sparse distributions to concatenate")
        tails = [p.tail for p in parts]
        if any(t is None for t in tails) and not all(t is None for t in tails):
            raise ValueError("cannot concatenate distributions with and without a tail bucket")
        tail = None if tails[0] is None else torch.cat(tails)
        return SparseDist(
            torch.cat([p.ids for p in parts]), torch.cat([p.logp for p in parts]), tail, parts[0].width
        )

    def bucket_log_probs(self) -> torch.Tensor:
        """``[N, k (+1)]`` teacher log-probabilities over the buckets, renormalised: a cache stores them in
        float16, whose rounding would otherwise leave the k + 1 masses summing to slightly more or less than 1."""
        a = self.logp.float() if self.tail is None else torch.cat([self.logp.float(), self.tail[:, None]], 1)
        return a - torch.logsumexp(a, dim=-1, keepdim=True)

    def student_buckets(self, top: torch.Tensor) -> torch.Tensor:
        """The student's log-probabilities at these ids, ``top [c, k]``, completed by its tail bucket.

        The tail is ``log(1 - sum p_ids)``: cheap per pair, where the exact complement sum of
        :meth:`value_and_grad` would read ``[c, V]`` again for each of the t_s x t_l candidate pairs; its
        float32 rounding (~1e-7 absolute) is far below what tells candidate layers apart."""
        if self.tail is None:
            return top
        rest = (1 - top.exp().sum(-1)).clamp_min(_TINY).log()
        return torch.cat([top, rest[:, None]], 1)

    def value_and_grad(
        self, op: str, s_logits: torch.Tensor, tau: float, beta: float, want_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed divergence ``op`` (x tau**2) between these buckets and the student's chunk logits
        ``[c, V]`` collapsed onto them, and its gradient with respect to those logits.

        The divergence's gradient G with respect to the student's k + 1 bucket log-probabilities comes from
        autograd on ``[c, k + 1]`` tensors; it goes back to the ``[c, V]`` logits in closed form. With
        ``b_j = z_{id_j} - lse(z)`` and ``b_tail = log P_tail``, ``P_tail = sum_{v not in ids} p_v``:
        ``dL/dz_v = p_v (G_tail / P_tail - sum G)`` off the ids and ``G_j + p_v (- sum G)`` on them.
        ``s_logits`` is consumed: float32 logits are overwritten and become the gradient.
        """
        if s_logits.shape[-1] != self.width:
            raise ValueError(
                f"student logits over {s_logits.shape[-1]} tokens against a cached teacher over {self.width}"
            )
        e, total, (top,) = _exp_shifted_(s_logits, tau, [self.ids])
        del s_logits
        p = e.div_(total)
        # p off the ids from here on: the tail's mass summed directly rather than as 1 - sum(top), exact
        # also when it is tiny; the ids' own share of the gradient is added back below from top.
        p.scatter_(1, self.ids, 0.0)
        if self.tail is None:
            b, p_tail = top, None
        else:
            p_tail = p.sum(-1).clamp_min(_TINY)
            b = torch.cat([top, p_tail.log()[:, None]], 1)
        with torch.enable_grad():
            leaf = b.detach().requires_grad_(want_grad)
            value = log_prob_divergence(op, beta)(self.bucket_log_probs(), leaf) * tau**2
            grad_b = torch.autograd.grad(value, leaf)[0] if want_grad else None
        if grad_b is None:
            return value.detach(), None
        total_g = grad_b.sum(-1)
        coef = -total_g if p_tail is None else grad_b[:, -1] / p_tail - total_g
        on_ids = grad_b[:, : self.k] - top.exp() * total_g[:, None]
        grad = p.mul_(coef[:, None]).scatter_add_(1, self.ids, on_ids)
        # d/dlogits = d/dz / tau, and value already carries tau**2.
        return value.detach(), grad.div_(tau) if tau != 1 else grad


def _exp_shifted_(
    logits: torch.Tensor, tau: float, ids: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``exp(s - max s)`` with ``s = logits / tau`` (``[c, V]``), its row sums ``[c, 1]``, and the
    log-probabilities ``log softmax(s)`` at each of ``ids`` (``[c, k]`` each).

    In place, in the logits' own storage (float32 logits are consumed; lower precisions are copied to
    float32 first, as :func:`vlsi.losses.chunked._log_softmax` does): the top-k buckets need the
    log-probabilities only at the ids, so no ``[c, V]`` log-softmax block is allocated, and every pass
    over the block reads and writes the one buffer."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if tau != 1:
        x.div_(tau)
    x.sub_(x.amax(-1, keepdim=True))
    shifted = [x.gather(1, i) for i in ids]
    total = x.exp_().sum(-1, keepdim=True)
    log_total = total.log()
    return x, total, [s - log_total for s in shifted]


@torch.no_grad()
def sparse_from_logits(
    logits: torch.Tensor, k: int, tau: float = 1.0, chunk: int = DEFAULT_CHUNK_TOKENS
) -> SparseDist:
    """The top-k buckets of ``softmax(logits / tau)``, ``logits [N, V]``, computed ``chunk`` rows at a
    time. The tail is a log-sum-exp over the complement (not ``log(1 - sum)``), exact however small."""
    n, width = logits.shape
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    k = min(k, width)
    ids, logp, tails = [], [], []
    for rows in _chunks(n, chunk):
        log_p = _log_softmax(logits[rows], tau).float()
        top = log_p.topk(k, dim=-1)
        ids.append(top.indices)
        logp.append(top.values)
        if k < width:
            tails.append(torch.logsumexp(log_p.scatter_(1, top.indices, float("-inf")), dim=-1))
    if n == 0:
        empty = torch.zeros(0, k, device=logits.device)
        return SparseDist(empty.long(), empty, empty[:, 0] if k < width else None, width)
    return SparseDist(torch.cat(ids), torch.cat(logp), torch.cat(tails) if tails else None, width)


@torch.no_grad()
def sparse_score_matrix(
    student: Sequence[torch.Tensor],
    student_weight: torch.Tensor,
    teacher: Sequence[SparseDist],
    name: str,
    *,
    beta: float = 0.5,
    tau: float = 1.0,
    chunk: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """``[t_s, t_l]`` summed divergence ``name`` between every student layer (features ``[N, D]`` through
    ``student_weight``) and every cached teacher layer, no graph: :func:`vlsi.losses.chunked.score_matrix` with the
    teacher's distributions read from the cache. Per chunk each student layer's log-probabilities are
    computed once; a pair then costs a gather of ``[c, k]``."""
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    fn = log_prob_divergence(name, beta)
    width = teacher[0].width if teacher else student_weight.shape[0]
    w = student_weight[:width].to(_compute_dtype(student_weight))
    n = student[0].shape[0] if student else 0
    out = torch.zeros(len(student), len(teacher), dtype=torch.float32, device=student_weight.device)
    for rows in _chunks(n, chunk):
        parts = [dist[rows] for dist in teacher]
        targets = [part.bucket_log_probs() for part in parts]
        ids = [part.ids for part in parts]
        for i, f in enumerate(student):
            # One [c, V] block at a time: only the student's log-probabilities at the teachers' ids are kept.
            _, _, tops = _exp_shifted_(F.linear(f[rows].to(w.dtype), w), tau, ids)
            for j, (part, target, top) in enumerate(zip(parts, targets, tops, strict=True)):
                out[i, j] += fn(target, part.student_buckets(top)).float()
    return out * tau**2
