"""Which token ids a teacher's and a student's distributions are compared over, when their tokenizers are
not one tokenizer.

Models of different families (Qwen2.5-VL and Qwen2-VL, Qwen3-VL and LLaVA-OneVision, ...) write answers
with the same byte-level BPE but add their own special tokens (image placeholders, tool and thinking
tags) on top of it, at ids the other may use for something else or not at all. VLsI compares the two
distributions at response tokens only, so what must agree is every token a response can be written in:
the *regular* vocabulary (all but the added tokens), token for token and id for id
(:func:`check_regular_vocab`; a pair that fails it is refused before any weight is loaded). The
distributions are then compared over the ids both tokenizers define and spell alike (:func:`compared_ids`):
an id one side lacks or spells otherwise is dropped from both and each softmax renormalised over the rest,
so no probability mass on, say, the teacher's ``<think>`` is ever set against the student's unrelated token
of that id.

:class:`SharedVocab` applies it: on whole logits (:meth:`SharedVocab.restrict`), or to the language-head
weights the chunked losses read (:meth:`SharedVocab.heads`). With nothing to drop (one tokenizer, or two
that agree on every id) it is the plain narrower-width cut of
:func:`vlsi.losses.divergences.shared_vocab`, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsi.losses.divergences import shared_vocab

__all__ = ["SharedVocab", "check_regular_vocab", "compared_ids", "regular_vocab"]


def regular_vocab(tokenizer) -> dict[str, int]:
    """``token -> id`` of the tokenizer's own vocabulary, without the tokens added on top of it (special
    tokens, image placeholders): the tokens plain text, hence a response, is written in."""
    added = tokenizer.get_added_vocab()
    return {t: i for t, i in tokenizer.get_vocab().items() if t not in added}


def _shown(items: list, max_report: int) -> str:
    more = f" (and {len(items) - max_report} more)" if len(items) > max_report else ""
    return ", ".join(items[:max_report]) + more


def check_regular_vocab(tok_t, tok_s, max_report: int = 5) -> int:
    """Refuse a teacher / student pair whose regular vocabularies differ; return their size.

    Raises ``ValueError`` naming what differs: tokens only one side has, and tokens the two give other ids.
    A response written in such tokens could not be one id sequence for both models.
    """
    reg_t, reg_s = regular_vocab(tok_t), regular_vocab(tok_s)
    problems = []
    only_t = sorted(set(reg_t) - set(reg_s), key=reg_t.get)
    only_s = sorted(set(reg_s) - set(reg_t), key=reg_s.get)
    moved = sorted((t for t in set(reg_t) & set(reg_s) if reg_t[t] != reg_s[t]), key=reg_t.get)
    if only_t:
        problems.append(
            f"{len(only_t)} only in the teacher's: {_shown([repr(t) for t in only_t], max_report)}"
        )
    if only_s:
        problems.append(
            f"{len(only_s)} only in the student's: {_shown([repr(t) for t in only_s], max_report)}"
        )
    if moved:
        shown = [f"{t!r} is {reg_t[t]} vs {reg_s[t]}" for t in moved]
        problems.append(f"{len(moved)} with other ids: {_shown(shown, max_report)}")
    if problems:
        raise ValueError(
            f"the regular vocabularies differ ({len(reg_t)} vs {len(reg_s)} tokens), so a response is not one "
            "id sequence for both models:\n  " + "\n  ".join(problems)
        )
    return len(reg_t)


def compared_ids(tok_t, tok_s) -> torch.Tensor | None:
    """The ids both tokenizers define and spell alike, ascending (int64); None when that is every id of
    either, which leaves nothing to drop."""
    by_id_t = {i: t for t, i in tok_t.get_vocab().items()}
    by_id_s = {i: t for t, i in tok_s.get_vocab().items()}
    keep = sorted(i for i, t in by_id_t.items() if by_id_s.get(i) == t)
    if len(keep) == len(by_id_t) == len(by_id_s):
        return None
    return torch.tensor(keep, dtype=torch.int64)


@dataclass(frozen=True)
class SharedVocab:
    """The compared vocabulary of one pair: ``keep`` (ascending ids) or None, every id below the narrower
    head (padding rows of a wider head are dropped either way)."""

    keep: torch.Tensor | None = None

    def __post_init__(self):
        if self.keep is not None and (self.keep.dim() != 1 or not len(self.keep)):
            raise ValueError("keep must be a non-empty 1-D tensor of token ids")

    @property
    def masked(self) -> bool:
        return self.keep is not None

    def restrict(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both ``[..., V]`` logits cut to the compared ids; a softmax of the result renormalises over them."""
        t_logits, s_logits = shared_vocab(t_logits, s_logits)
        if self.keep is None:
            return t_logits, s_logits
        keep = self._keep(t_logits.shape[-1], t_logits.device)
        return t_logits.index_select(-1, keep), s_logits.index_select(-1, keep)

    def heads(
        self, s_weight: torch.Tensor, t_weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The language-head weights ``[V, D]`` as the chunked losses should read them, and the map of the
        student's token ids to its reordered rows (None: unchanged).

        The chunked losses compare the leading ``min(V_s, V_t)`` rows of both heads and take the student's
        cross-entropy to the labels over all of its rows. So the student's rows are reordered, the compared
        ids first (a permutation: its softmax over all rows, hence that cross-entropy, is unchanged once the
        labels are mapped too), and the teacher's head is cut to the compared ids. A cached teacher
        (``t_weight`` None) was stored over the compared ids already.
        """
        if self.keep is None:
            return s_weight, t_weight, None
        width = s_weight.shape[0] if t_weight is None else min(s_weight.shape[0], t_weight.shape[0])
        keep = self._keep(width, s_weight.device)
        rest = torch.ones(s_weight.shape[0], dtype=torch.bool, device=s_weight.device)
        rest[keep] = False
        order = torch.cat([keep, rest.nonzero().flatten()])
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order), device=order.device)
        return s_weight[order], None if t_weight is None else t_weight[keep], position

    def _keep(self, width: int, device) -> torch.Tensor:
        keep = self.keep
        if int(keep[-1]) >= width:
            raise ValueError(f"compared token id {int(keep[-1])} lies beyond a head of {width} rows")
        return keep.to(device)
