"""The cached teacher's top-k + tail divergences (vlsi.losses.sparse) against the dense ones they approximate."""

import pytest
import torch
import torch.nn.functional as F
from written_out import divergence_by_hand

from vlsi.losses.chunked import Term, head_losses, score_matrix
from vlsi.losses.divergences import DIVERGENCES
from vlsi.losses.sparse import SparseDist, sparse_from_logits, sparse_score_matrix

N, D_S, D_T, V_S, V_T = 11, 8, 12, 37, 41
TOL = dict(rtol=1e-5, atol=1e-5)
KL_LIKE = ("forward_kl", "reverse_kl", "jsd")


def _setup(seed=0, v_s=V_S, v_t=V_T, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(N, D_S, generator=g) for _ in range(3)]
    teacher = [torch.randn(N, D_T, generator=g) for _ in range(4)]
    w_s = torch.randn(v_s, D_S, generator=g) * scale
    w_t = torch.randn(v_t, D_T, generator=g) * scale
    return student, teacher, w_s, w_t


def _cached(teacher, w_t, width, k, tau):
    """The teacher layers as the cache stores them: top-k log-probabilities over the shared vocabulary."""
    return [sparse_from_logits((t @ w_t.T)[:, :width], k, tau, chunk=4) for t in teacher]


@pytest.mark.parametrize("op", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_k_equal_to_the_vocabulary_gives_the_dense_values_and_gradients(op, tau):
    student, teacher, w_s, w_t = _setup()
    width = min(V_S, V_T)
    cached = _cached(teacher, w_t, width, width, tau)
    assert all(c.tail is None and c.k == width for c in cached)
    feats = [s.clone().requires_grad_() for s in student]
    w_s.requires_grad_()
    pairs = [(0, 1, 0.5), (0, 2, 0.5), (1, 2, 1.0), (2, 3, 0.25)]
    dense = [Term(feats[i], op, w, teacher[j]) for i, j, w in pairs]
    sparse = [Term(feats[i], op, w, cached[j]) for i, j, w in pairs]
    total, values = head_losses(dense, w_s, w_t, tau=tau, beta=0.3, chunk=5)
    s_total, s_values = head_losses(sparse, w_s, None, tau=tau, beta=0.3, chunk=5)
    torch.testing.assert_close(s_values, values, **TOL)
    inputs = [*feats, w_s]
    for got, want in zip(
        torch.autograd.grad(s_total, inputs), torch.autograd.grad(total, inputs), strict=True
    ):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", KL_LIKE)
def test_scores_at_k_equal_to_the_vocabulary_are_the_dense_scores(name):
    student, teacher, w_s, w_t = _setup(1)
    width = min(V_S, V_T)
    dense = score_matrix(student, w_s, teacher, w_t, name, beta=0.3, tau=1.5, chunk=3)
    sparse = sparse_score_matrix(
        student, w_s, _cached(teacher, w_t, width, width, 1.5), name, beta=0.3, tau=1.5, chunk=4
    )
    torch.testing.assert_close(sparse, dense, **TOL)


def _bucketed_reference(op, dist, s_logits, tau, beta):
    """The k + 1-outcome divergence written out with autograd over the whole [N, V] logits: both sides'
    buckets and the divergence formula built here, none of them taken from vlsi.losses.sparse or vlsi.losses.divergences."""
    log_ps = F.log_softmax(s_logits / tau, -1)
    mask = torch.zeros_like(log_ps, dtype=torch.bool).scatter_(1, dist.ids, True)
    rest = torch.logsumexp(log_ps.masked_fill(mask, float("-inf")), -1)
    b = torch.cat([log_ps.gather(1, dist.ids), rest[:, None]], 1)
    a = torch.cat([dist.logp, dist.tail[:, None]], 1)
    return divergence_by_hand(op, a - a.logsumexp(-1, keepdim=True), b, beta) * tau**2


@pytest.mark.parametrize("op", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 5, 30])
def test_the_closed_form_gradient_below_the_vocabulary_size(op, k):
    # With a tail bucket the gradient goes back to the [c, V] logits through the closed form of
    # SparseDist.value_and_grad; autograd through the written-out collapse must agree.
    student, teacher, w_s, w_t = _setup(2)
    width = min(V_S, V_T)
    (dist,) = _cached(teacher[:1], w_t, width, k, 1.3)
    logits = (student[0] @ w_s[:width].T).requires_grad_()
    want = _bucketed_reference(op, dist, logits, 1.3, 0.3)
    (want_grad,) = torch.autograd.grad(want, logits)
    value, grad = dist.value_and_grad(op, logits.detach().clone(), 1.3, 0.3, True)  # it consumes them
    torch.testing.assert_close(value, want.detach().float(), **TOL)
    torch.testing.assert_close(grad, want_grad, **TOL)


@pytest.mark.parametrize("name", KL_LIKE)
def test_the_error_falls_as_k_grows(name):
    # Peaked teachers, as trained ones are: most of the mass on a few of 600 tokens.
    student, teacher, w_s, w_t = _setup(3, v_s=600, v_t=600, scale=1.5)
    dense = score_matrix(student, w_s, teacher, w_t, name, beta=0.3)
    errors = []
    for k in (1, 4, 16, 64, 256, 600):
        cached = _cached(teacher, w_t, 600, k, 1.0)
        sparse = sparse_score_matrix(student, w_s, cached, name, beta=0.3)
        # Collapsing outcomes never increases an f-divergence: the sparse score is a lower bound.
        assert (sparse <= dense + 1e-4).all(), (k, sparse, dense)
        errors.append(float((dense - sparse).abs().max() / dense.abs().max()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-5 and errors[0] > 0.05, errors


def test_a_student_narrower_than_the_cache_is_refused():
    student, teacher, w_s, w_t = _setup()
    (dist,) = _cached(teacher[:1], w_t, V_T, 8, 1.0)
    with pytest.raises(ValueError, match="37 tokens against a cached teacher over 41"):
        dist.value_and_grad("forward_kl", student[0] @ w_s.T, 1.0, 0.5, True)


def test_bad_shapes_and_concatenation():
    ids = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="must be \\[N, k\\]"):
        SparseDist(ids, torch.zeros(3, 3), None, 10)
    with pytest.raises(ValueError, match="tail"):
        SparseDist(ids, torch.zeros(3, 2), torch.zeros(2), 10)
    a, b = (
        SparseDist(ids, torch.zeros(3, 2), torch.zeros(3), 10),
        SparseDist(ids, torch.zeros(3, 2), None, 10),
    )
    assert len(SparseDist.cat([a, a])) == 6
    with pytest.raises(ValueError, match="with and without"):
        SparseDist.cat([a, b])
