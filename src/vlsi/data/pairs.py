"""One record for two models of different families: each renders it with its own chat template and
processor, and their responses must be one token sequence.

Teacher and student of two families (:func:`vlsi.model.loading.check_pair`) differ in chat template, image
placeholders and how many tokens an image becomes, so the prompt parts of their inputs differ in length
and content. VLsI compares them at response tokens only, the i-th response token of one against the i-th of
the other, which is sound only when the two encodings give the same response ids. :class:`PairEncoder`
checks that for every record: a record whose response tokenizes differently (another pre-tokenizer or
merges, or a template that writes the reply otherwise) is skipped and counted under
:data:`RESPONSE_MISMATCH`, never silently misaligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlsi.data.records import Encoder, RecordError, collate
from vlsi.losses.tokens import IGNORE_INDEX

__all__ = ["RESPONSE_MISMATCH", "TEACHER_INPUTS", "PairEncoder", "collate_pairs", "response_ids"]

# The skip reason of a record whose response is not one id sequence for teacher and student.
RESPONSE_MISMATCH = "response tokenized differently for teacher and student"
# Where an encoded record (and a collated batch) holds the teacher's own encoding.
TEACHER_INPUTS = "teacher_inputs"


def response_ids(labels: torch.Tensor) -> list[int]:
    """The labelled (response) token ids of one encoded record, in order."""
    return [t for t in labels.tolist() if t != IGNORE_INDEX]


@dataclass
class PairEncoder:
    """Encodes a record for the student (the item trained on) and for the teacher (under
    :data:`TEACHER_INPUTS`), refusing it when the two responses differ."""

    student: Encoder
    teacher: Encoder

    @property
    def processor(self):
        return self.student.processor

    def encode(self, record: dict, base: Path) -> dict:
        item = self.student.encode(record, base)
        teacher = self.teacher.encode(record, base)
        s_ids, t_ids = response_ids(item["labels"]), response_ids(teacher["labels"])
        if s_ids != t_ids:
            common = min(len(s_ids), len(t_ids))
            at = next((i for i in range(common) if s_ids[i] != t_ids[i]), common)
            raise RecordError(
                f"its response is {len(s_ids)} tokens for the student and {len(t_ids)} for the teacher, "
                f"first differing at response token {at}",
                RESPONSE_MISMATCH,
            )
        item[TEACHER_INPUTS] = teacher
        return item


def collate_pairs(teacher_pad_id: int) -> PairCollate:
    """``collate(items, pad_id)`` for :class:`PairEncoder` items: the student's batch, with the teacher's
    own batch of the same records under :data:`TEACHER_INPUTS` (its padding is the teacher's)."""
    return PairCollate(teacher_pad_id)


@dataclass
class PairCollate:
    """:func:`collate_pairs`' function; a class, so a ``DataLoader`` worker can be handed it."""

    teacher_pad_id: int

    def __call__(self, items: list[dict | None], pad_id: int) -> dict | None:
        items = [x for x in items if x is not None]
        teacher = [x.pop(TEACHER_INPUTS) for x in items]
        batch = collate(items, pad_id)
        if batch is not None:
            batch[TEACHER_INPUTS] = collate(teacher, self.teacher_pad_id)
        return batch
