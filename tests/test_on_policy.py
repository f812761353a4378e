"""On-policy step 2 (``vlsi interact --lmbda``): P = 0 is today's step 2 bit for bit; at P = 1 the responses
trained on are the student's own greedy answers; records without answers run there and are refused where the
dataset's answers are trained on."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from vlsi.data.processing import VLProcessor
from vlsi.data.records import IGNORE_INDEX, Encoder, load_records
from vlsi.model.loading import load_model
from vlsi.run.cli import main
from vlsi.train.on_policy import answer_tokens, answered_item

NEW_TOKENS = 6


def _interact(tiny_models, verbalizers, data, out, options: str = "") -> list[str]:
    return [
        "interact",
        *("--teacher", str(tiny_models["teacher"]), "--teacher-verbalizers", str(verbalizers["teacher"])),
        *("--student", str(tiny_models["student"]), "--student-verbalizers", str(verbalizers["student"])),
        *("--data", str(data), "--out", str(out)),
        *("--batch-size", "4", "--lr", "1e-3", "--log-every", "1", "--seed", "3", *options.split()),
    ]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # two training runs
def test_lmbda_zero_is_todays_step_2_bit_for_bit(tmp_path, tiny_models, verbalizers, synth_data):
    data = synth_data / "train.json"
    today, zero = tmp_path / "today", tmp_path / "zero"
    assert main(_interact(tiny_models, verbalizers, data, today, "--max-steps 3")) == 0
    # The generation options are set too: with P = 0 they must change nothing.
    options = "--max-steps 3 --lmbda 0 --gen-temperature 0.7 --gen-max-new-tokens 3"
    assert main(_interact(tiny_models, verbalizers, data, zero, options)) == 0
    assert _rows(zero / "train_log.jsonl") == _rows(today / "train_log.jsonl")
    assert _rows(zero / "match_log.jsonl") == _rows(today / "match_log.jsonl")
    assert not (zero / "on_policy.jsonl").exists()
    assert "on_policy" not in json.loads((zero / "train_summary.json").read_text())
    for weights in ("model.safetensors", "verbalizers/verbalizers.safetensors"):
        a, b = load_file(zero / weights), load_file(today / weights)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[name], b[name]) for name in a), weights


@pytest.mark.slow  # two training runs
def test_on_policy_batches_with_workers_are_those_without(tmp_path, tiny_models, verbalizers, synth_data):
    # Off-policy batches built in DataLoader workers, on-policy ones taking their records from the same
    # prefetched order: the run is the in-process one.
    data = synth_data / "train.json"
    options = "--max-steps 4 --lmbda 0.5 --gen-temperature 1.0 --gen-max-new-tokens 4"
    here, there = tmp_path / "here", tmp_path / "workers"
    assert main(_interact(tiny_models, verbalizers, data, here, options)) == 0
    assert main(_interact(tiny_models, verbalizers, data, there, f"{options} --num-workers 2")) == 0
    generated = _rows(here / "on_policy.jsonl")
    assert 0 < len(generated) < 4  # both kinds of batch, for this seed
    assert _rows(there / "on_policy.jsonl") == generated
    assert _rows(there / "train_log.jsonl") == _rows(here / "train_log.jsonl")


def _greedy(model_path, data, names: list[str]) -> tuple[list[str], int]:
    """A separate greedy ``generate`` of the student, one record at a time (no padding): its answers and the
    tokens of prompt + answer over the records."""
    processor = VLProcessor.from_pretrained(model_path)
    model = load_model(model_path, dtype=torch.float32).eval()
    records = load_records(data)
    encoder = Encoder(processor)
    eos = processor.tokenizer.eos_token_id
    texts, tokens = [], 0
    for name in names:
        index = int(name.split()[1])
        prompt, _ = encoder.encode_prompt(records[index], data.parent, require_answer=False)
        inputs = {
            k: v.unsqueeze(0) if k in ("input_ids", "mm_token_type_ids") else v for k, v in prompt.items()
        }
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
        answer = out[0, prompt["input_ids"].numel() :].tolist()
        answer = answer[: answer.index(eos) + 1] if eos in answer else answer
        texts.append(processor.tokenizer.decode(answer, skip_special_tokens=True))
        tokens += prompt["input_ids"].numel() + len(answer)
    return texts, tokens


@pytest.mark.slow  # a training run and a separate generation
def test_lmbda_one_trains_on_the_students_own_greedy_answers(tmp_path, tiny_models, verbalizers, synth_data):
    data, out = synth_data / "train.json", tmp_path / "on_policy"
    options = f"--max-steps 1 --lmbda 1 --gen-max-new-tokens {NEW_TOKENS}"
    assert main(_interact(tiny_models, verbalizers, data, out, options)) == 0
    (row,) = _rows(out / "on_policy.jsonl")
    assert row["step"] == 1 and len(row["records"]) == 4
    # Step 1's answers come from the initial student: a greedy generate of it, one record at a time, writes
    # the same answers, and the trained sequences are exactly its prompts followed by those answers.
    texts, tokens = _greedy(tiny_models["student"], data, row["records"])
    assert row["responses"] == texts
    reference = [r["conversations"][-1]["value"] for r in load_records(data)]
    assert not set(texts) & set(reference)  # not the dataset's answers
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["tokens_seen"] == tokens
    on_policy = summary["on_policy"]
    assert on_policy["batches"] == 1 and 0 < on_policy["generation_share"] < 1


def test_an_answered_item_is_labelled_on_the_answer_alone(processor):
    record = {
        "conversations": [{"from": "human", "value": "What is at the center?"}, {"from": "gpt", "value": "x"}]
    }
    prompt, _ = Encoder(processor).encode_prompt(record, None)
    eos = processor.tokenizer.eos_token_id
    answer = answer_tokens(torch.tensor([11, 12, eos, 13, 0]), {eos}, pad_id=0)
    assert answer == [11, 12, eos]  # through the end-of-turn token, as the dataset's answers are labelled
    assert answer_tokens(torch.tensor([11, 12, 13]), {eos}, pad_id=0) == [11, 12, 13]  # cut by the budget
    item = answered_item(prompt, answer)
    n = prompt["input_ids"].numel()
    assert item["input_ids"].tolist() == prompt["input_ids"].tolist() + answer
    assert item["labels"].tolist() == [IGNORE_INDEX] * n + answer
    assert item["mm_token_type_ids"].tolist() == prompt["mm_token_type_ids"].tolist() + [0, 0, 0]


def _unanswered(synth_data, tmp_path):
    """The synthetic records with their last answer removed (the earlier turns kept): questions only."""
    records = load_records(synth_data / "train.json")
    for record in records:
        record["conversations"] = record["conversations"][:-1]
        record["image"] = str(synth_data / record["image"])
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(records))
    return path, records


def test_an_unanswered_record_prompts_as_its_answered_self(processor, synth_data, tmp_path):
    answered = load_records(synth_data / "train.json")[0]
    _, records = _unanswered(synth_data, tmp_path)
    encoder = Encoder(processor)
    want, _ = encoder.encode_prompt(answered, synth_data)
    got, answer = encoder.encode_prompt(records[0], synth_data, require_answer=False)
    assert answer is None and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow  # a training run
def test_unanswered_records_train_on_policy_and_are_refused_where_answers_are_needed(
    tmp_path, tiny_models, verbalizers, synth_data, capsys
):
    data, _ = _unanswered(synth_data, tmp_path)
    out = tmp_path / "questions_only"
    options = f"--max-steps 2 --lmbda 1 --gen-max-new-tokens {NEW_TOKENS}"
    assert main(_interact(tiny_models, verbalizers, data, out, options)) == 0
    assert [r["step"] for r in _rows(out / "on_policy.jsonl")] == [1, 2]
    assert json.loads((out / "train_summary.json").read_text())["skipped"] == 0

    capsys.readouterr()
    refused = tmp_path / "refused"
    sft = ["sft", "--model", str(tiny_models["student"]), "--data", str(data), "--out", str(refused)]
    assert main([*sft, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "record 0 (id 'train-00000') has no answer" in err and "vlsi sft" in err
    options = "--max-steps 1 --lmbda 0.5"
    assert main(_interact(tiny_models, verbalizers, data, refused, options)) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "has no answer" in err and "--lmbda 0.5" in err
    assert not refused.exists() or not (refused / "model.safetensors").exists()


@pytest.mark.slow  # the teacher answers every turn of every record, twice, then a training run
def test_teacher_responses_are_cached_beside_the_records_and_rebuilt_when_stale(
    tmp_path, tiny_models, verbalizers, synth_data
):
    from vlsi.run.evaluate import EvalConfig, evaluate
    from vlsi.train.teacher_responses import responses_path, teacher_responses

    data, questions = _unanswered(synth_data, tmp_path)
    teacher = str(tiny_models["teacher"])
    path = teacher_responses(teacher, data, max_new_tokens=4)
    assert path == responses_path(data) and path.parent == data.parent
    answered = json.loads(path.read_text())
    assert len(answered) == len(questions)
    for before, after in zip(questions, answered, strict=True):
        # The questions kept, the missing answer added: the teacher's, as every earlier answer now is.
        assert after["conversations"][:-1][0::2] == before["conversations"][0::2]
        assert [t["from"] for t in after["conversations"]] == ["human", "gpt"] * (
            len(before["conversations"]) // 2 + 1
        )
        assert all("to be answered" not in t["value"] for t in after["conversations"])
    # The teacher, asked each last question after its own earlier answers, gives exactly those answers.
    metrics = evaluate(EvalConfig(model=teacher, data=str(path), max_new_tokens=4), progress=False)
    assert metrics["n"] == len(questions) and metrics["accuracy"] == 1.0

    written = path.stat().st_mtime_ns
    assert teacher_responses(teacher, data, max_new_tokens=4) == path
    assert path.stat().st_mtime_ns == written  # up to date: reused
    teacher_responses(teacher, data, max_new_tokens=3)
    assert path.stat().st_mtime_ns != written  # other generation settings: rebuilt
    written = path.stat().st_mtime_ns
    questions[0]["conversations"][-1]["value"] += " Answer in one word."
    data.write_text(json.dumps(questions))
    teacher_responses(teacher, data, max_new_tokens=3)
    assert path.stat().st_mtime_ns != written  # another data file: rebuilt
    assert "one word" in json.loads(path.read_text())[0]["conversations"][-2]["value"]
    written = path.stat().st_mtime_ns

    # Step 2 then runs off-policy on the questions alone, the teacher's answers as the responses.
    out = tmp_path / "seq_kd"
    options = "--max-steps 1 --responses teacher --gen-max-new-tokens 3"
    assert main(_interact(tiny_models, verbalizers, data, out, options)) == 0
    assert path.stat().st_mtime_ns == written  # the same teacher, data and settings: reused
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 1 and summary["skipped"] == 0 and "on_policy" not in summary


def test_the_on_policy_options_are_a_distill_yaml_section_and_validated(tmp_path):
    import argparse

    from vlsi.run.config import add_dataclass_arguments, build_config, read_config_file
    from vlsi.run.distill import DistillConfig

    config = tmp_path / "run.yaml"
    config.write_text("interact: {lmbda: 0.5, gen_temperature: 0.7, responses: teacher}\n")
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, DistillConfig)
    cfg = build_config(DistillConfig, parser.parse_args([]), read_config_file(config))
    assert (cfg.interact.lmbda, cfg.interact.gen_temperature, cfg.interact.responses) == (0.5, 0.7, "teacher")
    cfg.interact.validate()
    for field, value, message in (
        ("lmbda", 1.5, "in [0, 1]"),
        ("gen_temperature", -1.0, ">= 0"),
        ("gen_max_new_tokens", 0, ">= 1"),
        ("responses", "student", "not one of data, teacher"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            dataclasses.replace(cfg.interact, **{field: value}).validate()
    with pytest.raises(ValueError, match="--lmbda needs it live"):
        dataclasses.replace(cfg.interact, teacher_cache="cache", responses="data").validate()


def test_the_checkpoints_generation_defaults_do_not_shape_the_answers(processor, tiny_models, synth_data):
    from vlsi.run.evaluate import generate_answers
    from vlsi.train.on_policy import generate_tokens

    model = load_model(tiny_models["student"], dtype=torch.float32).eval()
    records = load_records(synth_data / "train.json")[:3]
    prompts = [Encoder(processor).encode_prompt(r, synth_data)[0] for r in records]
    pad, eos = processor.pad_token_id, processor.tokenizer.eos_token_id
    want = generate_tokens(model, prompts, pad, eos, 8, 0.0)
    plain = generate_answers(model, processor, [dict(p) for p in prompts], 8)
    # A released checkpoint's defaults (Qwen2-VL-Instruct ships a repetition penalty): generate follows them...
    model.generation_config.repetition_penalty = 10.0
    assert generate_answers(model, processor, [dict(p) for p in prompts], 8) != plain
    # ...the on-policy answers do not: they are the student's own distribution.
    assert generate_tokens(model, prompts, pad, eos, 8, 0.0) == want
