"""Every supported family end to end: its tiny pair, every step on it, and the export with the stock class."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAMILY_SIZES
from transformers import (
    AutoModelForImageTextToText,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)

from vlsi.data.processing import VLProcessor
from vlsi.data.records import Encoder, load_records
from vlsi.model.backbone import Backbone, parse_layers
from vlsi.model.tiny import count_parameters
from vlsi.run.cli import main
from vlsi.run.distill import MODELS
from vlsi.run.evaluate import generate_answers

STOCK_CLASS = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}
FAMILIES = list(STOCK_CLASS)


def size_flags() -> list[str]:
    flags = [
        "--vision-dim",
        str(FAMILY_SIZES["vision_dim"]),
        "--vision-depth",
        str(FAMILY_SIZES["vision_depth"]),
    ]
    for role in ("teacher", "student"):
        for key, value in FAMILY_SIZES[role].items():
            flags += [f"--{role}-{key.replace('_', '-')}", str(value)]
    return flags


def vision_tower_shapes(model) -> dict:
    # The merger into the language model follows the LM's width; the tower before it is shared.
    tower = Backbone(model).vision_tower.state_dict()
    return {k: v.shape for k, v in tower.items() if "merger" not in k}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pair_of_each_family(family, family_models):
    paths = family_models(family)
    teacher = AutoModelForImageTextToText.from_pretrained(paths["teacher"])
    student = AutoModelForImageTextToText.from_pretrained(paths["student"])
    assert type(teacher) is STOCK_CLASS[family] and type(student) is STOCK_CLASS[family]
    # Really tiny: the per-family end-to-end tests below must stay at seconds.
    assert count_parameters(teacher) < 200_000 and count_parameters(student) < 120_000
    t, s = teacher.config.text_config, student.config.text_config
    assert t.num_hidden_layers > s.num_hidden_layers and t.hidden_size > s.hidden_size
    assert vision_tower_shapes(teacher) == vision_tower_shapes(student)
    assert t.vocab_size == s.vocab_size
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (paths["teacher"] / name).read_bytes() == (paths["student"] / name).read_bytes()


def test_the_tiny_mixture_of_experts_routes_each_token_to_half_its_experts(family_models):
    teacher = AutoModelForImageTextToText.from_pretrained(family_models("qwen3_vl_moe")["teacher"])
    text = teacher.config.text_config
    assert (text.num_experts, text.num_experts_per_tok) == (4, 2)
    assert (
        text.moe_intermediate_size * text.num_experts_per_tok == FAMILY_SIZES["teacher"]["intermediate_size"]
    )
    assert type(Backbone(teacher).layers[0].mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock"
    # Every decoder layer is sparse, and the whole pair stays as small as the dense families' (checked above).
    assert all(type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in Backbone(teacher).layers)


def test_an_unknown_family_is_refused_naming_the_known_ones(tmp_path, capsys):
    assert main(["tiny", "--family", "llava", "--out", str(tmp_path / "m")]) == 2
    assert (
        "unknown family 'llava'; vlsi tiny builds qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, llava_onevision"
        in (capsys.readouterr().err)
    )
    assert not (tmp_path / "m").exists()


def test_two_families_with_other_regular_vocabularies_are_refused_before_any_compute(
    family_models, synth_data, tmp_path, capsys
):
    teacher, student = tmp_path / "teacher", family_models("llava_onevision")["student"]
    shutil.copytree(family_models("qwen3_vl")["teacher"], teacher)
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    (teacher / "model.safetensors").unlink()  # nothing may need the weights to refuse the pair
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), "--student", str(student), "--out", str(out)]
    assert main([*args, "--train-data", str(synth_data / "train.json")]) == 2
    err = capsys.readouterr().err
    assert f"teacher {teacher} (qwen3_vl) and student {student} (llava_onevision) cannot be paired" in err
    assert "2 with other ids" in err and repr(a) in err
    assert not list(out.glob("step1_*"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_step_on_the_family(family, synth_data, tmp_path, capsys):
    models, out = tmp_path / "models", tmp_path / "run"
    assert main(["tiny", "--family", family, "--out", str(models), *size_flags()]) == 0
    # Six models are evaluated by greedy generation; a few test records keep that to seconds.
    test = load_records(synth_data / "test.json")[:6]
    (tmp_path / "test.json").write_text(json.dumps(test))
    config = {
        "out": str(out),
        "teacher": str(models / "teacher"),
        "student": str(models / "student"),
        "train_data": str(synth_data / "train.json"),
        "test_data": str(tmp_path / "test.json"),
        "image_root": str(synth_data),
        "controls": True,
        "verbalize": {"max_steps": 2, "batch_size": 4},
        "interact": {"max_steps": 2, "batch_size": 4, "lora": True, "lora_rank": 4, "lora_alpha": 4},
        "sft": {"max_steps": 2, "batch_size": 4},
    }
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(path)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(MODELS)
    assert all(m["n"] == len(test) and m["skipped"] == 0 for m in results.values())

    # What each verbalized layer of the trained student says about a board.
    capsys.readouterr()
    image = synth_data / test[0]["image"]
    args = [
        "verbalize",
        "--model",
        str(out / "step3_sft"),
        "--verbalizers",
        str(out / "step2_interact/verbalizers"),
    ]
    assert (
        main([*args, "--image", str(image), "--question", "What is here?", "--json", "--max-new-tokens", "4"])
        == 0
    )
    lines = json.loads(capsys.readouterr().out)
    assert [line["label"] for line in lines][-1] == "final" and len(lines) >= 2

    # The VLsI student loads with the stock class alone and, greedy, repeats its evaluated answers.
    stock = AutoModelForImageTextToText.from_pretrained(out / "step3_sft").eval()
    assert type(stock) is STOCK_CLASS[family]
    base = AutoModelForImageTextToText.from_pretrained(models / "student")
    assert not torch.equal(stock.lm_head.weight, base.lm_head.weight)
    processor = VLProcessor.from_pretrained(out / "step3_sft")
    prompts = [Encoder(processor).encode_prompt(r, synth_data)[0] for r in test]
    answers = generate_answers(stock, processor, prompts, max_new_tokens=32)
    predictions = [json.loads(x) for x in (out / "eval/vlsi/predictions.jsonl").read_text().splitlines()]
    assert [a.strip() for a in answers] == [p["prediction"] for p in predictions]


def recipe_run_as_written(recipe: str, families: tuple[str, str], student_depth: int, synth_data, tmp_path):
    """``vlsi distill --config`` on a bundled recipe, only its paths replaced, with a tiny teacher of
    ``families[0]`` and student of ``families[1]`` as deep as the real ones (80 and ``student_depth`` layers),
    so its target layers, LoRA, gradient checkpointing and batch settings all apply. Returns the run folder
    and the recipe as written, after checking every setting it writes is the one the run used."""
    depth = ["--teacher-num-layers", "80", "--student-num-layers", str(student_depth)]
    width = [
        "--teacher-hidden-size",
        "16",
        "--teacher-intermediate-size",
        "32",
        "--student-hidden-size",
        "16",
    ]
    for family in set(families):
        models = str(tmp_path / family)
        assert main(["tiny", "--family", family, "--out", models, *size_flags(), *depth, *width]) == 0
    # One optimizer step per stage: batch 2 x accumulation 16 = 32 records.
    train = tmp_path / "train.json"
    train.write_text(json.dumps(load_records(synth_data / "train.json")[:32]))
    out = tmp_path / "run"
    paths = ["--out", str(out), "--train-data", str(train), "--image-root", str(synth_data)]
    paths += ["--teacher", str(tmp_path / families[0] / "teacher")]
    paths += ["--student", str(tmp_path / families[1] / "student")]
    assert main(["distill", "--config", f"configs/recipes/{recipe}.yaml", *paths]) == 0
    written = yaml.safe_load((Path("configs/recipes") / f"{recipe}.yaml").read_text())
    resolved = yaml.safe_load((out / "distill_config.yaml").read_text())
    for section in ("verbalize", "interact", "sft"):
        assert {k: resolved[section][k] for k in written[section]} == written[section]
    matches = json.loads((out / "step2_interact" / "matches.json").read_text())
    for role in ("teacher", "student"):
        assert matches[f"{role}_layers"] == parse_layers(written[f"{role}_layers"])
    # As written the recipe names no test file: the VLsI student is exported for `vlsi eval`.
    assert type(AutoModelForImageTextToText.from_pretrained(out / "step3_sft")) is STOCK_CLASS[families[1]]
    return out, written


@pytest.mark.slow
@pytest.mark.parametrize("recipe, student_layers", [("llava-ov-72b-to-0.5b", 24), ("llava-ov-72b-to-7b", 28)])
def test_llava_onevision_recipes_run_as_written(recipe, student_layers, synth_data, tmp_path):
    """The paper's LLaVA-OneVision recipes as written (:func:`recipe_run_as_written`)."""
    families = ("llava_onevision", "llava_onevision")
    _, written = recipe_run_as_written(recipe, families, student_layers, synth_data, tmp_path)
    assert written["teacher_layers"] == "10,30,50,70"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_only_batch_runs_the_vision_tower_when_several_processes_train(family, family_models):
    """engines.vision_on_every_batch: the vision tower runs (every parameter gets a gradient, all zeros) and
    the logits are exactly those without it; with one process nothing is installed."""
    from types import SimpleNamespace

    from vlsi.model.loading import load_model
    from vlsi.train.engines import vision_on_every_batch

    path = family_models(family)["student"]
    processor = VLProcessor.from_pretrained(path)
    model = load_model(path, dtype=torch.float32).train()
    ids = torch.tensor([[100, 101, 102, 103, 104]])  # text only: no image token
    assert processor.image_token_id not in ids
    want = model(input_ids=ids).logits
    vision_on_every_batch(SimpleNamespace(num_processes=1), model, processor)
    vision_on_every_batch(SimpleNamespace(num_processes=2), model, processor)
    got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    got.sum().backward()
    grads = [p.grad for p in Backbone(model).vision_tower.parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)
    model.eval()  # generation embeds without images: the stand-in is for training forwards only
    model.zero_grad(set_to_none=True)
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is None for p in Backbone(model).vision_tower.parameters())
