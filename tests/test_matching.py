import math

import pytest
import torch

from vlsi.losses.matching import (
    ABLATION_LADDER,
    MatchingConfig,
    match_counts,
    match_layers,
    matched_loss,
)

VLSI = MatchingConfig()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_kl(seed, t_s=7, t_l=20):
    # Range ~1 nat per row: the adaptive temperature keeps the sampling spread rather than greedy.
    return torch.rand(t_s, t_l, generator=gen(1000 + seed), dtype=torch.float64)


@pytest.mark.parametrize("t_s, t_l", [(7, 20), (3, 4), (1, 5)])
def test_vlsi_candidates_follow_algorithm_1_bounds(t_s, t_l):
    for seed in range(200):
        match = match_layers(random_kl(seed, t_s, t_l), VLSI, gen(seed))
        start = 0
        for i_s, i_l in enumerate(match.teacher_index):
            assert start <= i_l <= t_l - t_s + i_s
            support = match.probabilities[i_s].nonzero().flatten().tolist()
            assert support == list(range(start, t_l - t_s + i_s + 1))
            start = i_l + 1
        # Order preservation: strictly increasing teacher layers.
        assert all(a < b for a, b in zip(match.teacher_index[:-1], match.teacher_index[1:], strict=True))


def test_equal_depths_collapse_to_the_identity():
    for seed in range(20):
        assert match_layers(random_kl(seed, 5, 5), VLSI, gen(seed)).teacher_index == [0, 1, 2, 3, 4]


def test_adaptive_temperature_on_a_hand_made_row():
    kl = torch.tensor([[1.0, 2.0, 4.0]])
    match = match_layers(kl, VLSI, gen(0))
    temperature = 2.0 / (4.0 - 1.0 + 1e-6)
    assert match.temperature == [pytest.approx(temperature)]
    assert match.temperature[0] == pytest.approx(0.6666664444)
    expected = torch.softmax(-kl[0] / temperature, dim=0)
    assert torch.allclose(match.probabilities[0], expected)


def test_adaptive_temperature_uses_only_the_candidates():
    # Row 0 is decisive (logits span 100**2 / 2), so i* = 1 and the 1000 at teacher 0 is out of range.
    kl = torch.tensor([[0.0, 100.0, 100.0], [1000.0, 0.5, 1.5]])
    match = match_layers(kl, VLSI, gen(0))
    assert match.teacher_index[0] == 0
    assert match.temperature[1] == pytest.approx(2.0 / (1.0 + 1e-6))
    assert match.probabilities[1, 0] == 0
    assert torch.allclose(match.probabilities[1, 1:], torch.softmax(-kl[1, 1:] / match.temperature[1], 0))


@pytest.mark.slow  # 20,000 draws per setting
@pytest.mark.parametrize(
    "config",
    [VLSI, ABLATION_LADDER["multinomial"], MatchingConfig(strategy="multinomial", temperature=0.5)],
    ids=["adaptive", "fixed-T1", "fixed-T0.5"],
)
def test_sampling_frequencies_follow_softmax_of_negative_kl(config):
    # One student layer: every teacher layer is a candidate under every switch setting.
    kl = torch.tensor([[0.3, 0.5, 0.9, 1.4, 2.0]])
    draws = 20_000
    g = gen(0)
    counts = match_counts((match_layers(kl, config, g) for _ in range(draws)), 1, 5)
    temperature = 2.0 / (1.7 + 1e-6) if config.adaptive_temperature else config.temperature
    expected = torch.softmax(-kl[0] / temperature, dim=0)
    frequencies = counts[0].double() / draws
    assert (frequencies - expected).abs().max() < 0.015  # ~4 standard errors at 20k draws
    chi_square = (((counts[0] - draws * expected) ** 2) / (draws * expected)).sum()
    assert chi_square < 18.5  # 99.9% quantile of chi-square with 4 degrees of freedom


def test_switches_set_the_two_bounds_of_the_window_independently():
    kl = random_kl(0, 4, 10)
    support = {
        name: [row.nonzero().flatten().tolist() for row in match_layers(kl, cfg, gen(1)).probabilities]
        for name, cfg in ABLATION_LADDER.items()
        if cfg.strategy == "multinomial"
    }
    assert all(s == list(range(10)) for s in support["multinomial"])
    assert support["multinomial+search_range"] == [list(range(0, 7 + i)) for i in range(4)]
    ordered = match_layers(kl, ABLATION_LADDER["multinomial+search_range+order_preservation"], gen(1))
    starts = [0] + [i + 1 for i in ordered.teacher_index[:-1]]
    assert [r.nonzero().flatten().tolist() for r in ordered.probabilities] == [
        list(range(s, 7 + i)) for i, s in enumerate(starts)
    ]
    assert all(t == 1.0 for t in ordered.temperature)


def test_order_preservation_without_search_range_shares_the_last_layer_once_exhausted():
    # The first student layer is pulled to the last teacher layer; the rest have nowhere deeper to go.
    kl = torch.tensor([[9.0, 9.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    cfg = MatchingConfig(strategy="multinomial", search_range=False, adaptive_temperature=True)
    assert match_layers(kl, cfg, gen(0)).teacher_index == [2, 2, 2]


def algorithm_1(kl: torch.Tensor, generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """The paper's Algorithm 1 written out on its own: student layer i draws from teacher layers
    [previous match + 1, t_l - t_s + i] with p = softmax(-KL / T), T = 2 / (max KL - min KL + 1e-6) over
    those candidates. Drawn with the same sampling call, so a seeded generator gives the same draws."""
    t_s, t_l = kl.shape
    chosen, probabilities, start = [], torch.zeros(t_s, t_l, dtype=torch.float64), 0
    for i in range(t_s):
        candidates = kl[i, start : t_l - t_s + i + 1].double()
        temperature = 2.0 / (candidates.max().item() - candidates.min().item() + 1e-6)
        p = torch.softmax(-candidates / temperature, dim=0)
        chosen.append(start + int(torch.multinomial(p, 1, generator=generator)))
        probabilities[i, start : t_l - t_s + i + 1] = p
        start = chosen[-1] + 1
    return chosen, probabilities


def test_vlsi_and_the_full_multinomial_are_algorithm_1():
    # Compared with the reference above, not with each other: both names run the same code path.
    full = MatchingConfig(strategy="multinomial")
    for seed in range(10):
        kl = random_kl(seed)
        expected_index, expected_p = algorithm_1(kl, gen(seed))
        for cfg in (VLSI, full):
            match = match_layers(kl, cfg, gen(seed))
            assert match.teacher_index == expected_index
            torch.testing.assert_close(match.probabilities.double(), expected_p, rtol=1e-6, atol=1e-7)


def test_uniform_index():
    match = match_layers(random_kl(0, 7, 20), ABLATION_LADDER["uniform"], gen(0))
    assert match.teacher_index == [0, 2, 4, 6, 8, 10, 12]
    assert match.probabilities.sum(1).tolist() == [1.0] * 7


def test_bottom_k_picks_the_k_smallest():
    kl = torch.tensor([[5.0, 1.0, 3.0, 0.5, 4.0], [0.1, 0.2, 9.0, 0.3, 8.0]])
    assert match_layers(kl, ABLATION_LADDER["bottom-1"], gen(0)).teacher_index == [[3], [0]]
    match = match_layers(kl, ABLATION_LADDER["bottom-3"], gen(0))
    assert match.teacher_index == [[3, 1, 2], [0, 1, 3]]
    assert matched_loss(kl, match).item() == pytest.approx((0.5 + 1 + 3) / 3 + (0.1 + 0.2 + 0.3) / 3)
    with pytest.raises(ValueError, match="k=3"):
        match_layers(kl[:, :2], ABLATION_LADDER["bottom-3"], gen(0))


def test_random_covers_every_teacher_layer():
    counts = match_counts(
        (match_layers(random_kl(0), ABLATION_LADDER["random"], gen(s)) for s in range(100)), 7, 20
    )
    assert (counts.sum(0) > 0).all()
    assert counts.sum().item() == 700


def test_matched_loss_gradient_reaches_exactly_the_chosen_entries():
    kl = random_kl(3).requires_grad_()
    match = match_layers(kl, VLSI, gen(3))
    loss = matched_loss(kl, match)
    loss.backward()
    chosen = torch.zeros(7, 20, dtype=torch.bool)
    chosen[list(range(7)), match.teacher_index] = True
    assert (kl.grad[chosen] == 1).all() and (kl.grad[~chosen] == 0).all()
    assert loss.item() == pytest.approx(sum(kl[i, j].item() for i, j in enumerate(match.teacher_index)))
    assert [(i, j) for i, j, _ in match.terms()] == list(enumerate(match.teacher_index))


def test_matched_loss_ignores_non_finite_unchosen_entries():
    kl = torch.tensor([[0.2, math.inf], [math.nan, 0.4]], requires_grad=True)
    match = match_layers(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), ABLATION_LADDER["bottom-1"], gen(0))
    loss = matched_loss(kl, match)
    loss.backward()
    assert loss.item() == pytest.approx(0.6) and torch.isfinite(kl.grad).all()


def test_same_seed_same_matches_different_seed_different_matches():
    kl = random_kl(4)
    for name in ("vlsi", "multinomial", "random"):
        cfg = ABLATION_LADDER[name]
        first, again = match_layers(kl, cfg, gen(7)), match_layers(kl, cfg, gen(7))
        assert first.teacher_index == again.teacher_index
        others = {tuple(match_layers(kl, cfg, gen(s)).teacher_index) for s in range(8, 13)}
        assert others - {tuple(first.teacher_index)}


def test_match_counts_accumulate_chosen_pairs():
    kl = torch.tensor([[5.0, 1.0, 3.0], [0.1, 0.2, 9.0]])
    matches = [match_layers(kl, ABLATION_LADDER["bottom-1"], gen(0))] * 3
    matches.append(match_layers(kl, MatchingConfig(strategy="bottom-k", k=2), gen(0)))
    assert match_counts(matches, 2, 3).tolist() == [[0, 4, 1], [4, 1, 0]]


def test_more_student_than_teacher_layers_is_refused_where_order_matters():
    kl = random_kl(0, 5, 3)
    for cfg in (VLSI, ABLATION_LADDER["uniform"], ABLATION_LADDER["multinomial+search_range"]):
        with pytest.raises(ValueError, match="t_s=5 > t_l=3"):
            match_layers(kl, cfg, gen(0))
    for name in ("random", "bottom-1", "multinomial"):
        assert len(match_layers(kl, ABLATION_LADDER[name], gen(0)).teacher_index) == 5


def test_invalid_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="valid: vlsi, multinomial, random, uniform, bottom-k"):
        MatchingConfig(strategy="greedy")
    with pytest.raises(ValueError, match="use strategy 'multinomial'"):
        MatchingConfig(order_preservation=False)
    with pytest.raises(ValueError, match="NaN"):
        match_layers(torch.tensor([[0.0, math.nan]]), VLSI, gen(0))
    with pytest.raises(ValueError, match="does not fit"):
        matched_loss(torch.zeros(2, 3), match_layers(torch.zeros(1, 3), VLSI, gen(0)))


def test_ablation_ladder_follows_the_paper_table():
    assert list(ABLATION_LADDER) == [
        "random",
        "uniform",
        "bottom-1",
        "bottom-3",
        "multinomial",
        "multinomial+search_range",
        "multinomial+search_range+order_preservation",
        "vlsi",
    ]
    plain = ABLATION_LADDER["multinomial"]
    assert not (plain.search_range or plain.order_preservation or plain.adaptive_temperature)
    assert ABLATION_LADDER["vlsi"] == MatchingConfig()
