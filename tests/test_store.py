"""Records on disk (vlsi.data.store): the cache built once per input, the published formats (parquet with
image bytes, save_to_disk folders, messages), mixtures, and training from each."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from test_resume import _kill_after_first_checkpoint, _rows

from vlsi.data.records import ChatDataset, DataFileError, Encoder
from vlsi.data.store import Records, cache_root
from vlsi.run.cli import main

datasets = pytest.importorskip("datasets")


def _synth_records(synth_data, n=None):
    records = json.loads((synth_data / "train.json").read_text())
    return records[:n] if n else records


def _as_rows(records, synth_data, messages=False):
    """The synth records as a published set stores them: image bytes inside, optionally as messages."""
    rows = []
    for r in records:
        image = {"bytes": (synth_data / r["image"]).read_bytes(), "path": r["image"]}
        if messages:
            turns = [
                {
                    "role": {"human": "user", "gpt": "assistant"}[t["from"]],
                    "content": [{"type": "text", "text": t["value"].replace("<image>", "").strip("\n")}],
                }
                for t in r["conversations"]
            ]
            turns[0]["content"].insert(0, {"type": "image", "text": None})
            rows.append({"id": r["id"], "image": image, "messages": turns})
        else:
            rows.append({"id": r["id"], "image": image, "conversations": r["conversations"]})
    return rows


def _features(messages):
    from datasets import Features, Image, Value

    turn = (
        {"role": Value("string"), "content": [{"type": Value("string"), "text": Value("string")}]}
        if messages
        else {"from": Value("string"), "value": Value("string")}
    )
    return Features(
        {"id": Value("string"), "image": Image(), ("messages" if messages else "conversations"): [turn]}
    )


def write_parquet_shards(records, synth_data, folder, messages=False, shards=2):
    folder.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(_as_rows(records, synth_data, messages), features=_features(messages))
    for k in range(shards):
        ds.shard(shards, k, contiguous=True).to_parquet(str(folder / f"train-{k:05d}.parquet"))
    return folder


def write_saved(records, synth_data, folder, messages=True):
    ds = datasets.Dataset.from_list(_as_rows(records, synth_data, messages), features=_features(messages))
    ds.save_to_disk(str(folder))
    return folder


def _same_item(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_json_cache_is_built_once_and_rebuilt_when_the_file_changes(tmp_path, synth_data):
    data = tmp_path / "d.jsonl"
    records = _synth_records(synth_data, 5)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    first = Records(data)
    assert (
        len(first) == 5 and first[3] == records[3] and first[-1] == records[4] and first[1:3] == records[1:3]
    )
    built = sorted(cache_root().glob("json-*.arrow"))
    stamps = {p: p.stat().st_mtime_ns for p in built}
    again = Records(data)
    assert again[2] == records[2]
    assert {p: p.stat().st_mtime_ns for p in cache_root().glob("json-*.arrow")} == stamps  # nothing rebuilt
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    assert len(Records(data)) == 4
    assert len(list(cache_root().glob("json-*.arrow"))) == len(built) + 1


def test_a_file_that_does_not_parse_fails_naming_the_line_and_leaves_no_cache(tmp_path, processor):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{"id": 2\n')
    before = set(cache_root().glob("*"))
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: invalid JSONL"):
        ChatDataset(bad, Encoder(processor))
    assert {p for p in set(cache_root().glob("*")) - before if not p.name.endswith(".lock")} == set()


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_published_formats_encode_as_the_llava_file_does(tmp_path, synth_data, processor, kind):
    """Image bytes inside parquet shards (LLaVA turns) or a save_to_disk folder (messages) give the very
    tensors the LLaVA JSON with image files gives."""
    records = _synth_records(synth_data, 6)
    if kind == "parquet":
        path = write_parquet_shards(records, synth_data, tmp_path / "shards")
    else:
        path = write_saved(records, synth_data, tmp_path / "saved")
    encoder = Encoder(processor)
    reference = ChatDataset(synth_data / "train.json", encoder)
    published = ChatDataset(path, encoder)
    assert len(published) == 6
    for i in range(6):
        _same_item(published[i], reference[i])
    assert published.skips.total == 0


def test_a_bad_row_of_a_published_set_is_skipped_named_and_counted(tmp_path, synth_data, processor, caplog):
    rows = _as_rows(_synth_records(synth_data, 3), synth_data)
    rows[1]["image"] = {"bytes": b"not an image", "path": "x.png"}
    rows[2]["conversations"] = rows[2]["conversations"][:1]  # no assistant turn
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows, features=_features(False)).save_to_disk(str(folder))
    ds = ChatDataset(folder, Encoder(processor))
    items = [ds[i] for i in range(3)]
    assert items[0] is not None and items[1] is None and items[2] is None
    assert ds.skips.summary()["skipped_by_reason"] == {"unreadable image": 1, "no assistant ('gpt') turn": 1}
    assert "record 1 (id" in caplog.text and "x.png" in caplog.text


def _mixture(tmp_path, synth_data, first_weight=2.0, seed=0):
    """Two sources: 10 LLaVA records with image files (each twice) and 7 drawn of 20 parquet rows."""
    records = _synth_records(synth_data)
    for r in records:
        r.pop("skill", None)
    (tmp_path / "a.json").write_text(json.dumps(records[:10]))
    if not (tmp_path / "b").exists():
        write_parquet_shards(records[10:30], synth_data, tmp_path / "b", shards=2)
    spec = {
        "seed": seed,
        "sources": [
            {"path": "a.json", "weight": first_weight, "image_root": str(synth_data)},
            {"path": "b", "samples": 7, "image_root": None, "skill": "grid"},
        ],
    }
    path = tmp_path / f"mix-{seed}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, records


def test_a_mixture_draws_each_source_from_its_seed(tmp_path, synth_data, processor):
    path, records = _mixture(tmp_path, synth_data)
    mix = Records(path)
    assert len(mix) == 2 * 10 + 7
    ids = [mix[i]["id"] for i in range(len(mix))]
    assert ids[:20] == [r["id"] for r in records[:10]] * 2  # weight 2: every record twice
    drawn = ids[20:]
    assert len(set(drawn)) == 7 and set(drawn) <= {r["id"] for r in records[10:30]}
    assert all(mix[i]["skill"] == "grid" for i in range(20, 27)) and "skill" not in mix[0]
    assert [Records(path)[i]["id"] for i in range(len(mix))] == ids  # the same draw again
    other, _ = _mixture(tmp_path, synth_data, seed=1)
    assert [Records(other)[i]["id"] for i in range(20, 27)] != drawn
    described = mix.describe()
    assert described["mixture_seed"] == 0 and [s["drawn"] for s in described["sources"]] == [20, 7]
    ds = ChatDataset(path, Encoder(processor))
    assert all(ds[i] is not None for i in (0, 19, 20, 26))  # image files for one, bytes for the other


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"sources": []}, "expected 'sources:'"),
        ({"sources": [{"path": "a.json", "weight": 1, "samples": 2}]}, "both 'weight' and 'samples'"),
        ({"sources": [{"path": "a.json", "wieght": 1}]}, "unknown keys"),
        ({"sources": [{"path": "a.json"}], "shuffle": True}, "unknown keys"),
    ],
)
def test_a_bad_mixture_is_refused_naming_the_problem(tmp_path, spec, message):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(DataFileError, match=message):
        Records(path)


def _rss_mb_after_opening(path) -> float:
    # /proc, not getrusage: ru_maxrss survives exec, so the child would report pytest's own peak.
    code = (
        "import re, sys; from vlsi.data.store import Records; r = Records(sys.argv[1]); r[len(r) - 1]; "
        "print(int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


@pytest.mark.slow  # subprocesses measuring their memory
def test_resident_memory_does_not_grow_with_the_record_count(tmp_path):
    """Opening 100x more records costs (almost) no more memory: they stay on disk."""
    record = {
        "id": "x",
        "conversations": [{"from": "human", "value": "q " * 50}, {"from": "gpt", "value": "a " * 400}],
    }
    sizes = {}
    for n in (1_000, 100_000):
        path = tmp_path / f"{n}.jsonl"
        line = json.dumps(record) + "\n"
        path.write_text(line * n)  # ~100 MB at 100k
        _rss_mb_after_opening(path)  # builds the cache
        sizes[n] = _rss_mb_after_opening(path)
    assert sizes[100_000] - sizes[1_000] < 20, sizes


def _train(command, data, out, models, verbalizers, steps=2, extra=()):
    if command == "sft":
        args = ["sft", "--model", str(models["student"])]
    else:
        args = [
            "interact",
            "--teacher",
            str(models["teacher"]),
            "--teacher-verbalizers",
            str(verbalizers["teacher"]),
            "--student",
            str(models["student"]),
            "--student-verbalizers",
            str(verbalizers["student"]),
        ]
    args += ["--data", str(data), "--out", str(out), "--max-steps", str(steps), "--batch-size", "2"]
    return main([*args, "--save-every", "2", "--lr", "1e-3", *extra])


@pytest.mark.slow  # a few sft and interact steps from each input kind
@pytest.mark.parametrize("kind", ["parquet", "saved", "mixture"])
def test_each_input_kind_trains_sft_and_interact(tmp_path, synth_data, tiny_models, verbalizers, kind):
    records = _synth_records(synth_data, 12)
    if kind == "parquet":
        data = write_parquet_shards(records, synth_data, tmp_path / "shards")
    elif kind == "saved":
        data = write_saved(records, synth_data, tmp_path / "saved")
    else:
        data, _ = _mixture(tmp_path, synth_data)
    for command in ("sft", "interact"):
        out = tmp_path / command
        assert _train(command, data, out, tiny_models, verbalizers) == 0
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["steps"] == 2 and summary["skipped"] == 0
        assert json.loads((out / "data.json").read_text())["records"] == summary["records"]
    if kind == "mixture":
        assert [s["drawn"] for s in summary["data"]["sources"]] == [20, 7]


@pytest.mark.slow  # a run killed with SIGKILL, resumed, and one never interrupted
def test_a_killed_run_over_a_mixture_resumes_to_the_same_losses_and_weights(
    tmp_path, synth_data, tiny_models, verbalizers
):
    from safetensors.torch import load_file

    data, _ = _mixture(tmp_path, synth_data)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    common = ["--data", str(data), "--max-steps", "4", "--save-every", "1", "--log-every", "1"]
    common += ["--batch-size", "2", "--lr", "1e-3", "--seed", "5"]
    args = ["sft", "--model", str(tiny_models["student"]), *common]
    assert main([*args, "--out", str(reference)]) == 0
    died_after = _kill_after_first_checkpoint([*args, "--out", str(run)], run)
    assert died_after < 4
    assert main([*args, "--out", str(run)]) == 0
    want, got = _rows(reference / "train_log.jsonl"), _rows(run / "train_log.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    a, b = load_file(reference / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_record_lengths_count_image_tokens_by_the_processors_rule(tmp_path, synth_data, processor):
    from vlsi.data.records import record_lengths

    dataset = ChatDataset(synth_data / "train.json", Encoder(processor))
    lengths = record_lengths(dataset.records, processor)
    real = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert len(lengths) == len(real)
    for estimate, n in zip(lengths.tolist(), real, strict=True):
        assert abs(estimate - n) <= 0.15 * n, (estimate, n)
    images = [int((dataset[i]["input_ids"] == processor.image_token_id).sum()) for i in range(3)]
    assert min(images) > 0 and all(lengths[i] > images[i] for i in range(3))
    assert np.array_equal(record_lengths(dataset.records, processor), lengths)  # the cached array


def _padding(order, lengths, span):
    batches = order[: len(order) // span * span].reshape(-1, span)
    widths = lengths[batches].max(1)
    return 1 - lengths[batches].sum() / (widths.sum() * span)


def test_length_grouped_order_pads_little_and_resumes_exactly():
    from vlsi.data.records import BatchStream, grouped_permutation

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 60, 700), rng.integers(300, 900, 300)]).astype(np.int32)
    g = torch.Generator().manual_seed(1)
    grouped = grouped_permutation(lengths, 32, g).numpy()
    assert sorted(grouped.tolist()) == list(range(1000))
    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).numpy()
    assert _padding(grouped, lengths, 32) < 0.1 < _padding(random_order, lengths, 32)
    assert np.array_equal(grouped_permutation(lengths, 32, torch.Generator().manual_seed(1)).numpy(), grouped)

    stream = BatchStream(1000, 8, seed=3, rank=1, world=2, lengths=lengths)
    for _ in range(70):  # past an epoch's end
        stream.next_indices()
    saved = stream.state()
    want = [stream.next_indices() for _ in range(5)]
    again = BatchStream(1000, 8, seed=3, rank=1, world=2, lengths=lengths)
    again.load(saved)
    assert [again.next_indices() for _ in range(5)] == want
    plain = BatchStream(1000, 8, seed=3, rank=1, world=2)
    assert (
        plain.next_indices() != BatchStream(1000, 8, seed=3, rank=1, world=2, lengths=lengths).next_indices()
    )


@pytest.mark.slow  # two short training runs
def test_group_by_length_is_on_by_default_and_off_with_a_flag(tmp_path, synth_data, tiny_models):
    args = ["sft", "--model", str(tiny_models["student"]), "--data", str(synth_data / "train.json")]
    args += ["--max-steps", "2", "--batch-size", "4", "--log-every", "1"]
    assert main([*args, "--out", str(tmp_path / "plain"), "--no-group-by-length"]) == 0
    assert main([*args, "--out", str(tmp_path / "grouped")]) == 0
    plain, grouped = (_rows(tmp_path / name / "train_log.jsonl") for name in ("plain", "grouped"))
    assert [r["step"] for r in grouped] == [1, 2] and plain[0]["loss"] != grouped[0]["loss"]


@pytest.mark.slow  # two short training runs
def test_a_checkpoint_from_before_length_grouping_resumes_in_its_own_order(tmp_path, synth_data, tiny_models):
    """A checkpoint written before ``group_by_length`` existed (its settings and fingerprint without it) is
    read as off, and the run goes on ungrouped under today's default (on) instead of being refused."""
    from vlsi.train.checkpointing import fingerprint

    args = ["sft", "--model", str(tiny_models["student"]), "--data", str(synth_data / "train.json")]
    args += ["--max-steps", "3", "--batch-size", "4", "--log-every", "1", "--save-every", "1"]
    reference, old = tmp_path / "reference", tmp_path / "old"
    assert main([*args, "--out", str(reference), "--no-group-by-length"]) == 0
    shutil.copytree(reference / "checkpoints" / "step-0000001", old / "checkpoints" / "step-0000001")
    state_file = old / "checkpoints" / "step-0000001" / "state.json"
    state = json.loads(state_file.read_text())
    del state["settings"]["group_by_length"]  # as the run before the option wrote it
    state["fingerprint"] = str(fingerprint(state["settings"]))
    state_file.write_text(json.dumps(state))
    shutil.copy(reference / "train_log.jsonl", old / "train_log.jsonl")

    # Read so, the checkpoint still refuses a run whose other settings differ.
    assert main([*args, "--out", str(old), "--lr", "5e-3"]) == 2
    assert main([*args, "--out", str(old)]) == 0  # today's default: grouped, but the run started plain
    assert _rows(old / "train_log.jsonl") == _rows(reference / "train_log.jsonl")


@pytest.mark.slow  # a short training run
def test_report_to_tensorboard_writes_the_loss_parts(tmp_path, synth_data, tiny_models, verbalizers):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    extra = ["--report-to", "tensorboard", "--log-every", "1"]
    assert _train("interact", synth_data / "train.json", out, tiny_models, verbalizers, extra=extra) == 0
    events = EventAccumulator(str(out / "tracker" / "interact"))  # the run's own folder (hparams: a sub-run)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "il", "ll", "ar", "lr", "tokens_per_s", "skipped"} <= tags, tags
    logged = _rows(out / "train_log.jsonl")
    assert [e.step for e in events.Scalars("il")] == [1, 2]
    assert [e.value for e in events.Scalars("il")] == pytest.approx([r["il"] for r in logged])
