"""Verbalized losses that never hold a [layers, tokens, vocabulary] logit tensor.

A verbalized layer speaks through the language head, ``logits = features @ W.T`` with ``W`` of shape
``[V, D]`` (Qwen2-VL: V = 151,936). The features are small (``[N, D]`` at the N response tokens), the logits
are not: the straightforward losses (:func:`vlsi.losses.divergences.divergence` on whole ``[N, V]`` logits, kept
as the reference and used by the tests) hold every student layer's logits with their graphs, every
teacher layer's logits and the divergence temporaries at once (docs/method.md, "Where the compute and memory
go"). Here only ``[chunk, V]`` blocks exist, one chunk of response tokens at a time:

- :func:`score_matrix`, the matching scores, has no graph. Per chunk each student layer's log-probabilities
  are computed once and each teacher layer's logits once, so it holds about ``(t_s + 3) x chunk x V``
  floats (:func:`score_chunk_tokens` sizes its chunk to match the loss pass); every log-softmax is done once
  per layer rather than once per pair, and a KL pair costs one dot product.
- :func:`head_losses`, the trained terms (matched pairs, last layer, cross-entropy to the labels), is one
  autograd function. Its forward computes each chunk's logits, the loss and, straight away, the
  gradient with respect to the features and the head weight (``g @ W`` and ``g.T @ features``); the
  chunk's logits are then dropped. Backward only scales the stored gradients. This is the fused-linear-loss
  scheme of Liger kernel: the logits are never stored and, unlike recomputing them in backward, not
  computed a third time. What stays alive between forward and backward is ``[N, D]`` per term and one
  ``[V, D]`` buffer for the head weight's gradient when the head is trained (full fine-tuning; it becomes
  that gradient, which the reference creates too). The one recomputation: the matched student layers'
  logits, scored without a graph, are computed again here, t_s student-head matmuls per micro-batch.

Precision follows the reference: the head's matmul runs in the ambient autocast dtype, every
log-softmax in at least float32. The teacher side never carries a graph. Heads with a bias are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from vlsi.losses.divergences import DIVERGENCES, log_prob_divergence

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "GPU_CHUNK_TOKENS",
    "LABELS",
    "LOSS_IMPLS",
    "Term",
    "chunked_unsupported",
    "default_chunk_tokens",
    "head_losses",
    "head_weight",
    "score_chunk_tokens",
    "score_matrix",
]

LOSS_IMPLS = ("chunked", "reference")
# Response tokens per chunk, by device (default_chunk_tokens). About four [chunk, V] float32 blocks are alive at
# once, 78 MB each per 128 tokens at Qwen2-VL's vocabulary. On a CPU: 128, the value every recorded CPU result
# was computed with. On a GPU each chunk reads a whole [V, D] head again for every layer it scores or trains,
# for 2 x chunk FLOPs per head element read, i.e. `chunk` FLOPs per byte of a bf16 head. An H100 needs about
# 300 (990 TFLOP/s over 3.35 TB/s), an A100 about 150, or its matmuls wait on memory: at 128 they would run at
# under half of peak, reading the 72B teacher's 2.5 GB head hundreds of times per micro-batch. At 1024 the loss
# pass (and scoring, whose chunk is 1024 x 4 / (t_s + 3) = 409 tokens for 7 student layers) is past that
# point on both, for about 2.3 GiB of chunk blocks per GPU instead of 0.3 (`vlsi plan` counts them).
DEFAULT_CHUNK_TOKENS = 128
GPU_CHUNK_TOKENS = 1024
# The op of a term trained with cross-entropy to the label tokens rather than against a teacher.
LABELS = "labels"


def chunked_unsupported(head: nn.Module) -> str | None:
    """Why the chunked losses cannot use this language head, or None when they can."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return f"the language head {type(head).__name__} has no [V, D] weight matrix"
    if getattr(head, "bias", None) is not None:
        return "the language head has a bias (Qwen2-VL's has none)"
    if hasattr(weight, "ds_id"):
        # ZeRO-3 gathers a parameter only inside its own module's forward; the head is used outside it.
        return "DeepSpeed ZeRO-3 partitions the language head's weight"
    return None


def head_weight(head: nn.Module) -> torch.Tensor:
    """The ``[V, D]`` weight of a bias-free linear language head (tied to the embeddings or not)."""
    if (reason := chunked_unsupported(head)) is not None:
        raise ValueError(
            f"the chunked verbalized losses cannot use this head: {reason}; use --loss-impl reference"
        )
    return head.weight


def default_chunk_tokens(device: torch.device | str | None = None) -> int:
    """The chunk ``--loss-chunk-tokens 0`` (the default) stands for on ``device``: :data:`DEFAULT_CHUNK_TOKENS` on
    a CPU, :data:`GPU_CHUNK_TOKENS` on an accelerator (why: the comment at their definition). ``device`` None:
    the device a run started now would train on, as accelerate picks it (the accelerator torch finds, else the
    CPU)."""
    if device is None:
        found = getattr(torch, "accelerator", None)
        device = found.current_accelerator() if found is not None and found.is_available() else "cpu"
    return DEFAULT_CHUNK_TOKENS if torch.device(device).type == "cpu" else GPU_CHUNK_TOKENS


def chunk_tokens(impl: str, chunk: int) -> int | None:
    """``--loss-impl`` and ``--loss-chunk-tokens`` checked: the chunk size (0: by device), or None for the
    reference losses."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"--loss-impl {impl!r} is not one of {', '.join(LOSS_IMPLS)}")
    if chunk < 0:
        raise ValueError(f"--loss-chunk-tokens must be >= 0 (0: by device), got {chunk}")
    return chunk if impl == "chunked" else None


def _log_softmax(logits: torch.Tensor, tau: float) -> torch.Tensor:
    # At least float32, as vlsi.losses.divergences: bf16 logits of a 151k vocabulary lose too much.
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(x / tau if tau != 1 else x, dim=-1)  # no [c, V] temporary at tau = 1


def score_chunk_tokens(chunk: int, student_layers: int) -> int:
    """Token chunk of :func:`score_matrix` that holds about as much as ``chunk`` in :func:`head_losses`.

    The loss pass keeps about 4 blocks of ``[chunk, V]`` floats alive, scoring ``t_s + 3`` (every student
    layer's log-probabilities at once), so scoring takes proportionally fewer tokens at a time.
    """
    return max(1, chunk * 4 // (student_layers + 3))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on (as ``lm_head(x)`` would), else the
    weight's. The weights are cast once per call rather than once per chunk."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _chunks(n: int, chunk: int) -> list[slice]:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    return [slice(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over a whole [c, V] block in one pass, without the [c, V] product."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


@torch.no_grad()
def score_matrix(
    student: Sequence[torch.Tensor],
    student_weight: torch.Tensor,
    teacher: Sequence[torch.Tensor],
    teacher_weight: torch.Tensor,
    name: str,
    *,
    beta: float = 0.5,
    tau: float = 1.0,
    chunk: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """``[t_s, t_l]`` summed divergence ``name`` between every student and every teacher layer, no graph.

    student: t_s features ``[N, D_s]``; teacher: t_l features ``[N, D_t]`` at the same N response tokens.
    Entry (i, j) equals ``divergence(name, beta)(*shared_vocab(teacher logits j, student logits i), tau)``.

    The KLs split into a per-layer and a per-pair part, ``KL(p || q) = sum p log p - sum p log q``, so
    each pair costs one dot product over the chunk instead of several passes over ``[c, V]``; only
    ``jsd`` (its mixture is per pair) does the elementwise work per pair.
    """
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    fn = log_prob_divergence(name, beta)
    width = min(student_weight.shape[0], teacher_weight.shape[0])  # shared_vocab
    dtype = _compute_dtype(student_weight)
    w_s, w_t = student_weight[:width].to(dtype), teacher_weight[:width].to(dtype)
    n = student[0].shape[0] if student else 0
    out = torch.zeros(len(student), len(teacher), dtype=torch.float32, device=student_weight.device)
    for rows in _chunks(n, chunk):
        log_ps = [_log_softmax(F.linear(f[rows].to(dtype), w_s), tau) for f in student]  # t_s x [c, V]
        if name == "reverse_kl":
            # Keep p_s and sum p_s log p_s; log p_s is not needed again.
            p_s = [x.exp() for x in log_ps]
            negent_s = [_dot(p, x) for p, x in zip(p_s, log_ps, strict=True)]
            del log_ps
        for j, t in enumerate(teacher):
            log_pt = _log_softmax(F.linear(t[rows].to(dtype), w_t), tau)  # [c, V]
            if name == "forward_kl":
                p_t = log_pt.exp()
                negent_t = _dot(p_t, log_pt)
                for i, x in enumerate(log_ps):
                    out[i, j] += (negent_t - _dot(p_t, x)).float()
                del p_t
            elif name == "reverse_kl":
                for i, p in enumerate(p_s):
                    out[i, j] += (negent_s[i] - _dot(p, log_pt)).float()
            else:
                for i, x in enumerate(log_ps):
                    out[i, j] += fn(log_pt, x).float()
            del log_pt
    return out * tau**2


@dataclass
class Term:
    """One trained loss term: ``weight x op(student features through the student head)``.

    op is a divergence name (against ``teacher`` features through the teacher head) or :data:`LABELS`
    (cross-entropy to ``target``, over the student's whole vocabulary).
    """

    features: torch.Tensor  # [N, D_s], carries the graph
    op: str
    weight: float = 1.0
    teacher: torch.Tensor | None = (
        None  # [N, D_t], no graph; or a cached teacher (vlsi.losses.sparse.SparseDist)
    )
    target: torch.Tensor | None = None  # [N] token ids


def _check(term: Term) -> None:
    if term.op == LABELS:
        if term.target is None:
            raise ValueError("a cross-entropy term needs its target tokens")
    elif term.op not in DIVERGENCES:
        raise ValueError(f"unknown loss op {term.op!r}; valid: {LABELS}, {', '.join(DIVERGENCES)}")
    elif term.teacher is None:
        raise ValueError(f"a {term.op} term needs teacher features")


@dataclass
class _Plan:
    """What the autograd function needs besides its differentiable inputs."""

    terms: list[Term]
    teacher_weight: torch.Tensor | None
    tau: float
    beta: float
    chunk: int
    grad_features: list[bool]
    grad_weight: bool


def _value_and_grad(
    term: Term, plan: _Plan, s_logits: torch.Tensor, log_pt: torch.Tensor | None, rows: slice, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The term's summed value on one chunk and its gradient w.r.t. the chunk's student logits ``[c, V]``.

    The KLs, soft CE and CE to the labels use their closed-form gradients, a few passes over ``[c, V]``
    where autograd through log-softmax and kl_div takes about twice as many; jsd and l2 go through
    autograd. With s = z / tau, p = softmax(s), q the teacher's, and the tau**2 factor of the reference:
    forward KL and soft CE: tau (p - q); reverse KL: tau p (d - sum p d), d = log p - log q.
    """
    tau, op = plan.tau, term.op
    if hasattr(log_pt, "value_and_grad"):  # a cached teacher's top-k buckets (vlsi.losses.sparse.SparseDist)
        return log_pt.value_and_grad(op, s_logits, tau, plan.beta, want_grad)
    if op == LABELS:
        log_ps = F.log_softmax(s_logits.float(), dim=-1)
        del s_logits  # the caller keeps no reference: one [c, V] block fewer from here on
        target = term.target[rows]
        value = -log_ps.gather(1, target[:, None]).sum()
        if not want_grad:
            return value, None
        grad = log_ps.exp_()
        grad[torch.arange(len(target), device=grad.device), target] -= 1
        return value, grad
    if op in ("forward_kl", "ce", "reverse_kl"):
        log_ps = _log_softmax(s_logits, tau)
        del s_logits
        p_s = log_ps.exp()
        if op == "reverse_kl":
            d = log_ps.sub_(log_pt)  # log p_s is not needed again
            row = (p_s * d).sum(-1, keepdim=True)  # [c, 1]: each row's KL
            value = row.sum() * tau**2
            grad = d.sub_(row).mul_(p_s).mul_(tau) if want_grad else None
            return value, grad
        p_t = log_pt.exp()
        cross = _dot(p_t, log_ps)
        value = (-cross if op == "ce" else _dot(p_t, log_pt) - cross) * tau**2
        return value, p_s.sub_(p_t).mul_(tau) if want_grad else None
    # jsd, l2: autograd through the student's log-softmax, on the reference formulas.
    with torch.enable_grad():
        leaf = s_logits.detach().requires_grad_(want_grad)
        value = log_prob_divergence(op, plan.beta)(log_pt, _log_softmax(leaf, tau)) * tau**2
        grad = torch.autograd.grad(value, leaf)[0] if want_grad else None
    return value.detach(), grad


def _forward_with_grads(plan: _Plan, weight: torch.Tensor, features: Sequence[torch.Tensor]):
    terms = plan.terms
    n = features[0].shape[0]
    dtype = _compute_dtype(weight)
    w_full = weight.detach().to(dtype)
    w_teacher = None if plan.teacher_weight is None else plan.teacher_weight.to(dtype)
    width = w_full.shape[0] if w_teacher is None else min(w_full.shape[0], w_teacher.shape[0])
    values = torch.zeros(len(terms), dtype=torch.float32, device=weight.device)
    grad_features = [
        torch.zeros_like(f) if need else None for f, need in zip(features, plan.grad_features, strict=True)
    ]
    # float32 even for a bf16 head: summing every chunk's contribution in bf16 would lose the small ones.
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if plan.grad_weight else None
    # Terms that compare with the same teacher features (several student layers matched to one teacher
    # layer, bottom-k) share that teacher chunk's log-probabilities.
    groups: dict[int, list[int]] = {}
    for k, term in enumerate(terms):
        groups.setdefault(id(term.teacher) if term.op != LABELS else -1 - k, []).append(k)
    for rows in _chunks(n, plan.chunk):
        for ks in groups.values():
            log_pt = None  # shared by the group: the teacher's log-probabilities at this chunk
            teacher, group_width = terms[ks[0]].teacher, width
            if hasattr(teacher, "value_and_grad"):  # cached top-k buckets over their own vocabulary
                log_pt, group_width = teacher[rows], teacher.width
            elif terms[ks[0]].op != LABELS:
                t_logits = F.linear(teacher[rows].to(dtype), w_teacher[:width])
                log_pt = _log_softmax(t_logits, plan.tau)
                del t_logits
            for k in ks:
                term, f = terms[k], features[k][rows].detach().to(dtype)
                # shared_vocab trims the student too
                w = w_full if term.op == LABELS else w_full[:group_width]
                want = plan.grad_features[k] or plan.grad_weight
                # The logits [c, V] go straight in, so that they are freed as soon as they are read.
                value, g = _value_and_grad(term, plan, F.linear(f, w), log_pt, rows, want)
                values[k] += value.float()
                if g is None:
                    continue
                # d loss / d logits -> the head's two inputs; in the head's compute dtype, as autograd would.
                if term.weight != 1:
                    g.mul_(term.weight)
                g = g.to(dtype)
                if plan.grad_features[k]:
                    grad_features[k][rows] = g @ w
                if plan.grad_weight:
                    if grad_weight.dtype == g.dtype:
                        grad_weight[: w.shape[0]].addmm_(g.t(), f)  # in place: no [V, D] temporary
                    else:  # a bf16 head: the matmul in bf16, the sum in float32
                        grad_weight[: w.shape[0]] += g.t() @ f
                del g
            del log_pt
    return values, grad_features, grad_weight


class _HeadLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, weight: torch.Tensor, *features: torch.Tensor):
        values, grad_features, grad_weight = _forward_with_grads(plan, weight, features)
        weights = torch.tensor([t.weight for t in plan.terms], dtype=values.dtype, device=values.device)
        total = (values * weights).sum()
        ctx.grads = (grad_weight, grad_features)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor, _grad_values):
        grad_weight, grad_features = ctx.grads
        ctx.grads = None  # the buffers are scaled in place: a second backward must not reuse them
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        grads = [g.mul_(grad_total.to(g.dtype)) if g is not None else None for g in grad_features]
        return None, grad_weight, *grads


def head_losses(
    terms: Sequence[Term],
    weight: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    *,
    tau: float = 1.0,
    beta: float = 0.5,
    chunk: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_k weight_k x value_k, [value_k])``: the trained verbalized terms, chunked over tokens.

    weight: the student head ``[V_s, D_s]`` (trained or frozen); teacher_weight: the teacher head
    ``[V_t, D_t]``, needed by divergence terms. Divergence terms compare the two heads' shared vocabulary
    (:func:`vlsi.losses.divergences.shared_vocab`). The total carries the gradient to every term's features and,
    when it requires grad, to ``weight``; the per-term values are detached sums for logging.
    All terms go through one call so that one ``[V, D]`` gradient buffer serves them all.
    """
    terms = list(terms)
    if not terms:
        raise ValueError("head_losses needs at least one term")
    for term in terms:
        _check(term)
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    if teacher_weight is None and any(isinstance(t.teacher, torch.Tensor) for t in terms if t.op != LABELS):
        raise ValueError("divergence terms need the teacher head's weight")
    grad_on = torch.is_grad_enabled()
    # The teacher side never carries a graph. One detached tensor per distinct teacher input, so terms that
    # share a teacher layer stay grouped (by identity) and its chunk logits are computed once.
    detached: dict[int, torch.Tensor] = {}
    for t in terms:
        if t.teacher is not None:
            detached.setdefault(id(t.teacher), t.teacher.detach())
    plan = _Plan(
        terms=[
            Term(t.features, t.op, t.weight, None if t.teacher is None else detached[id(t.teacher)], t.target)
            for t in terms
        ],
        teacher_weight=None if teacher_weight is None else teacher_weight.detach(),
        tau=tau,
        beta=beta,
        chunk=chunk,
        grad_features=[grad_on and t.features.requires_grad for t in terms],
        grad_weight=grad_on and weight.requires_grad,
    )
    return _HeadLosses.apply(plan, weight, *[t.features for t in terms])
