"""Which teacher target layer each student target layer learns from (VLsI step 2, Algorithm 1).

Once per batch the training loop scores every (student layer, teacher layer) pair without keeping graphs,
``kl [t_s, t_l]`` (the divergence averaged over response tokens), calls :func:`match_layers` to choose the
pairs, then computes only the chosen terms with their graphs: either ``sum(w * div(i_s, i_l) for i_s, i_l, w
in match.terms())``, or, when the full graph-carrying matrix is at hand, :func:`matched_loss`. Sampling uses
the caller's seeded CPU ``torch.Generator``, whose state can be checkpointed with the run.

Strategies (``MatchingConfig.strategy``) reproduce the rows of the paper's ablation:

- ``vlsi``: Algorithm 1 of docs/method.md. [paper] For i_s = 0 .. t_s-1 the candidates are the teacher layers
  ``i* <= i_l <= t_l - t_s + i_s``; ``T = scale / (max(kl_c) - min(kl_c) + eps)``; ``c* ~ softmax(-kl_c / T)``;
  ``i* = c* + 1``.
- ``multinomial``: the same sampler with each ingredient switchable, for the ablation ladder. [design] The two
  bounds of Algorithm 1's window are the two switches: ``search_range`` is the upper bound
  ``t_l - t_s + i_s`` (leave room for the student layers still to come; otherwise ``t_l - 1``), and
  ``order_preservation`` is the lower bound ``i*`` (otherwise 0). ``adaptive_temperature`` replaces the fixed
  ``temperature`` by Algorithm 1's ``T``. All three on is exactly ``vlsi``.
- ``random``: any teacher layer, uniformly. ``uniform``: ``i_l = i_s * floor(t_l / t_s)``.
- ``bottom-k``: the k teacher layers of smallest KL over all of them; the loss averages the k terms.

:func:`match_counts` accumulates the chosen pairs for the student x teacher heat maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

__all__ = [
    "ABLATION_LADDER",
    "STRATEGIES",
    "Match",
    "MatchingConfig",
    "match_counts",
    "match_layers",
    "matched_loss",
]

STRATEGIES = ("vlsi", "multinomial", "random", "uniform", "bottom-k")


@dataclass(frozen=True)
class MatchingConfig:
    strategy: str = field(default="vlsi", metadata={"help": f"layer matching: {' | '.join(STRATEGIES)}"})
    search_range: bool = field(
        default=True,
        metadata={
            "help": "multinomial: candidates stop at t_l - t_s + i_s (room for the later student layers)"
        },
    )
    order_preservation: bool = field(
        default=True, metadata={"help": "multinomial: candidates start just past the previous match"}
    )
    adaptive_temperature: bool = field(
        default=True,
        metadata={"help": "multinomial: T = scale / (max KL - min KL + eps) instead of --temperature"},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "fixed sampling temperature without the adaptive one [design]"}
    )
    scale: float = field(default=2.0, metadata={"help": "numerator of the adaptive temperature (paper: 2)"})
    eps: float = field(default=1e-6, metadata={"help": "keeps the adaptive temperature finite (paper: 1e-6)"})
    k: int = field(default=1, metadata={"help": "bottom-k: teacher layers averaged per student layer"})

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown matching strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.strategy == "vlsi" and not (
            self.search_range and self.order_preservation and self.adaptive_temperature
        ):
            raise ValueError(
                "strategy 'vlsi' is Algorithm 1 with search range, order preservation and adaptive temperature; "
                "to switch one off use strategy 'multinomial'"
            )
        for name in ("temperature", "scale", "eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"matching {name} must be > 0, got {getattr(self, name)}")
        if self.k < 1:
            raise ValueError(f"bottom-k needs k >= 1, got {self.k}")

    @property
    def needs_fewer_student_layers(self) -> bool:
        """Whether the strategy assumes t_s <= t_l (an increasing or spread-out assignment)."""
        if self.strategy in ("vlsi", "uniform"):
            return True
        return self.strategy == "multinomial" and (self.search_range or self.order_preservation)


_PLAIN_MULTINOMIAL = MatchingConfig(
    strategy="multinomial", search_range=False, order_preservation=False, adaptive_temperature=False
)

# The paper's ablation of the matching strategy, in the order of its table.
ABLATION_LADDER: dict[str, MatchingConfig] = {
    "random": MatchingConfig(strategy="random"),
    "uniform": MatchingConfig(strategy="uniform"),
    "bottom-1": MatchingConfig(strategy="bottom-k", k=1),
    "bottom-3": MatchingConfig(strategy="bottom-k", k=3),
    "multinomial": _PLAIN_MULTINOMIAL,
    "multinomial+search_range": replace(_PLAIN_MULTINOMIAL, search_range=True),
    "multinomial+search_range+order_preservation": replace(
        _PLAIN_MULTINOMIAL, search_range=True, order_preservation=True
    ),
    "vlsi": MatchingConfig(),
}


@dataclass
class Match:
    """The teacher layer(s) chosen for each student target layer in one batch.

    ``teacher_index[i_s]`` is an int, or for ``bottom-k`` a list of k ints in increasing KL.
    ``probabilities[i_s]`` is the distribution the choice was drawn from, over all t_l teacher layers (zero
    outside the candidates; a point mass for deterministic strategies; 1/k on each bottom-k choice).
    ``temperature[i_s]`` is the softmax temperature used, None where no softmax was involved.
    """

    teacher_index: list[int] | list[list[int]]
    probabilities: torch.Tensor  # [t_s, t_l]
    temperature: list[float | None]

    def terms(self) -> list[tuple[int, int, float]]:
        """(student index, teacher index, weight) of every loss term; weights sum to 1 per student layer."""
        out = []
        for i_s, chosen in enumerate(self.teacher_index):
            chosen = chosen if isinstance(chosen, list) else [chosen]
            out.extend((i_s, i_l, 1.0 / len(chosen)) for i_l in chosen)
        return out


def _window(i_s: int, t_s: int, t_l: int, start: int, cfg: MatchingConfig) -> tuple[int, int]:
    """Inclusive [lo, hi] of the candidate teacher layers for student layer i_s."""
    hi = t_l - t_s + i_s if cfg.search_range else t_l - 1
    lo = start if cfg.order_preservation else 0
    # Without the search range an early deep match can use up the teacher layers; the remaining student
    # layers then share the last one rather than having no candidate at all.
    return min(lo, hi), hi


def _sample(kl: torch.Tensor, cfg: MatchingConfig, generator: torch.Generator) -> Match:
    t_s, t_l = kl.shape
    probabilities = torch.zeros(t_s, t_l, dtype=torch.float64)
    chosen, temperatures = [], []
    start = 0
    for i_s in range(t_s):
        lo, hi = _window(i_s, t_s, t_l, start, cfg)
        candidates = kl[i_s, lo : hi + 1]
        if cfg.adaptive_temperature:
            # Dividing by T multiplies the KLs by their range / scale, so the logits span range**2 / scale:
            # near-uniform exploration when the candidates say much the same, near-greedy when one stands out.
            temperature = cfg.scale / (float(candidates.max() - candidates.min()) + cfg.eps)
        else:
            temperature = cfg.temperature
        p = torch.softmax(-candidates / temperature, dim=0)
        c = lo + int(torch.multinomial(p, 1, generator=generator))
        probabilities[i_s, lo : hi + 1] = p
        chosen.append(c)
        temperatures.append(temperature)
        start = c + 1
    return Match(chosen, probabilities.float(), temperatures)


def _point_masses(t_s: int, t_l: int, chosen: list[int] | list[list[int]]) -> torch.Tensor:
    probabilities = torch.zeros(t_s, t_l)
    for i_s, c in enumerate(chosen):
        c = c if isinstance(c, list) else [c]
        probabilities[i_s, c] = 1.0 / len(c)
    return probabilities


class NonFiniteScores(ValueError, FloatingPointError):
    """The divergence matrix holds NaN or inf. A FloatingPointError too, so the training loop reports it
    as a non-finite step naming the step and its records (:func:`vlsi.train.runtime.names_step`)."""


def match_layers(kl: torch.Tensor, config: MatchingConfig, generator: torch.Generator) -> Match:
    """Choose the teacher layer(s) for every student target layer.

    kl: [t_s, t_l], kl[i, j] = divergence between student target layer i and teacher target layer j,
    averaged over response tokens. It is detached here: the choice is never differentiated.
    generator: a seeded CPU generator; the deterministic strategies leave it untouched.
    """
    if kl.dim() != 2 or kl.numel() == 0:
        raise ValueError(f"kl must be a non-empty [t_s, t_l] matrix, got shape {tuple(kl.shape)}")
    # Tiny ([7, 20] for Qwen2-VL); the choices drive Python control flow, so one device sync is unavoidable.
    kl = kl.detach().to("cpu", torch.float64)
    if not torch.isfinite(kl).all():
        raise NonFiniteScores("kl contains NaN or inf (a batch without response tokens?)")
    t_s, t_l = kl.shape
    if config.needs_fewer_student_layers and t_s > t_l:
        raise ValueError(
            f"matching strategy {config.strategy!r} needs t_s <= t_l student / teacher target layers, "
            f"got t_s={t_s} > t_l={t_l}"
        )
    if config.strategy in ("vlsi", "multinomial"):
        return _sample(kl, config, generator)
    if config.strategy == "random":
        chosen = torch.randint(0, t_l, (t_s,), generator=generator).tolist()
        return Match(chosen, torch.full((t_s, t_l), 1.0 / t_l), [None] * t_s)
    if config.strategy == "uniform":
        stride = t_l // t_s
        chosen = [i_s * stride for i_s in range(t_s)]
        return Match(chosen, _point_masses(t_s, t_l, chosen), [None] * t_s)
    # bottom-k
    if config.k > t_l:
        raise ValueError(f"bottom-k with k={config.k} needs at least k teacher layers, got t_l={t_l}")
    chosen = kl.topk(config.k, dim=1, largest=False).indices.tolist()
    return Match(chosen, _point_masses(t_s, t_l, chosen), [None] * t_s)


def matched_loss(kl_with_grad: torch.Tensor, match: Match) -> torch.Tensor:
    """Sum over student layers of the chosen term (the mean of the k chosen ones for bottom-k).

    kl_with_grad: [t_s, t_l] divergences that carry their graphs. Only the chosen entries are indexed, so
    the gradient reaches exactly those terms and an unchosen NaN or inf cannot leak into the loss.
    """
    if tuple(kl_with_grad.shape) != tuple(match.probabilities.shape):
        raise ValueError(
            f"kl matrix {tuple(kl_with_grad.shape)} does not fit the match {tuple(match.probabilities.shape)}"
        )
    rows, cols, weights = zip(*match.terms(), strict=True)
    weights = torch.tensor(weights, dtype=kl_with_grad.dtype, device=kl_with_grad.device)
    return (kl_with_grad[list(rows), list(cols)] * weights).sum()


def match_counts(matches: Iterable[Match], t_s: int, t_l: int) -> torch.Tensor:
    """How often each (student, teacher) pair was chosen, [t_s, t_l] int64; a bottom-k choice counts once."""
    counts = torch.zeros(t_s, t_l, dtype=torch.int64)
    for match in matches:
        if tuple(match.probabilities.shape) != (t_s, t_l):
            raise ValueError(f"match of shape {tuple(match.probabilities.shape)} in counts of {(t_s, t_l)}")
        for i_s, i_l, _ in match.terms():
            counts[i_s, i_l] += 1
    return counts
