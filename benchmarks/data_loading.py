"""Data loading at scale: today's in-memory loader against the records on disk (vlsi.data.store).

Generates LLaVA JSONL files with a realistic length mix (short VQA answers and long descriptions, one image
or none) at each ``--sizes`` count, then measures, each in a fresh process:

- ``rss_mb``: resident memory of a process once its records are ready (``today``: ``load_records``, the
  whole file as dicts; ``new``: ``Records`` on the cache built before), and their ratio at 1M;
- ``startup_s_cached``: a second start, the cache built (opening the records, not importing Python);
- ``padding_fraction_random`` / ``_grouped``: padding tokens / all tokens over an epoch of batches of 32,
  shuffled or grouped by length (``--group-by-length``), on the first size's records;
- ``loader_records_per_s`` (``DataLoader`` with 0 and 2 workers, encoding and collating) beside
  ``student_step_records_per_s`` (forward and backward of the tiny student on the same batches).

``--lengths-only N`` times the grouping's record lengths alone on N records, the earlier way against
today's, alternated in one run (``record_lengths_s``).

    python benchmarks/data_loading.py --out runs/data_loading.json --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the a red blue green square circle left right above below image shows small large near far".split()


def generate(path: Path, n: int, images: list[str], seed: int = 0) -> None:
    """Short VQA answers (most) and long descriptions (some), an image in 80% of records."""
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for i in range(n):
            long = rng.random() < 0.3
            answer = " ".join(rng.choices(WORDS, k=rng.randint(60, 200) if long else rng.randint(1, 20)))
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 25))) + "?"
            record = {
                "id": f"r{i}",
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            }
            if rng.random() < 0.8:
                record["image"] = rng.choice(images)
                record["conversations"][0]["value"] = "<image>\n" + question
            f.write(json.dumps(record) + "\n")
    tmp.replace(path)


PROBE = """
import json, re, resource, sys, time
import vlsi.data.records, vlsi.data.store, datasets  # a training process has these loaded anyway
start = time.perf_counter()
if sys.argv[1] == "today":
    records = vlsi.data.records.load_records(sys.argv[2])
else:
    records = vlsi.data.store.Records(sys.argv[2])
records[len(records) - 1]
ready = time.perf_counter() - start
# /proc, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak.
status = open("/proc/self/status").read()
rss, anon = (int(re.search(k + r":\\s+(\\d+)", status).group(1)) / 1024 for k in ("VmRSS", "RssAnon"))
print(json.dumps({"rss_mb": rss, "rss_anon_mb": anon, "seconds": ready}))
"""


def probe(which: str, path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, which, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def baseline_rss() -> float:
    code = "import resource, vlsi.data.records, vlsi.data.store, datasets; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def loader_and_step(path: Path, models: dict, batch: int, batches: int) -> dict:
    import torch

    from vlsi.data.processing import VLProcessor
    from vlsi.data.records import ChatDataset, Encoder, collate
    from vlsi.losses.tokens import response_cross_entropy
    from vlsi.model.loading import load_model

    processor = VLProcessor.from_pretrained(models["student"])
    dataset = ChatDataset(path, Encoder(processor, 4096))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[
        : batch * batches
    ].tolist()
    pad = processor.pad_token_id
    rates, lengths, padded = {}, [], 0
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, order),
            batch_size=batch,
            num_workers=workers,
            collate_fn=lambda items: collate(items, pad),
            prefetch_factor=4 if workers else None,
        )
        start, kept = time.perf_counter(), []
        for b in loader:
            kept.append(b)
        rates[str(workers)] = batch * batches / (time.perf_counter() - start)
    for b in kept:
        lengths.append(int(b["attention_mask"].sum()))
        padded += int(b["attention_mask"].numel())
    model = load_model(models["student"], dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    for b in kept:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits
        response_cross_entropy(logits, b["labels"]).backward()
        opt.step()
        opt.zero_grad()
    step_rate = batch * batches / (time.perf_counter() - start)
    return {
        "loader_records_per_s": {k: round(v, 1) for k, v in rates.items()},
        "student_step_records_per_s": round(step_rate, 1),
        "padding_fraction_random_encoded_batches": round(1 - sum(lengths) / padded, 4),
    }


def padding_fractions(path: Path, models: dict, batch: int = 32) -> dict:
    """Padding tokens / all tokens over one epoch of batches, shuffled vs grouped by length (the record
    lengths the grouping itself uses: text tokens plus image tokens by the processor's rule)."""
    import numpy as np

    from vlsi.data.processing import VLProcessor
    from vlsi.data.records import BatchStream, record_lengths
    from vlsi.data.store import Records

    records = Records(path)
    start = time.perf_counter()
    lengths = np.asarray(record_lengths(records, VLProcessor.from_pretrained(models["student"])))
    built = time.perf_counter() - start
    out = {"record_lengths_build_s": round(built, 1)}
    for name, grouped in (("random", None), ("grouped", lengths)):
        stream = BatchStream(len(records), batch, seed=0, lengths=grouped)
        real = padded = 0
        for _ in range(len(records) // batch):
            chunk = lengths[stream.next_indices()]
            real += int(chunk.sum())
            padded += int(chunk.max()) * batch
        out[f"padding_fraction_{name}"] = round(1 - real / padded, 4)
    return out


def lengths_before(records, processor) -> list[int]:
    """The record lengths as ``record_lengths`` computed them before it was made faster (kept here to measure
    against): the tokenizer's ``__call__`` on each chunk, every image's header read once per record."""
    from PIL import Image

    from vlsi.data.records import RecordError, _image_size, image_paths

    per_sizes, out = {}, []

    def image_tokens(sizes):
        if sizes not in per_sizes:
            blank = [Image.new("RGB", size) for size in sizes]
            per_sizes[sizes] = sum(processor.image_token_counts(processor.process_images(blank)))
        return per_sizes[sizes]

    for start in range(0, len(records), 1024):
        texts, extra = [], []
        for i in range(start, min(start + 1024, len(records))):
            record = records[i]
            turns = record.get("conversations") or []
            texts.append("\n".join(t["value"] for t in turns if isinstance(t.get("value"), str)))
            try:
                sizes = tuple(_image_size(p) for p in image_paths(record, records.base(i)))
            except RecordError:
                sizes = ()
            extra.append(4 * len(turns) + (image_tokens(sizes) if sizes and None not in sizes else 0))
        ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out += [len(t) + e for t, e in zip(ids, extra, strict=True)]
    return out


def length_timings(path: Path, models: dict, repeats: int = 2) -> dict:
    """Seconds to compute the grouping's record lengths of ``path``, before and after it was made faster,
    alternated on the same records (the best of ``repeats`` each: the machine is shared); the two must agree."""
    import os

    import numpy as np

    from vlsi.data.processing import VLProcessor
    from vlsi.data.records import record_lengths
    from vlsi.data.store import Records

    records = Records(path)
    processor = VLProcessor.from_pretrained(models["student"])
    times = {"before": [], "after": []}
    for _ in range(repeats):
        start = time.perf_counter()
        before = lengths_before(records, processor)
        times["before"].append(time.perf_counter() - start)
        # A fresh cache folder each time, so the lengths are computed, not read back.
        os.environ["VLSI_DATA_CACHE"] = tempfile.mkdtemp(prefix="vlsi-lengths-")
        start = time.perf_counter()
        after = np.asarray(record_lengths(records, processor))
        times["after"].append(time.perf_counter() - start)
        if before != after.tolist():
            raise AssertionError("the faster record lengths differ from the earlier ones")
    best = {k: min(v) for k, v in times.items()}
    return {
        "record_lengths_records": len(records),
        "record_lengths_s": {k: round(v, 2) for k, v in best.items()},
        "record_lengths_speedup": round(best["before"] / best["after"], 2),
        "record_lengths_s_each": {k: [round(t, 2) for t in v] for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="100000,1000000", help="record counts, comma-separated")
    parser.add_argument(
        "--skip-today-above", type=int, default=None, help="measure today's loader only up to this count"
    )
    parser.add_argument("--batches", type=int, default=8, help="batches of 32 for the loader and step rates")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the generated files (a temporary one)"
    )
    parser.add_argument(
        "--lengths-only",
        type=int,
        default=0,
        help="only time the grouping's record lengths, before and after their speed-up, on this many records",
    )
    args = parser.parse_args()

    import os

    from vlsi.model.tiny import TinyConfig
    from vlsi.model.tiny_models import build_tiny

    work = args.work or Path(tempfile.mkdtemp(prefix="vlsi-data-loading-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLSI_DATA_CACHE", str(work / "cache"))
    from PIL import Image

    images = []
    for k, size in enumerate([(64, 64), (96, 64), (48, 80)]):
        Image.new("RGB", size, (40 * k, 90, 200)).save(work / f"img{k}.png")
        images.append(f"img{k}.png")
    models = build_tiny(TinyConfig(out=str(work / "tiny")))
    if args.lengths_only:
        path = work / f"records_{args.lengths_only}.jsonl"
        if not path.exists():
            generate(path, args.lengths_only, images)
        result = length_timings(path, models)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    result = {
        "baseline_rss_mb": round(baseline_rss(), 1),
        "rss_mb": {"today": {}, "new": {}},
        "rss_anon_mb": {"today": {}, "new": {}},
        "build_s": {},
        "startup_s_cached": {},
    }
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        path = work / f"records_{n}.jsonl"
        if not path.exists():
            generate(path, n, images)
        start = time.perf_counter()
        probe("new", path)  # builds the cache
        result["build_s"][str(n)] = round(time.perf_counter() - start, 1)
        second = probe("new", path)
        result["rss_mb"]["new"][str(n)] = round(second["rss_mb"], 1)
        result["rss_anon_mb"]["new"][str(n)] = round(second["rss_anon_mb"], 1)
        result["startup_s_cached"][str(n)] = round(second["seconds"], 3)
        if args.skip_today_above is None or n <= args.skip_today_above:
            today = probe("today", path)
            result["rss_mb"]["today"][str(n)] = round(today["rss_mb"], 1)
            result["rss_anon_mb"]["today"][str(n)] = round(today["rss_anon_mb"], 1)
        print(json.dumps(result), flush=True)
    if "1000000" in result["rss_mb"]["today"]:
        result["rss_ratio_new_vs_today_1m"] = round(
            result["rss_mb"]["new"]["1000000"] / result["rss_mb"]["today"]["1000000"], 4
        )
    if "1000000" in result["startup_s_cached"]:
        result["startup_s_cached_1m"] = result["startup_s_cached"]["1000000"]
    result.update(loader_and_step(work / f"records_{sizes[0]}.jsonl", models, 32, args.batches))
    result.update(padding_fractions(work / f"records_{sizes[0]}.jsonl", models))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
