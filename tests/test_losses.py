import math

import pytest
import torch
import torch.nn.functional as F

from vlsi.losses.tokens import IGNORE_INDEX, count_response_tokens, response_cross_entropy, shift_labels
from vlsi.train.optim import cosine_with_warmup


def test_shift_labels_aligns_each_logit_with_the_next_token():
    labels = torch.tensor([[-100, 5, 6, -100]])
    assert shift_labels(labels).tolist() == [[5, 6, -100, -100]]


def test_response_cross_entropy_is_a_sum_over_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX], [2, IGNORE_INDEX, IGNORE_INDEX, 4]])
    # Hand-written: the label at t is predicted by the logit at t-1; a label at t=0 has no predictor.
    expected = -(
        F.log_softmax(logits[0, 0], -1)[3]
        + F.log_softmax(logits[0, 1], -1)[1]
        + F.log_softmax(logits[1, 2], -1)[4]
    )
    assert torch.allclose(response_cross_entropy(logits, labels), expected)
    assert count_response_tokens(labels) == 3


def test_perfect_prediction_gives_zero_loss():
    labels = torch.tensor([[IGNORE_INDEX, 2, 0]])
    logits = torch.full((1, 3, 3), -1e4)
    logits[0, 0, 2] = logits[0, 1, 0] = 1e4
    assert response_cross_entropy(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_schedule_endpoints_and_warmup():
    lr, min_lr = 1e-4, 1e-6
    assert cosine_with_warmup(0, 100, 10, lr, min_lr) == pytest.approx(lr / 10)
    assert cosine_with_warmup(9, 100, 10, lr, min_lr) == pytest.approx(lr)
    assert cosine_with_warmup(100, 100, 10, lr, min_lr) == pytest.approx(min_lr)
    mid = cosine_with_warmup(55, 100, 10, lr, min_lr)
    assert mid == pytest.approx(min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * 0.5)))
