"""Loading a VLM checkpoint: where the name points, the model itself, and whether two tokenizers agree.

A model is named by a local checkpoint folder or a hub id. :func:`resolve_model` tells the two apart before
anything is read, so a mistyped folder is reported as one (not as a failed connection to the hub).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText
from transformers.utils import cached_file

__all__ = ["check_same_tokenizer", "head_width", "load_model", "resolve_model"]


def resolve_model(name: str | Path) -> str:
    """``name`` as ``from_pretrained`` should read it: an existing folder, or a hub id whose ``config.json``
    can be found (in the local cache or on the hub). Raises ``ValueError`` saying which it is not."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{str(name)!r} is a file; a model is a checkpoint folder or a hub id")
    try:
        cached_file(str(name), "config.json")
    except (OSError, ValueError) as e:  # no such repo, no connection, or not a valid repo id at all
        raise ValueError(
            f"{str(name)!r} is not a folder, and the hub id could not be reached/resolved: {e}"
        ) from None
    return str(name)


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
