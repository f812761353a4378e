"""LLaVA-format visual-instruction data: reading, validation, encoding, collation.

A record is ``{"id", "image": path | [paths] (optional), "conversations": [{"from", "value"}, ...]}``
with ``<image>`` placeholders in the human turns. Records are rendered through the model's own chat
template and labelled for the assistant turns only.

Bad input policy: a file that is not valid JSON / JSONL fails at once with its line number (nothing
could be trusted); a bad *record* (malformed conversation, missing or unreadable image, too long) is
skipped with a warning naming it and counted, so a long run never dies on one record.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlsi.data.processing import VLProcessor
from vlsi.data.store import DataFileError, Records
from vlsi.losses.tokens import IGNORE_INDEX

# Records encoded before training, spread over the file, to report the share that will be skipped and why.
SKIP_SCAN_RECORDS = 200
# Per-image (or per-record) tensors beside pixel_values, concatenated over a batch's records.
IMAGE_KEYS = ("image_grid_thw", "image_sizes", "batch_num_images")
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

log = logging.getLogger("vlsi.data.records")


class RecordError(ValueError):
    """One record cannot be used; it is skipped and counted under ``reason`` (a fixed label, while the
    message names the specific file, turn or count)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def load_records(path: str | Path) -> list[dict]:
    """Reads a whole JSON list or JSONL file into memory; fails with the line number on invalid JSON. Small
    files and tools only: training reads every input through :class:`vlsi.data.store.Records`."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: invalid JSONL line: {e.msg}") from None
    if not isinstance(records, list):
        raise DataFileError(f"{path}: expected a JSON list of records or JSONL")
    return records


def record_name(record, index: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "")


@dataclass(frozen=True)
class ImageBytes:
    """An image stored inside the data (a ``{"bytes", "path"}`` struct, as ``datasets.Image`` keeps it)."""

    data: bytes
    name: str

    def __str__(self) -> str:
        return f"<{len(self.data)} bytes{' of ' + self.name if self.name else ''}>"


def _image_item(item, base: Path) -> Path | ImageBytes | None:
    if isinstance(item, str) and item:
        return base / item
    if isinstance(item, dict):
        if isinstance(item.get("bytes"), bytes | bytearray) and item["bytes"]:
            return ImageBytes(bytes(item["bytes"]), item.get("path") or "")
        if isinstance(item.get("path"), str) and item["path"]:
            return base / item["path"]
    return None


def image_paths(record: dict, base: Path) -> list[Path | ImageBytes]:
    """The record's images: files under ``base``, or bytes stored in the record itself."""
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    image = record.get("image")
    if image is None:
        return []
    items = [_image_item(p, base) for p in (image if isinstance(image, list) else [image])]
    if any(p is None for p in items):
        shown = repr(image) if len(repr(image)) < 200 else repr(image)[:200] + "..."
        raise RecordError(
            f"'image' must be a path, a {{'bytes', 'path'}} struct or a list of them, got {shown}",
            "bad image field",
        )
    return items


def unanswered(record) -> bool:
    """Whether the record asks for an answer it does not hold: its last turn is the user's (a question and
    its images, say). Only a step whose responses a model writes can train on it."""
    conv = record.get("conversations") if isinstance(record, dict) else None
    return (
        isinstance(conv, list)
        and bool(conv)
        and isinstance(conv[-1], dict)
        and (ROLES.get(conv[-1].get("from")) == "user")
    )


def refuse_unanswered(path: str | Path, records: list, why: str) -> None:
    """Raises :class:`DataFileError` naming the first record of ``path`` without an answer (:func:`unanswered`):
    ``why`` says what needs the dataset's answers. Such a record is not merely bad, it is the wrong kind of
    data for that step, so the run is refused rather than the record skipped."""
    for index, record in enumerate(records):
        if unanswered(record):
            raise DataFileError(
                f"{path}: {record_name(record, index)} has no answer (its last turn is the user's), but {why} "
                "trains on the dataset's answers; give it records with answers, or let a model write them "
                "(vlsi interact --lmbda 1, or --responses teacher)"
            )


def to_messages(record: dict, num_images: int, require_answer: bool = True) -> list[dict]:
    """LLaVA conversations -> chat messages with typed content parts; validates the structure.

    ``require_answer`` False also accepts a record whose last turn is the user's (:func:`unanswered`)."""
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RecordError("'conversations' is missing or empty")
    messages = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(f"turn {i} needs a string 'value'", "malformed turn")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise RecordError(f"turn {i} has unknown speaker {turn.get('from')!r}", "unknown speaker")
        messages.append({"role": role, "text": turn["value"]})
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant ('gpt') turn")
    if messages[-1]["role"] != "assistant" and (require_answer or messages[-1]["role"] != "user"):
        raise RecordError("last turn is not an assistant ('gpt') turn")
    if any(not m["text"].strip() for m in messages if m["role"] == "assistant"):
        raise RecordError("empty assistant turn")
    placed = sum(m["text"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placed == 0 and num_images:
        # LLaVA-style data often omits the placeholder for single-image records: the image leads.
        first = next(m for m in messages if m["role"] == "user")
        first["text"] = IMAGE_PLACEHOLDER * num_images + "\n" + first["text"]
    elif placed != num_images:
        raise RecordError(f"{placed} '<image>' placeholders but {num_images} images", "image count mismatch")
    return [{"role": m["role"], "content": _content_parts(m["text"])} for m in messages]


def _content_parts(text: str) -> list[dict]:
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if len(pieces) > 1:
            # LLaVA's newline beside <image> only separates it; the template's vision tokens do that now.
            piece = piece.strip("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def load_images(paths: list[Path | ImageBytes]) -> list[Image.Image]:
    images = []
    for p in paths:
        try:
            with Image.open(io.BytesIO(p.data) if isinstance(p, ImageBytes) else p) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            raise RecordError(f"image not found: {p}", "image not found") from None
        except Exception as e:  # PIL raises several types for corrupt files
            raise RecordError(f"unreadable image {p}: {e}", "unreadable image") from None
    return images


@dataclass
class Encoder:
    """Encodes records for training (labels on assistant turns) or prompting (generation)."""

    processor: VLProcessor
    max_length: int = 1024

    def encode(self, record: dict, base: Path) -> dict:
        paths = image_paths(record, base)
        messages = to_messages(record, len(paths))
        image_inputs, counts = self._images(paths)
        full = self._expand(self.processor.render(messages), counts)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._expand(self.processor.render(messages[:k], add_generation_prompt=True), counts)
            through = self._expand(self.processor.render(messages[: k + 1]), counts)
            if not (full.startswith(through) and through.startswith(before)):
                raise RecordError("chat template is not prefix-stable; cannot locate assistant turns")
            # The label span is the reply and its end-of-turn token, not the trailing newline.
            spans.append((len(before), len(through.rstrip())))
        enc = self.processor.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if len(ids) > self.max_length:
            raise RecordError(f"too long: {len(ids)} tokens > max_length {self.max_length}", "too long")
        labels = [
            tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for tok, (start, _) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        return {**self._token_fields(ids), "labels": torch.tensor(labels), **image_inputs}

    def encode_prompt(self, record: dict, base: Path, require_answer: bool = True) -> tuple[dict, str | None]:
        """The record up to its last assistant turn as a generation prompt, and that turn's text. With
        ``require_answer`` False a record without an answer (:func:`unanswered`) is the whole prompt, its
        answer None."""
        paths = image_paths(record, base)
        messages = to_messages(record, len(paths), require_answer)
        answered = messages[-1]["role"] == "assistant"
        answer = record["conversations"][-1]["value"] if answered else None
        image_inputs, counts = self._images(paths)
        asked = messages[:-1] if answered else messages
        prompt = self._expand(self.processor.render(asked, add_generation_prompt=True), counts)
        ids = self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_length:
            raise RecordError(f"too long: {len(ids)} tokens > max_length {self.max_length}", "too long")
        return {**self._token_fields(ids), **image_inputs}, answer

    def _images(self, paths: list[Path]) -> tuple[dict, list[int]]:
        """The record's pixel tensors and placeholder count per image. An image the family's processor
        refuses (say, far too thin for its resize rule) makes the record unusable, not the run."""
        images = load_images(paths)
        try:
            image_inputs = self.processor.process_images(images)
        except ValueError as e:
            sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
            raise RecordError(
                f"the {self.processor.model_type} image processor cannot take {[str(p) for p in paths]} "
                f"({sizes} px): {e}",
                "image rejected by the processor",
            ) from None
        return image_inputs, self.processor.image_token_counts(image_inputs)

    def _token_fields(self, ids: list[int]) -> dict:
        input_ids = torch.tensor(ids)
        if not self.processor.token_types:
            return {"input_ids": input_ids}
        # transformers v5 places multimodal rotary positions by these types (1 = image token).
        return {
            "input_ids": input_ids,
            "mm_token_type_ids": (input_ids == self.processor.image_token_id).long(),
        }

    def _expand(self, text: str, counts: list[int]) -> str:
        n = text.count(self.processor.image_token)
        return self.processor.expand_image_tokens(text, counts[:n])


@dataclass
class SkipLog:
    """Counts skipped records by reason; warns once per record."""

    counts: Counter = field(default_factory=Counter)
    seen: set = field(default_factory=set)

    def skip(self, source: str, index: int, record, error: Exception) -> None:
        self.add(
            source,
            index,
            record_name(record, index),
            getattr(error, "reason", None) or str(error),
            str(error),
        )

    def add(self, source: str, index: int, name: str, reason: str, message: str) -> None:
        """A skip found elsewhere (a ``DataLoader`` worker): the record's name, the reason and the message."""
        if (source, index) not in self.seen:
            self.seen.add((source, index))
            self.counts[reason] += 1
            log.warning("skipping %s of %s: %s", name, source, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {"skipped": self.total, "skipped_by_reason": dict(self.counts)}


class ChatDataset(torch.utils.data.Dataset):
    """Lazily encoded records; a bad record yields None (and is logged and counted).

    ``path``: any input :class:`vlsi.data.store.Records` reads (LLaVA JSON / JSONL, parquet, a
    ``save_to_disk`` folder, a mixture YAML). The records stay on disk, memory-mapped; ``records[i]``
    reads one."""

    def __init__(self, path: str | Path, encoder: Encoder, image_root: str | Path | None = None):
        self.path = Path(path)
        self.records = Records(self.path, image_root)
        self.base = Path(image_root) if image_root else self.path.parent
        self.encoder = encoder
        self.skips = SkipLog()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        item, skipped = self.encode(index)
        if skipped is not None:
            self.skips.add(*skipped)
        return item

    def encode(self, index: int) -> tuple[dict | None, tuple | None]:
        """Record ``index`` encoded, or None and why it is skipped: ``(source, index, name, reason,
        message)``, for :meth:`SkipLog.add`. Counts nothing, so a ``DataLoader`` worker can run it and hand
        the skip to the training process, whose :attr:`skips` the run's summary reads."""
        record = self.records[index]
        try:
            return self.encoder.encode(record, self.records.base(index)), None
        except RecordError as e:
            return None, (str(self.path), index, record_name(record, index), e.reason, str(e))


def spread(n: int, limit: int) -> list[int]:
    """Up to ``limit`` indices spread evenly over ``range(n)``: data files are often sorted by source."""
    return sorted({i * n // limit for i in range(limit)}) if n > limit else list(range(n))


def scan_skips(dataset: ChatDataset, limit: int = SKIP_SCAN_RECORDS, n: int | None = None) -> dict:
    """Encodes up to ``limit`` of the first ``n`` records (all), spread over them, and counts those training
    would skip, by reason: ``{"scanned", "skipped", "by_reason": {reason: count}, "example": {reason: message},
    "longest": tokens of the longest usable record}``. Nothing is counted in ``dataset.skips`` (the run's own
    summary) and nothing is logged per record."""
    by_reason, example, longest = Counter(), {}, 0
    picks = spread(len(dataset) if n is None else n, limit)
    for i in picks:
        record = dataset.records[i]
        try:
            longest = max(longest, len(dataset.encoder.encode(record, dataset.base)["input_ids"]))
        except RecordError as e:
            by_reason[e.reason] += 1
            example.setdefault(e.reason, f"{record_name(record, i)}: {e}")
    skipped = sum(by_reason.values())
    return {"scanned": len(picks), "skipped": skipped, "by_reason": dict(by_reason), "example": example,
            "longest": longest}  # fmt: skip


def skip_report(scan: dict, total: int, max_length: int) -> str:
    """:func:`scan_skips` as the lines a run prints before it trains."""
    share = scan["skipped"] / max(1, scan["scanned"])
    head = (
        f"data: {scan['scanned']} of {total} records encoded before training; {scan['skipped']} "
        f"({share:.1%}) would be skipped"
    )
    if scan["scanned"] > scan["skipped"]:
        head += f"; the longest usable one has {scan['longest']} of --max-length {max_length} tokens"
    lines = [head]
    for reason, count in sorted(scan["by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason}: {count} ({count / scan['scanned']:.1%}), e.g. {scan['example'][reason]}")
    if "too long" in scan["by_reason"]:
        lines.append(
            "  large images make long records (Qwen2-VL: one token per 28x28 px, up to --max-pixels, "
            "12.8 MP by default): lower --max-pixels or raise --max-length"
        )
    return "\n".join(lines)


def _image_size(item: Path | ImageBytes) -> tuple[int, int] | None:
    """An image's size from its header: nothing is decoded."""
    try:
        with Image.open(io.BytesIO(item.data) if isinstance(item, ImageBytes) else item) as im:
            return im.size
    except Exception:  # a missing or broken image: the record is skipped when it is read
        return None


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Each text's token count (no special tokens added). A fast tokenizer's own batch encoder, called
    directly, is ~1.6x faster than the tokenizer's ``__call__``, which builds Python lists of every id,
    offset and mask; the counts are the same."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [len(e) for e in backend.encode_batch(texts, add_special_tokens=False)]


def record_lengths(records: Records, processor: VLProcessor, chunk: int = 1024) -> np.ndarray:
    """Each record's token count, image tokens included, for grouping batches by length: built once per
    input and processor (memory-mapped after). The image tokens follow the processor's own rule applied to
    a blank image of each size (read from the file's header, once per file; memoised per size), the text is
    the turns' tokens (:func:`token_counts`, a chunk of records per call) plus a few per turn for the chat
    template: close enough to group by, never used as a length."""
    identity = json.dumps(
        [processor.model_type, str(processor.tokenizer.name_or_path), len(processor.tokenizer),
         processor.image_processor.to_json_string()]
    )  # fmt: skip
    per_sizes: dict[tuple, int] = {}
    # Records often share an image file (several questions on one picture); bounded, as the files are millions.
    file_size = functools.lru_cache(maxsize=1 << 14)(_image_size)

    def image_tokens(sizes: tuple) -> int:
        if sizes not in per_sizes:
            blank = [Image.new("RGB", size) for size in sizes]
            try:
                per_sizes[sizes] = sum(processor.image_token_counts(processor.process_images(blank)))
            except ValueError:  # the processor refuses the size: the record will be skipped
                per_sizes[sizes] = 0
        return per_sizes[sizes]

    def size_of(item: Path | ImageBytes) -> tuple[int, int] | None:
        return _image_size(item) if isinstance(item, ImageBytes) else file_size(item)

    def build(tmp: Path) -> None:
        out = np.zeros(len(records), np.int32)
        for start in range(0, len(records), chunk):
            texts, extra = [], []
            for i in range(start, min(start + chunk, len(records))):
                record = records[i]
                turns = record.get("conversations") if isinstance(record, dict) else None
                turns = turns if isinstance(turns, list) else []
                texts.append(
                    "\n".join(
                        t["value"] for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)
                    )
                )
                try:
                    sizes = tuple(size_of(p) for p in image_paths(record, records.base(i)))
                except RecordError:
                    sizes = ()
                extra.append(4 * len(turns) + (image_tokens(sizes) if sizes and None not in sizes else 0))
            counts = token_counts(processor.tokenizer, texts)
            out[start : start + len(texts)] = [n + e for n, e in zip(counts, extra, strict=True)]
        with tmp.open("wb") as f:
            np.save(f, out)

    return records.cached_array("lengths-" + hashlib.sha256(identity.encode()).hexdigest()[:16], build)


def grouped_permutation(lengths: np.ndarray, span: int, g: torch.Generator, groups: int = 64) -> torch.Tensor:
    """A random order whose consecutive ``span``-sized runs hold records of similar length: the shuffled
    records are cut into groups of ``groups`` spans, each group sorted by length and cut into spans, and the
    whole spans shuffled again (the remainder, less than a span, goes last, where an epoch drops it)."""
    n = len(lengths)
    perm = torch.randperm(n, generator=g)
    by_length = torch.as_tensor(np.asarray(lengths, dtype=np.int64))[perm]
    pieces = []
    for start in range(0, n, span * groups):
        chunk = perm[start : start + span * groups]
        # Stable, longest first: ties keep the random order, so the result depends on the seed alone.
        order = torch.sort(by_length[start : start + span * groups], descending=True, stable=True).indices
        pieces.append(chunk[order])
    ordered = torch.cat(pieces)
    whole = n // span * span
    spans = ordered[:whole].reshape(-1, span)
    spans = spans[torch.randperm(len(spans), generator=g)]
    return torch.cat([spans.reshape(-1), ordered[whole:]])


def collate(items: list[dict | None], pad_id: int, padding_side: str = "right") -> dict | None:
    """Pads a list of encoded records into a batch; drops skipped (None) records."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    for x in items:
        x["attention_mask"] = torch.ones_like(x["input_ids"])
    pad_values = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
    width = max(len(x["input_ids"]) for x in items)
    batch = {}
    for key, value in pad_values.items():
        if key not in items[0]:
            continue
        rows = []
        for x in items:
            pad = width - len(x[key])
            rows.append(F.pad(x[key], (0, pad) if padding_side == "right" else (pad, 0), value=value))
        batch[key] = torch.stack(rows)
    with_images = [x for x in items if "pixel_values" in x]
    if with_images:
        pixels = [x["pixel_values"] for x in with_images]
        if pixels[0].dim() == 5:
            # Tile stacks [images, tiles, C, H, W] (LLaVA-OneVision): zero tiles pad each to the longest,
            # as the stock processor pads a batch; the model reads only each image's own tiles.
            most = max(p.shape[1] for p in pixels)
            pixels = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
        batch["pixel_values"] = torch.cat(pixels)
        for key in IMAGE_KEYS:
            if key in with_images[0]:
                batch[key] = torch.cat([x[key] for x in with_images])
    return batch


@dataclass
class BatchStream:
    """Endless, seeded, resumable order of record indices, sharded over processes.

    Each step consumes ``batch_size * world`` indices of one epoch's permutation and process
    ``rank`` takes its contiguous slice, so N processes x batch b see exactly the records that one
    process x batch N*b would (the invariant the distributed tests check). The position
    (epoch, cursor) is all a resume needs.

    With ``lengths`` the permutation is grouped by length in spans of one optimizer step's records
    (``batch_size * world * window``, ``window`` the micro-batches of a step): its micro-batches are
    consecutive slices of one span, so the invariant above holds with gradient accumulation too.
    """

    size: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    epoch: int = 0
    cursor: int = 0
    # Each record's length: when given, each step's records are of similar length (grouped_permutation).
    lengths: np.ndarray | None = None
    window: int = 1  # micro-batches per optimizer step: the grouping's span

    def __post_init__(self):
        if self.size < self.batch_size * self.world:
            raise ValueError(
                f"dataset has {self.size} records, fewer than one global batch ({self.batch_size * self.world})"
            )
        self._perm_epoch = None

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            if self.lengths is None:
                self._perm = torch.randperm(self.size, generator=g)
            else:
                span = self.batch_size * self.world * self.window
                self._perm = grouped_permutation(self.lengths[: self.size], span, g)
            self._perm_epoch = self.epoch
        return self._perm

    def next_indices(self) -> list[int]:
        span = self.batch_size * self.world
        if self.cursor + span > self.size:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor + self.rank * self.batch_size
        indices = self._permutation()[start : start + self.batch_size].tolist()
        self.cursor += span
        return indices

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
