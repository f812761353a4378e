"""A teacher of one family distilled into a student of another: the tiny pairs of ``vlsi tiny`` (one
tokenizer, so they agree on every regular token) through ``vlsi distill --config`` with the controls and
evaluation, the student exported as its own stock class."""

import json

import pytest
import torch
import yaml
from test_families import STOCK_CLASS, recipe_run_as_written, size_flags
from transformers import AutoModelForImageTextToText

from vlsi.data.processing import VLProcessor
from vlsi.data.records import Encoder, load_records
from vlsi.run.cli import main
from vlsi.run.distill import MODELS
from vlsi.run.evaluate import generate_answers

PAIRS = [
    ("qwen2_5_vl", "qwen2_vl", ""),
    ("qwen3_vl", "llava_onevision", ""),
    ("qwen3_vl_moe", "qwen3_vl", ""),
    # Step 2 (and the final-layer-KD control) from a cached teacher of the other family.
    ("qwen3_vl", "llava_onevision", "cache"),
]


@pytest.mark.slow
@pytest.mark.parametrize("teacher_family, student_family, cache", PAIRS)
def test_a_teacher_of_another_family(teacher_family, student_family, cache, synth_data, tmp_path):
    for family in {teacher_family, student_family}:
        assert main(["tiny", "--family", family, "--out", str(tmp_path / family), *size_flags()]) == 0
    teacher, student = tmp_path / teacher_family / "teacher", tmp_path / student_family / "student"
    test = load_records(synth_data / "test.json")[:6]
    (tmp_path / "test.json").write_text(json.dumps(test))
    out = tmp_path / "run"
    interact = {"max_steps": 2, "batch_size": 4, "lora": True, "lora_rank": 4, "lora_alpha": 4}
    if cache:
        interact["teacher_cache"] = str(tmp_path / "cache")
    config = {
        "out": str(out),
        "teacher": str(teacher),
        "student": str(student),
        "train_data": str(synth_data / "train.json"),
        "test_data": str(tmp_path / "test.json"),
        "image_root": str(synth_data),
        "controls": True,
        "verbalize": {"max_steps": 2, "batch_size": 4},
        "interact": interact,
        "sft": {"max_steps": 2, "batch_size": 4},
    }
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(path)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(MODELS)
    assert all(m["n"] == len(test) and m["skipped"] == 0 for m in results.values())
    if cache:
        assert (tmp_path / "cache" / "compared_ids.safetensors").exists()
    # Every record's response was one id sequence for both models: nothing skipped in step 2.
    for stage in ("step2_interact", "control_kd_step2"):
        summary = json.loads((out / stage / "train_summary.json").read_text())
        assert summary["skipped"] == 0 and summary["final_loss_parts"]["ll"] > 0
    # Each side's layers are its own: the heat maps' rows and columns follow each model's depth.
    matches = json.loads((out / "step2_interact" / "matches.json").read_text())
    teacher_depth = AutoModelForImageTextToText.from_pretrained(teacher).config.text_config.num_hidden_layers
    assert max(matches["teacher_layers"]) < teacher_depth
    assert sum(map(sum, matches["last"])) > 0

    # The VLsI student is a stock checkpoint of its own family and, greedy, repeats its evaluated answers.
    stock = AutoModelForImageTextToText.from_pretrained(out / "step3_sft").eval()
    assert type(stock) is STOCK_CLASS[student_family]
    base = AutoModelForImageTextToText.from_pretrained(student)
    assert not torch.equal(stock.lm_head.weight, base.lm_head.weight)
    processor = VLProcessor.from_pretrained(out / "step3_sft")
    prompts = [Encoder(processor).encode_prompt(r, synth_data)[0] for r in test]
    answers = generate_answers(stock, processor, prompts, max_new_tokens=32)
    predictions = [json.loads(x) for x in (out / "eval/vlsi/predictions.jsonl").read_text().splitlines()]
    assert [a.strip() for a in answers] == [p["prediction"] for p in predictions]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, families, student_depth",
    [
        ("qwen25vl-72b-to-qwen2vl-2b", ("qwen2_5_vl", "qwen2_vl"), 28),
        ("qwen25vl-72b-to-llava-ov-0.5b", ("qwen2_5_vl", "llava_onevision"), 24),
    ],
)
def test_the_cross_family_recipes_run_as_written(recipe, families, student_depth, synth_data, tmp_path):
    """The bundled cross-family recipes as written, on tiny models of their two families
    (:func:`test_families.recipe_run_as_written`): no record's response tokenized differently."""
    out, _ = recipe_run_as_written(recipe, families, student_depth, synth_data, tmp_path)
    assert json.loads((out / "step2_interact" / "train_summary.json").read_text())["skipped"] == 0
