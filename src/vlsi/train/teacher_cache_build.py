"""``vlsi teacher-cache``: run the frozen teacher once over the data and store its verbalized distributions.

One inference pass without gradients (bf16 on GPUs that have it), the teacher placed as step 2 places it
(whole per process, or FSDP2-sharded decoder layers; not under ZeRO-3; :func:`vlsi.train.engines.prepare_frozen`),
writing the shards of :mod:`vlsi.train.teacher_cache`. Under ``accelerate launch`` process ``p`` writes shards
``p, p + world, ...``; every process runs the same number of forwards per round (a two-token stand-in when it
has nothing left), since a sharded teacher's forward is a collective. A shard's contents depend on its
records alone, so the cache is the one a single process writes; the index counts the records skipped in
every process's shards. Before it starts it prints the size
the cache will take, from the response tokens of the first records; a rerun of the same command skips the
shards already written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import save_file

from vlsi.data.pairs import TEACHER_INPUTS, PairEncoder
from vlsi.data.processing import ImageSize, VLProcessor
from vlsi.data.records import ChatDataset, Encoder, SkipLog, collate, scan_skips, skip_report
from vlsi.losses.chunked import _chunks, default_chunk_tokens
from vlsi.losses.sparse import SparseDist, sparse_from_logits
from vlsi.losses.tokens import IGNORE_INDEX, count_response_tokens, shift_labels
from vlsi.model.loading import check_pair
from vlsi.train.checkpointing import fingerprint as settings_hash
from vlsi.train.engines import refuse_frozen_under_zero3
from vlsi.train.interact import Reader, _load_teacher, teacher_response_states
from vlsi.train.runtime import make_accelerator, progress_bar
from vlsi.train.teacher_cache import (
    COMPARED_IDS_FILE,
    FINAL,
    FORMAT,
    INDEX_FILE,
    LOGP_DTYPES,
    bytes_per_token,
    content_fingerprint,
    file_sha,
    record_hash,
    shard_path,
    token_hash,
    write_json_atomic,
)

# Records encoded before the pass to estimate the response tokens, hence the size on disk.
SIZE_SAMPLE = 32


@dataclass(kw_only=True)
class TeacherCacheConfig(ImageSize):
    teacher: str = field(metadata={"help": "checkpoint path of the teacher"})
    teacher_verbalizers: str = field(metadata={"help": "the teacher's verbalizers ('vlsi verbalize-train')"})
    data: str = field(metadata={"help": "LLaVA-format JSON/JSONL file step 2 will train on"})
    out: str = field(metadata={"help": "cache directory (index.json and shard-*.safetensors)"})
    student: str = field(
        default="",
        metadata={
            "help": "the student, when it is of another family than the teacher: the cache then lines up with "
            "the student's rendering of each record and holds only the token ids both tokenizers share"
        },
    )
    top_k: int = field(default=64, metadata={"help": "token ids kept per response token and layer"})
    batch_size: int = field(default=8, metadata={"help": "records per teacher forward, per process"})
    shard_records: int = field(default=256, metadata={"help": "records per shard file"})
    max_length: int = field(default=2048, metadata={"help": "records longer than this are skipped"})
    image_root: str | None = field(default=None, metadata={"help": "image folder (default: the data file's)"})
    precision: str = field(
        default="auto", metadata={"help": "auto | bf16 | fp32 (auto: bf16 on GPUs with it)"}
    )
    kd_temperature: float = field(
        default=1.0, metadata={"help": "temperature of the stored distributions (step 2 must use the same)"}
    )
    vocab_width: int = field(
        default=0,
        metadata={
            "help": "vocabulary the distributions are over (0 = the teacher head's rows); set the student's "
            "head width when it is narrower, as step 2's shared vocabulary would"
        },
    )
    logp_dtype: str = field(
        default="float16", metadata={"help": "stored log-probabilities: float16 | float32"}
    )
    chunk_tokens: int = field(
        default=0,
        metadata={
            "help": "response tokens per [chunk, V] block of the head; 0 = by device, as step 2's "
            "--loss-chunk-tokens (vlsi.losses.chunked.default_chunk_tokens)"
        },
    )

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.batch_size < 1 or self.shard_records < 1 or self.chunk_tokens < 0:
            raise ValueError("--batch-size and --shard-records must be >= 1, --chunk-tokens >= 0")
        if self.kd_temperature <= 0:
            raise ValueError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        if self.logp_dtype not in LOGP_DTYPES:
            raise ValueError(f"--logp-dtype {self.logp_dtype!r} is not one of {', '.join(LOGP_DTYPES)}")


def _verbalizers_sha(path: str | Path) -> str:
    from vlsi.model.verbalizer import CONFIG_FILE, WEIGHTS_FILE

    return file_sha(Path(path) / WEIGHTS_FILE) + file_sha(Path(path) / CONFIG_FILE)


def _stand_in(pad_id: int, device) -> dict:
    """A two-token batch without response tokens: this process's share of a collective forward."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    zeros = torch.zeros_like(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": zeros,
            "labels": torch.full_like(ids, IGNORE_INDEX)}  # fmt: skip


def _topk(read, key, states: torch.Tensor, cfg: TeacherCacheConfig, width: int, keep=None) -> SparseDist:
    """The top-k buckets of one layer's verbalized distribution, ``[chunk, V]`` logits at a time; over the
    ids ``keep`` (a cross-family pair's shared ones, stored as 0..K-1) when given."""
    features = read.features(key, states)
    chunks = _chunks(len(features), cfg.chunk_tokens) or [slice(0, 0)]
    cut = (lambda z: z[:, :width]) if keep is None else (lambda z: z.index_select(1, keep.to(z.device)))
    logits = (cut(read.head(features[rows])) for rows in chunks)
    return SparseDist.cat([sparse_from_logits(z, cfg.top_k, cfg.kd_temperature, len(z) or 1) for z in logits])


def _write_shard(path: Path, rows: list[dict], keys: list, k: int, logp_dtype: str, fingerprint: str) -> int:
    """One shard from its records' rows, written to a temporary name and renamed when whole."""
    dtype = LOGP_DTYPES[logp_dtype]
    counts = [len(r["teacher"][FINAL]) if r["teacher"] else 0 for r in rows]
    offsets = torch.tensor([0, *counts]).cumsum(0)
    present = [r["teacher"] for r in rows if r["teacher"]]
    tensors = {
        "offsets": offsets,
        "ok": torch.tensor([r["teacher"] is not None for r in rows], dtype=torch.uint8),
        "record_hash": torch.stack([r["record_hash"] for r in rows]),
        "token_hash": torch.stack([r["token_hash"] for r in rows]),
    }
    if present:
        per_key = [SparseDist.cat([t[key] for t in present]) for key in keys]
        tensors["ids"] = torch.stack([d.ids for d in per_key], 1).to(torch.int32)
        tensors["logp"] = torch.stack([d.logp for d in per_key], 1).to(dtype)
        if per_key[0].tail is not None:
            tensors["tail"] = torch.stack([d.tail for d in per_key], 1).float()
    else:  # every record of the shard was skipped
        tensors["ids"] = torch.zeros(0, len(keys), k, dtype=torch.int32)
        tensors["logp"] = torch.zeros(0, len(keys), k, dtype=dtype)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": fingerprint}
    )
    tmp.replace(path)
    return int(offsets[-1])


def _settings(cfg: TeacherCacheConfig, processor, layers: list[int], width: int) -> dict:
    """What the cache depends on: its fingerprint, which a rerun or step 2 must find the same."""
    config_file = Path(cfg.teacher) / "config.json"
    return {
        **content_fingerprint(processor, cfg.data),
        "verbalizers": _verbalizers_sha(cfg.teacher_verbalizers),
        "teacher_config": file_sha(config_file) if config_file.exists() else str(cfg.teacher),
        "layers": layers,
        "top_k": min(cfg.top_k, width),
        "width": width,
        "kd_temperature": cfg.kd_temperature,
        "max_length": cfg.max_length,
        "logp_dtype": cfg.logp_dtype,
    }


def _open_index(accelerator, cfg: TeacherCacheConfig, settings: dict, n: int) -> dict:
    """The index of an unfinished cache, written unless a rerun finds it; a cache of other settings at
    ``--out`` is refused. Returns the index."""
    out, fp = Path(cfg.out), settings_hash(settings)
    plan = {"format": FORMAT, "complete": False, "fingerprint": fp.settings, "fingerprint_hash": str(fp),
            "records": n, "shard_records": cfg.shard_records, "shards": math.ceil(n / cfg.shard_records),
            "data_path": str(cfg.data), "teacher_path": str(cfg.teacher)}  # fmt: skip
    index_file = out / INDEX_FILE
    if index_file.exists():
        old = json.loads(index_file.read_text())
        if old.get("fingerprint_hash") != str(fp) or old.get("shard_records") != cfg.shard_records:
            changed = sorted(k for k in settings if old.get("fingerprint", {}).get(k) != fp.settings[k])
            raise ValueError(
                f"{out} holds a teacher cache built with other settings ({', '.join(changed) or 'shard_records'} "
                "differ); use another --out or remove it"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not index_file.exists():
            write_json_atomic(index_file, plan)
    accelerator.wait_for_everyone()
    return plan


def _announce_size(accelerator, dataset: ChatDataset, plan: dict, settings: dict, per_token: int) -> None:
    """The size the cache will take, from the response tokens of the first records."""
    n, layers = len(dataset), settings["layers"]
    # Not counted as skips: each process counts those of its own shards (_all_skips).
    sample = [x for x in (dataset.encode(i)[0] for i in range(min(SIZE_SAMPLE, n))) if x is not None]
    mean_tokens = sum(count_response_tokens(x["labels"][None]) for x in sample) / max(1, len(sample))
    estimate = mean_tokens * n * per_token
    if accelerator.is_main_process:
        print(
            f"teacher-cache: {n} records in {plan['shards']} shards, {len(layers) + 1} distributions per "
            f"response token (layers {layers} and final), top-{settings['top_k']} of {settings['width']}: "
            f"{per_token} bytes per response token; about {mean_tokens:.0f} response tokens per record "
            f"(first {len(sample)}): ~{estimate / 2**30:.2f} GiB",
            flush=True,
        )


def _teacher_rows(
    accelerator, read: Reader, kept: list[dict], cfg: TeacherCacheConfig, width: int, pad_id: int, keep=None
):
    """Per record of ``kept`` (this process's share of one forward), its response tokens' distributions by
    key, on the CPU. With nothing to process, a stand-in keeps a sharded teacher's collective forward going."""
    if kept:
        # A cross-family teacher reads its own encoding of each record (vlsi.data.pairs).
        kept = [x.get(TEACHER_INPUTS, x) for x in kept]
        batch = {k: v.to(accelerator.device) for k, v in collate(kept, pad_id).items()}
    elif accelerator.num_processes > 1:
        batch = _stand_in(pad_id, accelerator.device)
    else:
        return []
    layers = read.verbalizers.layers
    with torch.no_grad(), accelerator.autocast():
        states = teacher_response_states(read.backbone, layers, batch)
        dists = {key: _topk(read, key, states[key], cfg, width, keep) for key in [*layers, FINAL]}
    per_record = (shift_labels(batch["labels"]) != IGNORE_INDEX).sum(1).tolist()
    bounds = torch.tensor([0, *per_record]).cumsum(0).tolist()
    return [
        {key: d[bounds[j] : bounds[j + 1]].to("cpu") for key, d in dists.items()} for j in range(len(kept))
    ]


def _shard_rows(
    accelerator, read: Reader, dataset: ChatDataset, records: range, cfg, width: int, pad_id: int, bar, keep
):
    """One shard's rows; every process runs the same number of forwards, ``records`` empty or not."""
    rows = []
    for f in range(math.ceil(cfg.shard_records / cfg.batch_size)):
        indices = records[f * cfg.batch_size : (f + 1) * cfg.batch_size]
        items = [dataset[i] for i in indices]
        kept = [x for x in items if x is not None]
        teacher = iter(_teacher_rows(accelerator, read, kept, cfg, width, pad_id, keep))
        for i, item in zip(indices, items, strict=True):
            rows.append(
                {
                    "record_hash": record_hash(dataset.records[i]),
                    "teacher": None if item is None else next(teacher),
                    "token_hash": token_hash(item) if item is not None else torch.zeros(8, dtype=torch.uint8),
                }
            )
        bar.update(len(indices) * accelerator.num_processes)
    return rows


def _all_skips(accelerator, dataset: ChatDataset) -> dict:
    """The records skipped by every process (each encoded the records of its own shards), by reason: what
    one process building every shard counts."""
    every = SkipLog()
    for part in gather_object([dict(dataset.skips.counts)]):
        every.counts.update(part)
    return every.summary()


def _check_shards(out: Path, shards: int, fp: str) -> dict:
    """The finished cache's response tokens and bytes; a shard of another build is refused."""
    tokens = 0
    for s in range(shards):
        with safe_open(str(shard_path(out, s)), framework="pt") as f:
            if f.metadata().get("fingerprint") != fp:
                raise ValueError(f"{shard_path(out, s)} was written by another cache build; remove it")
            tokens += int(f.get_tensor("offsets")[-1])
    size = sum(shard_path(out, s).stat().st_size for s in range(shards))
    return {"response_tokens": tokens, "bytes": size, "bytes_per_response_token": size / max(1, tokens)}


def build_teacher_cache(cfg: TeacherCacheConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.precision, 0)
    refuse_frozen_under_zero3(accelerator, "building a teacher cache")
    if not cfg.chunk_tokens:
        cfg = dataclasses.replace(cfg, chunk_tokens=default_chunk_tokens(accelerator.device))
    processor = teacher_processor = VLProcessor.from_pretrained(cfg.teacher, **cfg.pixel_bounds())
    encoder, keep = Encoder(processor, cfg.max_length), None
    pair = check_pair(cfg.teacher, cfg.student) if cfg.student else None
    if pair is not None and pair.cross_family:
        # Rows line up with the student's rendering; the fingerprint is the student's, as step 2 checks it.
        processor = VLProcessor.from_pretrained(cfg.student, **cfg.pixel_bounds())
        encoder = PairEncoder(Encoder(processor, cfg.max_length), encoder)
        keep = pair.vocab.keep
    dataset = ChatDataset(cfg.data, encoder, cfg.image_root)
    if accelerator.is_main_process:  # before the teacher loads: the share of records the cache will skip
        print(skip_report(scan_skips(dataset), len(dataset), cfg.max_length), flush=True)
    teacher, verbalizers = _load_teacher(cfg, accelerator)
    read = Reader(teacher, verbalizers)
    keys = [*verbalizers.layers, FINAL]
    width = cfg.vocab_width or teacher.vocab_size
    if keep is not None:
        width = len(keep)
    elif not 0 < width <= teacher.vocab_size:
        raise ValueError(
            f"--vocab-width {width} must lie in 1..{teacher.vocab_size} (the teacher head's rows)"
        )
    settings = _settings(cfg, processor, verbalizers.layers, width)
    if keep is not None:
        settings["compared_ids"] = hashlib.sha256(keep.numpy().tobytes()).hexdigest()
    fp = str(settings_hash(settings))
    plan = _open_index(accelerator, cfg, settings, len(dataset))
    if keep is not None and accelerator.is_main_process:  # what the stored ids 0..K-1 stand for
        save_file({"ids": keep.contiguous()}, str(out / COMPARED_IDS_FILE))
    per_token = bytes_per_token(len(keys), cfg.top_k, width, cfg.logp_dtype)
    _announce_size(accelerator, dataset, plan, settings, per_token)

    # Process p writes shards p, p + world, ...: one round is one shard per process.
    n, per_shard, shards = len(dataset), cfg.shard_records, plan["shards"]
    world, rank = accelerator.num_processes, accelerator.process_index
    done = {s for s in range(shards) if shard_path(out, s).exists()}
    bar = progress_bar(accelerator, n, min(n, len(done) * per_shard), "teacher-cache")
    for start in range(0, shards, world):
        mine = start + rank
        todo = mine < shards and mine not in done
        if not todo and all(s in done or s >= shards for s in range(start, start + world)):
            continue  # the whole round is written: no process runs a forward
        records = range(mine * per_shard, min(n, (mine + 1) * per_shard)) if todo else range(0)
        pad_id = teacher_processor.pad_token_id
        rows = _shard_rows(accelerator, read, dataset, records, cfg, width, pad_id, bar, keep)
        if todo:
            _write_shard(shard_path(out, mine), rows, keys, settings["top_k"], cfg.logp_dtype, fp)
    bar.close()
    accelerator.wait_for_everyone()

    summary = {
        "records": n,
        "shards": shards,
        "bytes_per_token": per_token,
        **_all_skips(accelerator, dataset),
    }
    if accelerator.is_main_process:
        summary |= _check_shards(out, shards, fp)
        write_json_atomic(out / INDEX_FILE, {**plan, "complete": True, **summary, "settings": asdict(cfg)})
    accelerator.wait_for_everyone()
    return summary
