"""Where a model name points: a local checkpoint folder or a hub id.

Both the models (:mod:`vlsi.model.loading`) and their processors (:mod:`vlsi.data.processing`) are read from
such a name, so the rule lives beside both rather than in either. :func:`resolve_model` tells the two kinds
apart before anything is read, so a mistyped folder is reported as one (not as a failed connection to the hub).
"""

from __future__ import annotations

from pathlib import Path

from transformers.utils import cached_file

__all__ = ["resolve_model"]


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
