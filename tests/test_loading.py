"""Batches built in DataLoader workers (vlsi.data.loading, --num-workers): the same batches in the same order
as in the training process, the stream's position that of the last batch taken (so a resume is exact),
and the skipped records counted by the training process."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_resume import _kill_after_first_checkpoint, _rows

from vlsi.data.loading import BatchLoader, BuildBatch
from vlsi.data.records import BatchStream, ChatDataset, Encoder, record_lengths
from vlsi.run.cli import main

WORKERS = 2


@pytest.fixture(scope="module")
def with_bad_records(tmp_path_factory, synth_data):
    """The synth training set, its images beside it, with records training skips: a missing image, a broken
    one and an empty conversation, spread over the file."""
    folder = tmp_path_factory.mktemp("bad") / "synth"
    shutil.copytree(synth_data, folder)
    records = json.loads((folder / "train.json").read_text())
    (folder / "broken.png").write_bytes(b"not an image")
    bad = [
        {**records[0], "id": "missing", "image": "nowhere.png"},
        {**records[1], "id": "broken", "image": "broken.png"},
        {"id": "empty", "conversations": []},
    ]
    for k, record in enumerate(bad):
        records.insert(7 + 13 * k, record)
    path = folder / "train_with_bad.json"
    path.write_text(json.dumps(records))
    return path


def _same_batch(a, b):
    assert a.keys() == b.keys() and a.record_ids == b.record_ids
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _batches(loader, stream, dataset, n):
    """``n`` batches and the stream's position after each."""
    out = []
    for _ in range(n):
        out.append((loader(stream, dataset), stream.state()))
    loader.close()
    return out


@pytest.mark.parametrize("grouped", [False, True])
def test_worker_batches_equal_in_process_batches(with_bad_records, processor, grouped):
    def dataset_and_stream():
        dataset = ChatDataset(with_bad_records, Encoder(processor, 256))
        lengths = record_lengths(dataset.records, processor) if grouped else None
        return dataset, BatchStream(len(dataset), 4, seed=2, lengths=lengths, window=2)

    build = BuildBatch(processor.pad_token_id)
    steps = 14  # past the end of an epoch (27 records: 6 batches)
    here, here_stream = dataset_and_stream()
    want = _batches(BatchLoader(build), here_stream, here, steps)
    there, there_stream = dataset_and_stream()
    got = _batches(BatchLoader(build, WORKERS, prefetch_factor=3), there_stream, there, steps)
    for (a, a_state), (b, b_state) in zip(got, want, strict=True):
        _same_batch(a, b)
        assert a_state == b_state  # the position of the last batch taken, not of the last one prefetched
    assert there_stream.epoch == 2
    # Counted in the training process, though the workers found them: each bad record once.
    assert there.skips.summary() == here.skips.summary()
    assert here.skips.summary()["skipped"] > 0


def test_worker_batches_resume_from_the_position_of_the_last_batch_taken(with_bad_records, processor):
    dataset = ChatDataset(with_bad_records, Encoder(processor, 256))
    build = BuildBatch(processor.pad_token_id)
    whole = _batches(BatchLoader(build), BatchStream(len(dataset), 4, seed=5), dataset, 9)
    stream = BatchStream(len(dataset), 4, seed=5)
    loader = BatchLoader(build, WORKERS)
    first = _batches(loader, stream, dataset, 4)  # the workers have built more than these four
    again = BatchStream(len(dataset), 4, seed=5)
    again.load(first[-1][1])  # what a checkpoint after the fourth batch holds
    rest = _batches(BatchLoader(build, WORKERS), again, dataset, 5)
    for (a, _), (b, _) in zip(first + rest, whole, strict=True):
        _same_batch(a, b)


def test_workers_restart_where_the_stream_was_moved(with_bad_records, processor):
    # A loader whose stream is moved by something else (a resume loading its position) follows it.
    dataset = ChatDataset(with_bad_records, Encoder(processor, 256))
    build = BuildBatch(processor.pad_token_id)
    stream, loader = BatchStream(len(dataset), 4, seed=1), BatchLoader(build, WORKERS)
    loader(stream, dataset)
    stream.load({"epoch": 0, "cursor": 20})
    got = loader(stream, dataset)
    loader.close()
    reference = BatchStream(len(dataset), 4, seed=1, cursor=20)
    _same_batch(got, BatchLoader(build)(reference, dataset))
    assert stream.state() == reference.state()


def test_worker_settings_are_checked():
    with pytest.raises(ValueError, match="--num-workers"):
        BatchLoader(BuildBatch(0), -1)


def _sft(model, data, out, options=""):
    args = f"--max-steps 4 --batch-size 4 --log-every 1 --lr 1e-3 --save-every 2 {options}"
    return ["sft", "--model", str(model), "--data", str(data), "--out", str(out), *args.split()]


@pytest.mark.slow  # three short sft runs, one killed and resumed
def test_sft_with_workers_trains_and_resumes_as_in_process(tmp_path, tiny_models, with_bad_records):
    model = tiny_models["student"]
    assert main(_sft(model, with_bad_records, tmp_path / "here")) == 0
    assert main(_sft(model, with_bad_records, tmp_path / "workers", f"--num-workers {WORKERS}")) == 0
    want = _rows(tmp_path / "here" / "train_log.jsonl")
    assert _rows(tmp_path / "workers" / "train_log.jsonl") == want  # the very same batches: equal losses
    summaries = [json.loads((tmp_path / r / "train_summary.json").read_text()) for r in ("here", "workers")]
    assert summaries[1]["skipped_by_reason"] == summaries[0]["skipped_by_reason"]
    assert summaries[0]["skipped"] > 0  # the bad records were in these batches

    # Killed after its first checkpoint and started again, with workers both times: the same losses.
    args = _sft(model, with_bad_records, tmp_path / "killed", f"--num-workers {WORKERS} --save-every 1")
    died_after = _kill_after_first_checkpoint(args, tmp_path / "killed")
    assert died_after < 4
    assert main(args) == 0
    got = _rows(tmp_path / "killed" / "train_log.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_grouped_batches_keep_the_records_of_a_step_across_accumulation():
    # Grouped in spans of an optimizer step's records: batch 4 x accumulation 2 and batch 8 see the same.
    lengths = np.random.default_rng(0).integers(10, 500, 200).astype(np.int32)
    big = BatchStream(200, 8, seed=4, lengths=lengths)
    small = BatchStream(200, 4, seed=4, lengths=lengths, window=2)
    for _ in range(30):
        assert sorted(big.next_indices()) == sorted(small.next_indices() + small.next_indices())


@pytest.mark.slow  # two short step-1 runs
def test_verbalize_train_with_workers_trains_as_in_process(tmp_path, tiny_models, with_bad_records):
    args = ["verbalize-train", "--model", str(tiny_models["student"]), "--data", str(with_bad_records)]
    args += ["--max-steps", "3", "--batch-size", "4", "--log-every", "1"]
    assert main([*args, "--out", str(tmp_path / "here")]) == 0
    assert main([*args, "--out", str(tmp_path / "workers"), "--num-workers", str(WORKERS)]) == 0
    assert _rows(tmp_path / "workers" / "train_log.jsonl") == _rows(tmp_path / "here" / "train_log.jsonl")
