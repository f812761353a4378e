import json
import logging

import pytest
import torch
from PIL import Image

from vlsi.data.records import (
    IGNORE_INDEX,
    BatchStream,
    ChatDataset,
    DataFileError,
    Encoder,
    RecordError,
    collate,
    load_records,
    scan_skips,
    skip_report,
)


def _record(rid="r1", image="a.png", turns=None):
    turns = turns or [("human", "<image>\nWhat colour is the shape at the center?"), ("gpt", "red")]
    rec = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def _labelled_text(processor, enc):
    ids = [
        t
        for t, lab in zip(enc["input_ids"].tolist(), enc["labels"].tolist(), strict=True)
        if lab != IGNORE_INDEX
    ]
    return processor.tokenizer.decode(ids)


def test_labels_cover_exactly_the_assistant_turns(processor, folder):
    rec = _record(
        turns=[
            ("human", "<image>\nWhat is at the top left?"),
            ("gpt", "red circle"),
            ("human", "How many shapes are there?"),
            ("gpt", "three"),
        ]
    )
    enc = Encoder(processor).encode(rec, folder)
    assert _labelled_text(processor, enc) == "red circle<|im_end|>three<|im_end|>"
    # The image expands to one placeholder per merged visual token: 48 px / 16 px per token = 3 x 3.
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == 9
    assert enc["mm_token_type_ids"].sum() == 9
    assert enc["pixel_values"].shape[0] == 36 and enc["image_grid_thw"].tolist() == [[1, 6, 6]]


def test_text_only_record_and_missing_placeholder(processor, folder):
    enc = Encoder(processor).encode(_record(image=None, turns=[("human", "Hi"), ("gpt", "yes")]), folder)
    assert "pixel_values" not in enc and _labelled_text(processor, enc) == "yes<|im_end|>"
    # LLaVA data often leaves out <image> for single-image records: the image is put first.
    enc = Encoder(processor).encode(_record(turns=[("human", "What is it?"), ("gpt", "red")]), folder)
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == 9


@pytest.mark.parametrize(
    "record, message",
    [
        (_record(image="missing.png"), "image not found"),
        (_record(image="broken.png"), "unreadable image"),
        (
            _record(turns=[("human", "<image>\n<image>\nTwo?"), ("gpt", "no")]),
            "2 '<image>' placeholders but 1",
        ),
        (_record(turns=[("human", "<image>\nQ?")]), "no assistant"),
        (_record(turns=[("human", "<image>\nQ?"), ("gpt", "  ")]), "empty assistant turn"),
        (_record(turns=[("human", "<image>\nQ?"), ("robot", "x")]), "unknown speaker"),
        ({"id": "x", "image": "a.png", "conversations": []}, "missing or empty"),
        ({"id": "x", "image": "a.png", "conversations": [{"from": "human"}]}, "string 'value'"),
        ("just a string", "not a JSON object"),
    ],
)
def test_bad_records_raise_record_error_naming_the_problem(processor, folder, record, message):
    with pytest.raises(RecordError, match=message):
        Encoder(processor).encode(record, folder)


def test_too_long_record_is_rejected(processor, folder):
    with pytest.raises(RecordError, match="too long"):
        Encoder(processor, max_length=10).encode(_record(), folder)


def test_dataset_skips_and_counts_bad_records_with_a_named_warning(processor, folder, caplog):
    records = [_record("good"), _record("gone", image="missing.png"), _record("bad", turns=[("human", "x")])]
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    ds = ChatDataset(path, Encoder(processor))
    with caplog.at_level(logging.WARNING, logger="vlsi.data.records"):
        items = [ds[i] for i in range(len(ds))] + [ds[1]]  # a second visit must not double count
    assert items[0] is not None and items[1] is None and items[2] is None
    assert ds.skips.total == 2
    assert ds.skips.summary()["skipped_by_reason"] == {"image not found": 1, "no assistant ('gpt') turn": 1}
    assert "record 1 (id 'gone')" in caplog.text and "image not found" in caplog.text
    batch = collate(items, processor.pad_token_id)
    assert batch["input_ids"].shape[0] == 1


def test_the_skip_scan_counts_by_reason_over_the_whole_file_without_touching_the_run(processor, folder):
    long_turns = [("human", "<image>\n" + "word " * 200), ("gpt", "red")]
    records = [_record(f"r{i}") for i in range(30)]
    records[3] = _record("gone", image="missing.png")
    records[24] = _record("long", turns=long_turns)
    records[28] = _record("long2", turns=long_turns)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    ds = ChatDataset(path, Encoder(processor, max_length=100))
    scan = scan_skips(ds, limit=10)
    # Ten records spread over the 30 (every third): the last third of the file is sampled too.
    assert scan["scanned"] == 10 and scan["skipped"] == 2
    assert scan["by_reason"] == {"image not found": 1, "too long": 1}
    assert ds.skips.total == 0  # the run's own count starts at zero
    assert scan_skips(ds)["by_reason"] == {"image not found": 1, "too long": 2}
    report = skip_report(scan, len(ds), 100)
    assert report.startswith("data: 10 of 30 records encoded before training; 2 (20.0%) would be skipped")
    assert "too long: 1 (10.0%), e.g. record 24 (id 'long'): too long: " in report
    assert "image not found: 1 (10.0%), e.g. record 3 (id 'gone')" in report and "--max-pixels" in report


def test_invalid_json_fails_at_once_with_the_line_number(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"id": 1},\n  {"id": 2,,}\n]')
    with pytest.raises(DataFileError, match=r"bad.json:3: invalid JSON"):
        load_records(bad)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:3: invalid JSONL"):
        load_records(bad_lines)
    with pytest.raises(DataFileError, match="no such file"):
        load_records(tmp_path / "nope.json")
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 1}\n{"id": 2}\n')
    assert [r["id"] for r in load_records(good)] == [1, 2]


def test_collate_pads_right_for_training_and_left_for_generation(processor, folder):
    enc = Encoder(processor)
    short = enc.encode(_record(image=None, turns=[("human", "Hi"), ("gpt", "yes")]), folder)
    long = enc.encode(_record(), folder)
    pad = processor.pad_token_id
    right = collate([short, long, None], pad)
    n = len(short["input_ids"])
    assert right["input_ids"].shape == (2, len(long["input_ids"]))
    assert right["attention_mask"][0, :n].all() and not right["attention_mask"][0, n:].any()
    assert (right["labels"][0, n:] == IGNORE_INDEX).all() and (right["input_ids"][0, n:] == pad).all()
    assert right["pixel_values"].shape[0] == 36  # only the record with an image contributes
    left = collate([short, long], pad, padding_side="left")
    assert left["attention_mask"][0, -n:].all() and not left["attention_mask"][0, :-n].any()
    assert torch.equal(left["input_ids"][0, -n:], short["input_ids"])
    assert collate([None, None], pad) is None


def test_batch_stream_is_seeded_sharded_and_resumable():
    one = BatchStream(size=10, batch_size=4, seed=1)
    ranks = [BatchStream(size=10, batch_size=2, seed=1, rank=r, world=2) for r in range(2)]
    for _ in range(5):  # crosses epochs (drop-last at 8 of 10)
        assert one.next_indices() == ranks[0].next_indices() + ranks[1].next_indices()
    state = one.state()
    expected = [one.next_indices() for _ in range(3)]
    again = BatchStream(size=10, batch_size=4, seed=1)
    again.load(state)
    assert [again.next_indices() for _ in range(3)] == expected
    first_epoch = BatchStream(size=8, batch_size=4, seed=1)
    assert sorted(first_epoch.next_indices() + first_epoch.next_indices()) == list(range(8))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchStream(size=3, batch_size=4)
