import math

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from vlsi.losses.divergences import (
    DIVERGENCES,
    ce_to_teacher,
    divergence,
    forward_kl,
    jsd,
    mse,
    reverse_kl,
    shared_vocab,
)
from vlsi.model.loading import check_same_tokenizer

# Hand-made distributions: logits = log-probabilities, so softmax gives them back exactly.
P = [0.5, 0.5]
Q = [0.9, 0.1]


def logits(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def random_logits(seed, n=6, v=11, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def kl_by_hand(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_for_identical_inputs(name):
    x = random_logits(0)
    if name == "ce":
        # Soft CE of a distribution with itself is its entropy, not zero.
        p = x.softmax(-1)
        assert ce_to_teacher(x, x).item() == pytest.approx(-(p * p.log()).sum().item())
    else:
        assert divergence(name)(x, x).item() == pytest.approx(0.0, abs=1e-10)


def test_known_values_on_two_token_distributions():
    t, s = logits(P), logits(Q)
    assert forward_kl(t, s).item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert forward_kl(t, s).item() == pytest.approx(math.log(5 / 3))
    assert reverse_kl(t, s).item() == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
    m = [0.7, 0.3]  # (P + Q) / 2
    assert jsd(t, s, 0.5).item() == pytest.approx(0.5 * kl_by_hand(P, m) + 0.5 * kl_by_hand(Q, m))
    assert ce_to_teacher(t, s).item() == pytest.approx(-(0.5 * math.log(0.9) + 0.5 * math.log(0.1)))
    assert mse(t, s).item() == pytest.approx(0.4**2 + 0.4**2)


def test_generalised_jsd_uses_the_teacher_weighted_mixture():
    t, s, beta = logits(P), logits(Q), 0.2
    m = [beta * a + (1 - beta) * b for a, b in zip(P, Q, strict=True)]  # [0.82, 0.18]
    expected = beta * kl_by_hand(P, m) + (1 - beta) * kl_by_hand(Q, m)
    assert jsd(t, s, beta).item() == pytest.approx(expected)


def test_results_are_sums_over_rows():
    t, s = logits(P, Q), logits(Q, Q)
    assert forward_kl(t, s).item() == pytest.approx(kl_by_hand(P, Q))
    t3, s3 = random_logits(1).view(2, 3, 11), random_logits(2).view(2, 3, 11)
    rows = sum(forward_kl(t3[i, j : j + 1], s3[i, j : j + 1]) for i in range(2) for j in range(3))
    assert torch.allclose(forward_kl(t3, s3), rows)


@pytest.mark.parametrize("seed", range(5))
def test_non_negative_on_random_inputs(seed):
    t, s = random_logits(seed), random_logits(seed + 100)
    for fn in (forward_kl, reverse_kl, mse, ce_to_teacher):
        assert fn(t, s).item() >= 0
    for beta in (0.1, 0.5, 0.9):
        assert jsd(t, s, beta).item() >= 0


def test_reverse_kl_is_forward_kl_with_roles_swapped():
    t, s = random_logits(3), random_logits(4)
    assert torch.allclose(reverse_kl(t, s), forward_kl(s, t))
    assert not torch.allclose(reverse_kl(t, s), forward_kl(t, s))


def test_jsd_at_half_is_the_symmetric_jensen_shannon_divergence():
    t, s = random_logits(5), random_logits(6)
    p, q = t.softmax(-1), s.softmax(-1)
    m = (p + q) / 2

    def entropy(x):
        return -(x * x.log()).sum()

    # JS = H(m) - (H(p) + H(q)) / 2: an independent formula, and symmetric in its arguments.
    assert jsd(t, s, 0.5).item() == pytest.approx((entropy(m) - (entropy(p) + entropy(q)) / 2).item())
    assert jsd(t, s, 0.5).item() == pytest.approx(jsd(s, t, 0.5).item())


def test_jsd_endpoints_are_zero_and_rescaled_limits_are_the_kls():
    # Mild logits: the limit is approached once beta * p_t / p_s is small for every token.
    t, s = random_logits(7, scale=1.0), random_logits(8, scale=1.0)
    assert jsd(t, s, 0.0).item() == pytest.approx(0.0, abs=1e-12)
    assert jsd(t, s, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    # TRL's beta=0 / beta=1 (forward / reverse KL) are the limits of JSD / beta and JSD / (1 - beta).
    small = 1e-5
    assert (jsd(t, s, small) / small).item() == pytest.approx(forward_kl(t, s).item(), rel=1e-3)
    assert (jsd(t, s, 1 - small) / small).item() == pytest.approx(reverse_kl(t, s).item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        jsd(t, s, 1.5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_temperature_divides_logits_and_multiplies_by_tau_squared(name):
    t, s, tau = random_logits(9), random_logits(10), 2.5
    fn = divergence(name, beta=0.3)
    plain = fn(t / tau, s / tau)
    assert fn(t, s, tau).item() == pytest.approx(tau**2 * plain.item())
    assert fn(t, s, tau, tau_squared=False).item() == pytest.approx(plain.item())


def test_tau_squared_keeps_the_forward_kl_gradient_at_tau_times_the_probability_gap():
    t, s, tau = random_logits(11), random_logits(12).requires_grad_(), 3.0
    forward_kl(t, s, tau).backward()
    # d/ds [tau^2 KL(softmax(t/tau) || softmax(s/tau))] = tau (p_s - p_t): O(1) in tau, not O(1/tau).
    expected = tau * ((s.detach() / tau).softmax(-1) - (t / tau).softmax(-1))
    assert torch.allclose(s.grad, expected)


def test_low_precision_logits_are_computed_in_float32():
    t, s = random_logits(13).bfloat16(), random_logits(14).bfloat16()
    out = forward_kl(t, s)
    assert out.dtype == torch.float32
    # Against KL(p_t || p_s) summed by hand in float64 from the same bf16 values, not forward_kl again.
    log_pt, log_ps = t.double().log_softmax(-1), s.double().log_softmax(-1)
    assert out.item() == pytest.approx((log_pt.exp() * (log_pt - log_ps)).sum().item(), rel=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradient_reaches_the_student_only_when_the_teacher_is_detached(name):
    t = random_logits(15).requires_grad_()
    s = random_logits(16).requires_grad_()
    divergence(name)(t.detach(), s).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_registry_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, ce, l2"):
        divergence("kld")
    assert divergence("jsd", beta=0.0)(random_logits(0), random_logits(1)).item() == pytest.approx(0.0)


def test_mismatched_widths_are_refused_until_restricted_to_the_shared_vocabulary():
    teacher, student = torch.randn(4, 10), torch.randn(4, 7)
    with pytest.raises(ValueError, match="shared_vocab"):
        forward_kl(teacher, student)
    t, s = shared_vocab(teacher, student)
    assert t.shape == s.shape == (4, 7)
    assert torch.equal(t, teacher[:, :7]) and torch.equal(s, student)
    s2, t2 = shared_vocab(student, teacher)  # whichever side is narrower
    assert s2.shape == t2.shape == (4, 7)
    assert forward_kl(t, s).item() >= 0


def make_tokenizer(words, eos="<|im_end|>", added=()):
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<|im_end|>", *words])}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")),
        eos_token=eos,
        pad_token="<|endoftext|>",
    )
    if added:
        tok.add_tokens(list(added))
    return tok


WORDS = ["red", "green", "blue", "circle", "square"]


def test_check_same_tokenizer_accepts_identical_and_padding_only_differences():
    small = make_tokenizer(WORDS)
    assert check_same_tokenizer(small, make_tokenizer(WORDS)) == len(WORDS) + 2
    padded = make_tokenizer(WORDS, added=["<pad_0>", "<pad_1>", "<pad_2>"])
    assert len(padded) == len(small) + 3
    assert check_same_tokenizer(padded, small) == len(small)
    assert check_same_tokenizer(small, padded) == len(small)


def test_check_same_tokenizer_refuses_a_genuine_mismatch():
    swapped = ["red", "blue", "green", "circle", "square"]
    with pytest.raises(
        ValueError, match=r"2 of the 7 shared ids spell different tokens: 3: 'green' vs 'blue'"
    ):
        check_same_tokenizer(make_tokenizer(WORDS), make_tokenizer(swapped))
    with pytest.raises(ValueError, match="eos_token differs"):
        check_same_tokenizer(make_tokenizer(WORDS), make_tokenizer(WORDS, eos="<|endoftext|>"))
