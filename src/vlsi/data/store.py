"""Records on disk: every input, whatever its format, read through one memory-mapped 🤗 datasets table.

A run of millions of records cannot hold them as Python dicts (~6 KB each, in every process). Each input
is turned once into Arrow (``datasets``' format: memory-mapped, so the page cache is shared by every
process on a node) and then read a row at a time; only the rows a batch asks for become dicts.

Inputs (``--data`` / ``train_data``):

- LLaVA JSON (a list) or JSONL: validated line by line while the cache is built (a line that is not JSON
  fails at once, naming it); each record is stored as its JSON text, so it reads back exactly as written.
  The cache is keyed by the file's path, size and modification time and built once under a file lock: the
  first process builds it, the others (and every later step) open it.
- parquet (one file, or a folder of shards) and folders written by ``Dataset.save_to_disk``: the field's
  published sets, images inside as ``{"bytes", "path"}`` structs (as ``datasets.Image`` stores them), as
  paths or as lists of either; conversations as LLaVA ``from``/``value`` turns or as ``messages`` with
  ``role``/``content``. Rows are read raw (images stay bytes until a batch decodes them) and normalised
  to the LLaVA record shape.
- a mixture (``.yaml``): ``sources: [{path, weight | samples, image_root, skill}]`` and an optional
  ``seed`` (0); each source contributes ``samples`` records, or ``weight`` x its size (2.0: every record
  twice), drawn from that seed. The seed is the mixture's own, not the run's: every step reading the file
  (a teacher cache built for step 2 included) sees the same records at the same indices. The draw
  (source, row) is cached beside the other caches and memory-mapped too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

# Bumped when the cached layout changes, so old caches are not read as new ones.
CACHE_VERSION = 1
ROWS_PER_CHUNK = 8192


class DataFileError(ValueError):
    """The file as a whole cannot be read."""


def cache_root() -> Path:
    """Where built inputs live: ``$VLSI_DATA_CACHE``, else a ``vlsi`` folder in the datasets cache."""
    if os.environ.get("VLSI_DATA_CACHE"):
        return Path(os.environ["VLSI_DATA_CACHE"])
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "vlsi"


def input_kind(path: Path) -> str:
    if path.suffix in (".yaml", ".yml"):
        return "mixture"
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "saved"
        if any(path.rglob("*.parquet")):
            return "parquet"
        raise DataFileError(f"{path}: a folder with neither a save_to_disk dataset nor parquet files")
    if path.suffix == ".parquet":
        return "parquet"
    return "json"


def _file_key(paths: list[Path], *extra) -> str:
    parts = [CACHE_VERSION, *extra]
    for p in paths:
        st = p.stat()
        parts += [str(p.resolve()), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _built_once(target: Path, build) -> Path:
    """``target`` built by ``build(tmp_path)`` exactly once across processes (a file lock; written under a
    temporary name and renamed, so a killed build never leaves a half cache)."""
    from filelock import FileLock

    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            try:
                build(tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(target)
    return target


# ---------------------------------------------------------------- LLaVA JSON / JSONL


def iter_json_records(path: Path) -> Iterator[str]:
    """Each record of a JSON list or JSONL file as compact JSON text; fails naming the line of the first
    line that does not parse. JSONL is streamed; a JSON list is parsed whole (once, while building)."""
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(records, list):
            raise DataFileError(f"{path}: expected a JSON list of records or JSONL")
        for r in records:
            yield json.dumps(r, ensure_ascii=False)
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: invalid JSONL line: {e.msg}") from None
            yield json.dumps(record, ensure_ascii=False)


def _build_json(source: Path, target: Path) -> None:
    import pyarrow as pa

    schema = pa.schema([("record", pa.large_string())])
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        chunk: list[str] = []
        for text in iter_json_records(source):
            chunk.append(text)
            if len(chunk) == ROWS_PER_CHUNK:
                writer.write_batch(pa.record_batch([pa.array(chunk, pa.large_string())], schema=schema))
                chunk = []
        if chunk:
            writer.write_batch(pa.record_batch([pa.array(chunk, pa.large_string())], schema=schema))


def _open_json(path: Path):
    import datasets

    target = cache_root() / f"json-{_file_key([path])}.arrow"
    _built_once(target, lambda tmp: _build_json(path, tmp))
    return datasets.Dataset.from_file(str(target))


# ---------------------------------------------------------------- parquet and save_to_disk


def _open_parquet(path: Path):
    import datasets

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    # datasets writes its Arrow cache once per set of files (and reuses it, locked between processes).
    cache = cache_root() / f"parquet-{_file_key(files)}"
    try:
        return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache))
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataFileError(f"{path}: cannot read parquet: {e}") from None


def _open_saved(path: Path):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataFileError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    return ds


def _message_text(content):
    """A ``messages`` turn's content as LLaVA text: typed parts joined, each image part an ``<image>``."""
    if not isinstance(content, list):
        return content
    pieces = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image":
            pieces.append("<image>")
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            return content  # not a known part: to_messages names the turn as malformed
    return "".join(pieces)


def normalize_row(row: dict) -> dict:
    """A row of a published set in the LLaVA record shape: ``conversations`` (from ``messages`` if need be)
    and ``image`` (a path, a ``{"bytes", "path"}`` struct, or a list of them; absent when there is none)."""
    record = {k: v for k, v in row.items() if k not in ("messages", "images")}
    if record.get("conversations") is None and row.get("messages") is not None:
        messages = row["messages"]
        record["conversations"] = (
            [
                {"from": m.get("role"), "value": _message_text(m.get("content"))}
                if isinstance(m, dict)
                else m
                for m in messages
            ]
            if isinstance(messages, list)
            else messages
        )
    image = row.get("image", row.get("images"))
    if image is None or (isinstance(image, list) and not image):
        record.pop("image", None)
    else:
        record["image"] = image
    return record


# ---------------------------------------------------------------- one source, many sources


@dataclass
class Source:
    """One input: its table (``datasets.Dataset``, memory-mapped) and how its rows become records."""

    path: Path
    dataset: object
    base: Path  # where relative image paths are resolved
    json_text: bool  # rows are records' JSON text (LLaVA files), else rows to normalise
    skill: str | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def table(self):
        if not hasattr(self, "_table"):
            ds = self.dataset
            if getattr(ds, "_indices", None) is not None:
                ds = ds.flatten_indices()
            self._table = ds.data.table
            self._column = self._table.column("record") if self.json_text else None
        return self._table

    def row(self, i: int) -> dict:
        table = self.table()
        if self.json_text:
            record = json.loads(self._column[i].as_py())
        else:
            record = normalize_row(table.slice(i, 1).to_pylist()[0])
        if self.skill is not None and isinstance(record, dict) and "skill" not in record:
            record["skill"] = self.skill
        return record

    def __getstate__(self):
        # DataLoader workers and pickles reopen the memory map rather than copying it.
        return {k: v for k, v in self.__dict__.items() if k not in ("_table", "_column")}


def open_source(path: str | Path, image_root: str | Path | None = None, skill: str | None = None) -> Source:
    path = Path(path)
    kind = input_kind(path)
    if kind == "mixture":
        raise DataFileError(f"{path}: a mixture cannot name another mixture")
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    opener = {"json": _open_json, "parquet": _open_parquet, "saved": _open_saved}[kind]
    dataset = opener(path)
    default_base = path if path.is_dir() else path.parent
    base = Path(image_root) if image_root else default_base
    return Source(path, dataset, base, kind == "json", skill)


def read_mixture(path: Path) -> tuple[list[dict], int]:
    """The mixture file's sources, checked (each a path with a weight or a sample count, not both), and
    its draw seed."""
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataFileError(f"{path}: invalid YAML: {e}") from None
    sources = spec.get("sources") if isinstance(spec, dict) else None
    if not isinstance(sources, list) or not sources:
        raise DataFileError(f"{path}: expected 'sources:', a list of {{path, weight | samples, ...}}")
    unknown = set(spec) - {"sources", "seed"}
    if unknown:
        raise DataFileError(f"{path}: unknown keys {sorted(unknown)} (a mixture has 'sources' and 'seed')")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int):
        raise DataFileError(f"{path}: 'seed' must be an integer")
    checked = []
    for i, s in enumerate(sources):
        if not isinstance(s, dict) or not s.get("path"):
            raise DataFileError(f"{path}: source {i} needs a 'path'")
        unknown = set(s) - {"path", "weight", "samples", "image_root", "skill"}
        if unknown:
            raise DataFileError(f"{path}: source {i} has unknown keys {sorted(unknown)}")
        if "weight" in s and "samples" in s:
            raise DataFileError(f"{path}: source {i} gives both 'weight' and 'samples'")
        weight = s.get("weight", 1.0)
        samples = s.get("samples")
        if samples is not None and (not isinstance(samples, int) or samples < 0):
            raise DataFileError(f"{path}: source {i}: 'samples' must be a count >= 0")
        if not isinstance(weight, int | float) or weight < 0:
            raise DataFileError(f"{path}: source {i}: 'weight' must be a number >= 0")
        src = Path(s["path"])
        # Relative paths are the mixture file's, as a recipe's are.
        src = src if src.is_absolute() else path.parent / src
        root = s.get("image_root")
        root = None if root is None else (Path(root) if Path(root).is_absolute() else path.parent / root)
        checked.append(
            {"path": src, "weight": weight, "samples": samples, "image_root": root, "skill": s.get("skill")}
        )
    return checked, seed


def draw_counts(sizes: list[int], specs: list[dict]) -> list[int]:
    return [
        s["samples"] if s["samples"] is not None else round(s["weight"] * n)
        for n, s in zip(sizes, specs, strict=True)
    ]


def draw_rows(size: int, count: int, seed: int, source: int) -> np.ndarray:
    """``count`` rows of a source of ``size``: every row ``count // size`` times, then the rest drawn
    without replacement, in row order (the run's own shuffle orders them)."""
    if count and not size:
        raise DataFileError(f"mixture source {source} is empty but asked for {count} records")
    rng = np.random.default_rng([seed, source])
    whole, rest = divmod(count, size) if size else (0, 0)
    extra = np.sort(rng.choice(size, rest, replace=False)) if rest else np.empty(0, np.int64)
    return np.concatenate([np.tile(np.arange(size, dtype=np.int64), whole), extra.astype(np.int64)])


class Records(Sequence):
    """The records of an input, read on demand: ``records[i]`` is a fresh dict; ``len`` and slicing as a list.

    ``base(i)`` is where record ``i``'s relative image paths are found; ``describe()`` what was read (for a
    mixture: each source, its size and how many records it gave), written into the run's records.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None):
        self.path = Path(path)
        if input_kind(self.path) != "mixture":
            self.sources = [open_source(self.path, image_root)]
            self.specs = None
            self._index = None
            self.key = f"{self.sources[0].dataset._fingerprint}-{image_root}"
            return
        if not self.path.exists():
            raise DataFileError(f"{self.path}: no such file")
        self.specs, self.seed = read_mixture(self.path)
        seed = self.seed
        self.sources = [open_source(s["path"], s["image_root"], s["skill"]) for s in self.specs]
        sizes = [len(s) for s in self.sources]
        self.counts = draw_counts(sizes, self.specs)
        key = hashlib.sha256(
            json.dumps(
                [CACHE_VERSION, seed, sizes, self.counts, [str(s.path.resolve()) for s in self.sources]]
            ).encode()
        ).hexdigest()[:20]

        def build(tmp: Path) -> None:
            rows = [draw_rows(n, c, seed, i) for i, (n, c) in enumerate(zip(sizes, self.counts, strict=True))]
            which = np.concatenate([np.full(len(r), i, np.int64) for i, r in enumerate(rows)])
            with tmp.open("wb") as f:
                np.save(f, np.stack([which, np.concatenate(rows)], axis=1))

        self.key = key + "-" + "-".join(s.dataset._fingerprint for s in self.sources)
        target = _built_once(cache_root() / f"mixture-{key}.npy", build)
        self._index = np.load(target, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.sources[0]) if self._index is None else len(self._index)

    def _locate(self, i: int) -> tuple[Source, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._index is None:
            return self.sources[0], i
        which, row = self._index[i]
        return self.sources[int(which)], int(row)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        source, row = self._locate(i)
        return source.row(row)

    def base(self, i: int) -> Path:
        return self._locate(i)[0].base

    def cached_array(self, name: str, build) -> np.ndarray:
        """A per-record array derived from these records (``build(tmp_path)`` writes it with ``np.save``),
        built once like the records themselves and memory-mapped."""
        digest = hashlib.sha256(f"{CACHE_VERSION}-{self.key}-{name}".encode()).hexdigest()[:20]
        return np.load(_built_once(cache_root() / f"array-{digest}.npy", build), mmap_mode="r")

    def describe(self) -> dict:
        if self._index is None:
            return {"data": str(self.path), "records": len(self)}
        return {
            "data": str(self.path),
            "records": len(self),
            "mixture_seed": self.seed,
            "sources": [
                {
                    "path": str(spec["path"]),
                    "size": len(source),
                    "drawn": count,
                    **{k: spec[k] for k in ("weight", "samples") if spec[k] is not None},
                    "image_root": None if spec["image_root"] is None else str(spec["image_root"]),
                    "skill": spec["skill"],
                }
                for spec, source, count in zip(self.specs, self.sources, self.counts, strict=True)
            ],
        }
