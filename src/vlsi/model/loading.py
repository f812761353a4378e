"""Loading a VLM checkpoint, and whether a teacher and a student can be paired.

A model is named by a local checkpoint folder or a hub id (:func:`vlsi.hub.resolve_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from vlsi.hub import resolve_model
from vlsi.losses.vocab import SharedVocab, check_regular_vocab, compared_ids
from vlsi.model.backbone import family_for

__all__ = ["Pair", "check_pair", "check_same_tokenizer", "head_width", "load_model", "resolve_model"]


def load_model(path: str | Path, dtype: torch.dtype | str = "auto", **kwargs):
    """Loads any supported VLM from a local path or hub id (nothing vlsi-specific in the files)."""
    return AutoModelForImageTextToText.from_pretrained(resolve_model(path), dtype=dtype, **kwargs)


def head_width(name: str | Path) -> int:
    """Rows of a checkpoint's language head (its logits' width), from its config alone: the model is built on
    the meta device, so no weight is read or allocated."""
    from transformers import AutoConfig

    from vlsi.model.backbone import Backbone

    config = AutoConfig.from_pretrained(resolve_model(name))
    with torch.device("meta"):
        return Backbone(AutoModelForImageTextToText.from_config(config)).vocab_size


_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _special_ids(tokenizer, size: int) -> dict[str, int]:
    tokens = getattr(tokenizer, "all_special_tokens", None) or []
    ids = tokenizer.convert_tokens_to_ids(list(tokens)) if tokens else []
    return {tok: i for tok, i in zip(tokens, ids, strict=True) if i is not None and i < size}


def check_same_tokenizer(tok_a, tok_b, max_report: int = 5) -> int:
    """Refuse a teacher / student pair whose tokenizers disagree on the shared ids; return the shared size.

    Compared on ids below ``min(len(tok_a), len(tok_b))``: the token each id spells, which of them are
    special tokens, and the bos / eos / pad / unk roles. Entries beyond the shorter tokenizer (added padding
    tokens) are allowed, since :func:`vlsi.losses.divergences.shared_vocab` drops them. Raises ``ValueError`` naming the first
    differing ids, because comparing distributions over differently-indexed vocabularies would train on
    noise without any error.
    """
    size = min(len(tok_a), len(tok_b))
    by_id_a = {i: t for t, i in tok_a.get_vocab().items() if i < size}
    by_id_b = {i: t for t, i in tok_b.get_vocab().items() if i < size}
    differing = sorted(i for i in set(by_id_a) | set(by_id_b) if by_id_a.get(i) != by_id_b.get(i))
    problems = []
    if differing:
        shown = ", ".join(f"{i}: {by_id_a.get(i)!r} vs {by_id_b.get(i)!r}" for i in differing[:max_report])
        more = f" (and {len(differing) - max_report} more)" if len(differing) > max_report else ""
        problems.append(f"{len(differing)} of the {size} shared ids spell different tokens: {shown}{more}")
    special_a, special_b = _special_ids(tok_a, size), _special_ids(tok_b, size)
    if special_a != special_b:
        problems.append(f"special tokens differ: {sorted(special_a.items())} vs {sorted(special_b.items())}")
    for role in _SPECIAL_ROLES:
        a, b = getattr(tok_a, role, None), getattr(tok_b, role, None)
        if a != b:
            problems.append(f"{role} differs: {a!r} vs {b!r}")
    if problems:
        raise ValueError(
            "teacher and student tokenizers differ, so their vocabulary distributions are not comparable:\n  "
            + "\n  ".join(problems)
        )
    return size


@dataclass(frozen=True)
class Pair:
    """A checked teacher / student pair: their families and the vocabulary they are compared over."""

    teacher_family: str
    student_family: str
    vocab: SharedVocab

    @property
    def cross_family(self) -> bool:
        """Whether each model needs its own rendering of every record (:mod:`vlsi.data.pairs`)."""
        return self.teacher_family != self.student_family


def check_pair(teacher: str | Path, student: str | Path) -> Pair:
    """Refuses, from their config and tokenizer files alone (before any weight is loaded), a teacher and
    student whose distributions cannot be compared; returns their families and the vocabulary they are compared over.

    One family must share the tokenizer (:func:`check_same_tokenizer`). Two families must agree on every
    regular token, the tokens a response is written in (:func:`vlsi.losses.vocab.check_regular_vocab`);
    their special tokens may differ and are then left out of every divergence
    (:class:`vlsi.losses.vocab.SharedVocab`). A mismatch would otherwise train on noise without any error.
    """
    # A mistyped folder is named as one, not reported as a failed hub connection.
    teacher, student = resolve_model(teacher), resolve_model(student)
    families = {}
    for role, path in (("teacher", teacher), ("student", student)):
        try:
            families[role] = family_for(AutoConfig.from_pretrained(path)).name
        except ValueError as e:
            raise ValueError(f"{role} {path}: {e}") from None
    tok_t, tok_s = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    if families["teacher"] == families["student"]:
        try:
            check_same_tokenizer(tok_t, tok_s)
        except ValueError as e:
            raise ValueError(
                f"teacher {teacher} and student {student} do not share a tokenizer: {e}"
            ) from None
        return Pair(families["teacher"], families["student"], SharedVocab())
    try:
        check_regular_vocab(tok_t, tok_s)
    except ValueError as e:
        raise ValueError(
            f"teacher {teacher} ({families['teacher']}) and student {student} ({families['student']}) cannot "
            f"be paired: {e}"
        ) from None
    return Pair(families["teacher"], families["student"], SharedVocab(compared_ids(tok_t, tok_s)))
