"""A cached verbalized teacher: what step 2 needs of the frozen teacher, stored once, read at every rerun.

``vlsi teacher-cache`` (:mod:`vlsi.train.teacher_cache_build`) runs the teacher once over the data and writes, for
every response token of every record, the top-k token ids and log-probabilities of each teacher target
layer's verbalizer and of the final output, plus the log of the mass outside them (:mod:`vlsi.losses.sparse`).
``vlsi interact --teacher-cache DIR`` then trains without loading the teacher at all.

Layout of ``DIR``:

- ``index.json``: the format, the fingerprint (below), the number of records and records per shard, and,
  once every shard is written, ``complete: true`` with the totals. Written atomically (temporary file, then
  rename), first as a plan and last as the seal.
- ``shard-NNNNN.safetensors``: the records ``N * shard_records`` onwards, in data-file order, each written
  to a temporary name and renamed when whole, so a killed run leaves only whole shards and a rerun of the
  same command writes just the missing ones. Tensors: ``ids [T, L, k]`` int32, ``logp [T, L, k]``
  (float16 by default), ``tail [T, L]`` float32 (absent when k covers the vocabulary), where T counts the
  shard's response tokens and L is the teacher layers then "final"; per record ``offsets [R + 1]`` into T,
  ``ok [R]`` (0: the record was skipped, as training would skip it), ``record_hash [R, 8]`` (its JSON) and
  ``token_hash [R, 8]`` (its input ids and labels).

The fingerprint covers the tokenizer, the chat template, the image processor, the data file, the teacher's
verbalizers and config, the target layers, k, the vocabulary width and the temperature. A run whose
student disagrees is refused before training with the reason, naming the records of the data file that
changed; every record is also checked as it is loaded (its tokens against ``token_hash``), so a record
that would be paired with another record's teacher never reaches the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlsi.data.loading import BuildBatch, build_next
from vlsi.data.records import ChatDataset, record_name
from vlsi.data.store import Records
from vlsi.losses.sparse import SparseDist
from vlsi.losses.tokens import count_response_tokens
from vlsi.losses.vocab import SharedVocab

__all__ = [
    "INDEX_FILE",
    "TeacherCache",
    "bytes_per_token",
    "is_complete",
    "content_fingerprint",
    "record_hash",
    "shard_path",
    "token_hash",
    "write_json_atomic",
]

FORMAT = 1
INDEX_FILE = "index.json"
# A cross-family teacher's cache: the token ids its distributions are over (vlsi.losses.vocab), in order.
COMPARED_IDS_FILE = "compared_ids.safetensors"
FINAL = "final"
# Records whose tokens are checked against the cache before the first step, spread over the file.
VERIFY_BEFORE_TRAINING = 64
LOGP_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def shard_path(root: Path, shard: int) -> Path:
    return Path(root) / f"shard-{shard:05d}.safetensors"


def write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: str | Path) -> str:
    """A file's digest; a folder's (parquet shards, ``save_to_disk``) covers each file's name and bytes."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _bytes_digest(value):
    """Images stored in the data (parquet, save_to_disk) enter a record's hash by their digest."""
    if isinstance(value, bytes | bytearray):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def record_hash(record) -> torch.Tensor:
    """8 bytes of the record's JSON, key order ignored: names the records a changed data file changed."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, default=_bytes_digest).encode()
    return torch.frombuffer(bytearray(hashlib.sha256(blob).digest()[:8]), dtype=torch.uint8)


def token_hash(item: dict) -> torch.Tensor:
    """8 bytes of an encoded record's input ids and labels: what the cached rows line up with."""
    h = hashlib.sha256(item["input_ids"].to(torch.int64).numpy().tobytes())
    h.update(item["labels"].to(torch.int64).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()[:8]), dtype=torch.uint8)


def content_fingerprint(processor, data: str | Path) -> dict:
    """What the data's tokens depend on besides the records: tokenizer, chat template, image processor,
    and the data file itself."""
    tok = processor.tokenizer
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = {r: getattr(tok, r, None) for r in ("bos_token", "eos_token", "pad_token", "unk_token")}
    tokenizer = json.dumps({"vocab": vocab, "special": special}, sort_keys=True, default=str)
    image = processor.image_processor.to_dict()
    image.pop("processor_class", None)
    return {
        "tokenizer": _sha(tokenizer.encode()),
        "chat_template": _sha((tok.chat_template or "").encode()),
        "image_processor": _sha(json.dumps(image, sort_keys=True, default=str).encode()),
        "data": file_sha(data),
    }


def bytes_per_token(layers: int, k: int, width: int, logp_dtype: str) -> int:
    """Disk bytes per response token: ids (int32) and log-probabilities per layer and id, one tail each."""
    k = min(k, width)
    per_value = torch.tensor([], dtype=LOGP_DTYPES[logp_dtype]).element_size()
    return layers * (k * (4 + per_value) + (4 if k < width else 0))


def is_complete(root: str | Path) -> bool:
    """Whether ``root`` holds a finished cache (a marker for ``vlsi distill``'s stages)."""
    index = Path(root) / INDEX_FILE
    return index.exists() and bool(json.loads(index.read_text()).get("complete"))


class TeacherCache:
    """A finished cache, opened for reading: per-record teacher buckets, checked against the records."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_file = self.root / INDEX_FILE
        if not index_file.exists():
            raise FileNotFoundError(
                f"{self.root}: no {INDEX_FILE}; not a teacher cache ('vlsi teacher-cache')"
            )
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(
                f"{index_file}: cache format {self.index.get('format')!r}, this vlsi reads {FORMAT}"
            )
        if not self.index.get("complete"):
            done = sum(shard_path(self.root, s).exists() for s in range(self.index["shards"]))
            raise ValueError(
                f"{self.root}: an unfinished teacher cache ({done} of {self.index['shards']} shards); "
                "rerun the same 'vlsi teacher-cache' command to finish it"
            )
        fp = self.index["fingerprint"]
        self.layers: list[int] = list(fp["layers"])
        self.keys: list[int | str] = [*self.layers, FINAL]
        self.width, self.top_k, self.temperature = fp["width"], fp["top_k"], fp["kd_temperature"]
        self.shard_records = self.index["shard_records"]
        self._files: dict[int, object] = {}
        self._meta: dict[int, dict[str, torch.Tensor]] = {}
        # A cross-family cache's stored ids 0..K-1 stand for these; the student's rows are reordered to match.
        compared = self.root / COMPARED_IDS_FILE
        self.vocab = SharedVocab(load_file(str(compared))["ids"] if compared.exists() else None)

    def __len__(self) -> int:
        return self.index["records"]

    # --- before training -------------------------------------------------------------------------------

    def check(self, processor, data: str | Path, kd_temperature: float, student_width: int) -> None:
        """Refuse, before training, a run the cache does not fit; the message lists every reason."""
        fp, now = self.index["fingerprint"], content_fingerprint(processor, data)
        problems = []
        for key, what in (
            ("tokenizer", "the student's tokenizer"),
            ("chat_template", "the student's chat template"),
            ("image_processor", "the student's image processor"),
        ):
            if fp[key] != now[key]:
                problems.append(f"{what} differs from the teacher's the cache was built with")
        if fp["data"] != now["data"]:
            problems.append(self._changed_records(data))
        if kd_temperature != self.temperature:
            problems.append(
                f"--kd-temperature {kd_temperature} but the cache holds the teacher at {self.temperature} "
                "(a tempered tail cannot be derived from a cached one); rebuild it with --kd-temperature"
            )
        if student_width < self.width:
            problems.append(
                f"the student's head has {student_width} rows, the cache's vocabulary {self.width}; rebuild "
                f"it with --vocab-width {student_width}"
            )
        if problems:
            raise ValueError(f"teacher cache {self.root} does not fit this run:\n  " + "\n  ".join(problems))

    def _changed_records(self, data: str | Path, limit: int = 5) -> str:
        records = Records(data)
        cached = torch.cat([self._shard_meta(s)["record_hash"] for s in range(self.index["shards"])])
        changed = [
            i
            for i in range(min(len(records), len(cached)))
            if not torch.equal(record_hash(records[i]), cached[i])
        ]
        named = ", ".join(record_name(records[i], i) for i in changed[:limit])
        more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
        counts = (
            f"; it has {len(records)} records, the cache {len(cached)}" if len(records) != len(cached) else ""
        )
        where = f": {named}{more} changed" if changed else ""
        return f"{data} is not the data file the cache was built from{where}{counts}"

    def verify(self, dataset: ChatDataset, limit: int = VERIFY_BEFORE_TRAINING) -> int:
        """Encode up to ``limit`` records spread over the file and check each against the cache; returns
        how many were checked. The rest are checked as training loads them."""
        n = len(dataset)
        picks = sorted({i * n // limit for i in range(limit)} if n > limit else range(n))
        for i in picks:
            item = dataset[i]
            if item is not None:
                self.teacher_for(dataset, i, item)
        return len(picks)

    # --- reading -----------------------------------------------------------------------------------------

    def _file(self, shard: int):
        if shard not in self._files:
            path = shard_path(self.root, shard)
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing shard of a cache marked complete")
            # Kept open: reads slice one record's rows out of the file without loading the shard.
            self._files[shard] = safe_open(str(path), framework="pt")
        return self._files[shard]

    def _shard_meta(self, shard: int) -> dict[str, torch.Tensor]:
        if shard not in self._meta:
            f = self._file(shard)
            self._meta[shard] = {k: f.get_tensor(k) for k in ("offsets", "ok", "record_hash", "token_hash")}
        return self._meta[shard]

    def teacher_for(self, dataset: ChatDataset, index: int, item: dict) -> dict[int | str, SparseDist]:
        """The cached teacher of record ``index`` of ``dataset``, after checking that ``item`` (its encoding
        for this run) has the tokens the cache was built on; otherwise a ValueError naming the record."""
        name = f"{record_name(dataset.records[index], index)} of {dataset.path}"
        if index >= len(self):
            raise ValueError(f"{name}: the teacher cache {self.root} holds only {len(self)} records")
        shard, row = divmod(index, self.shard_records)
        meta = self._shard_meta(shard)
        if not meta["ok"][row]:
            raise ValueError(
                f"{name}: skipped when the teacher cache {self.root} was built (see its log), but usable now; "
                "rebuild the cache with this run's --max-length and --image-root"
            )
        lo, hi = int(meta["offsets"][row]), int(meta["offsets"][row + 1])
        n = count_response_tokens(item["labels"][None])
        if n != hi - lo or not torch.equal(token_hash(item), meta["token_hash"][row]):
            raise ValueError(
                f"{name}: its tokens do not line up with the teacher cache {self.root} ({n} response tokens "
                f"here, {hi - lo} cached); it was built with another tokenizer, chat template, image "
                "processor or data file"
            )
        f = self._file(shard)
        ids = f.get_slice("ids")[lo:hi].long()
        logp = f.get_slice("logp")[lo:hi].float()
        tail = f.get_slice("tail")[lo:hi] if "tail" in f.keys() else None
        return {
            key: SparseDist(ids[:, j], logp[:, j], None if tail is None else tail[:, j], self.width)
            for j, key in enumerate(self.keys)
        }

    def build(self, pad_id: int) -> CachedTeacherBatch:
        """How step 2 builds a batch on this cache (in the training process or a ``DataLoader`` worker)."""
        return CachedTeacherBatch(pad_id, cache=self)

    def next_batch(self, stream, dataset: ChatDataset, pad_id: int) -> dict:
        """:func:`vlsi.data.loading.build_next` with the batch's cached teacher under ``"teacher"``: one
        :class:`SparseDist` per layer key, rows in the order :func:`vlsi.model.verbalizer.response_states` gives
        the batch's response states (record by record, each in position order)."""
        return build_next(stream, dataset, self.build(pad_id))

    def __getstate__(self):
        # A worker opens the shard files itself: safetensors' handles do not cross processes.
        return {k: v for k, v in self.__dict__.items() if k != "_files"} | {"_files": {}}


@dataclass
class CachedTeacherBatch(BuildBatch):
    """A batch with its records' cached teacher (:meth:`TeacherCache.next_batch`)."""

    cache: TeacherCache | None = None

    def batch(self, dataset: ChatDataset, kept: list[tuple[int, dict]]) -> dict | None:
        teachers = [self.cache.teacher_for(dataset, i, item) for i, item in kept]
        batch = self.collate_fn([item for _, item in kept], self.pad_id)
        batch["teacher"] = {key: SparseDist.cat([t[key] for t in teachers]) for key in self.cache.keys}
        return batch
