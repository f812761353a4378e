"""Sequence-level KD as step 2's response source (``vlsi interact --responses teacher``).

Kim & Rush's sequence-level KD trains on the teacher's own greedy answers instead of the dataset's. They are
written once by :func:`vlsi.run.relabel.relabel` into a file beside the records,
``DATA.teacher-responses.json``, with ``DATA.teacher-responses.json.fingerprint`` saying what made it: the
teacher (its path and the size and time of its weight files), the data file's hash, the image folder and
the generation settings. A later run with the same fingerprint reuses the file; any difference rebuilds it.

Records without an answer (the last turn the user's) are answered too: the teacher's answer is added as
their last turn, so step 2 runs on a file of questions only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from vlsi.data.records import load_records, unanswered
from vlsi.model.loading import resolve_model

log = logging.getLogger("vlsi.train.teacher_responses")

RESPONSE_SOURCES = ("data", "teacher")
SUFFIX = ".teacher-responses.json"
# Stands in for a missing answer until the teacher writes it; never trained on (relabel replaces it).
_PENDING = "(to be answered by the teacher)"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def response_fingerprint(teacher: str, data: Path, image_root: str | None, settings: dict) -> dict:
    """What the teacher's answers depend on. The teacher's weights are identified by their files' sizes and
    modification times (hashing a 72B checkpoint at every run would cost minutes)."""
    path = Path(resolve_model(teacher))
    weights = {}
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            stat = f.stat()
            weights[f.name] = [stat.st_size, stat.st_mtime_ns]
    return {
        "teacher": str(path.resolve()) if path.exists() else str(teacher),
        "teacher_weights": weights,
        "data_sha256": file_sha256(data),
        "image_root": str(Path(image_root or data.parent).resolve()),
        **settings,
    }


def responses_path(data: str | Path) -> Path:
    """Where ``data``'s teacher responses are cached: beside it."""
    data = Path(data)
    return data.with_name(data.name + SUFFIX)


def teacher_responses(
    teacher: str,
    data: str | Path,
    image_root: str | None = None,
    *,
    max_new_tokens: int = 32,
    max_length: int = 2048,
    batch_size: int = 32,
) -> Path:
    """The path of ``data``'s records answered by ``teacher`` (greedy), built or rebuilt when its fingerprint
    differs from what wrote the cached file. Call on one process."""
    from vlsi.run.relabel import relabel

    data = Path(data)
    out = responses_path(data)
    stamp = out.with_name(out.name + ".fingerprint")
    settings = {"max_new_tokens": max_new_tokens, "max_length": max_length}
    want = response_fingerprint(teacher, data, image_root, settings)
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        log.info("teacher responses: %s (up to date)", out)
        return out
    log.info("teacher responses: writing %s", out)
    records = load_records(data)
    pending = sum(unanswered(r) for r in records)
    with tempfile.TemporaryDirectory() as tmp:
        source = data
        if pending:
            # A placeholder answer for relabel to replace: it answers every assistant turn.
            for record in records:
                if unanswered(record):
                    record["conversations"] = [*record["conversations"], {"from": "gpt", "value": _PENDING}]
            source = Path(tmp) / data.name
            source.write_text(json.dumps(records))
        counts = relabel(
            teacher,
            source,
            out,
            image_root=str(image_root or data.parent),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
        )
    stamp.write_text(json.dumps(want, indent=1))
    log.info("teacher responses: %s records (%s without an answer in %s)", counts["records"], pending, data)
    return out
