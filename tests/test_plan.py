"""The bundled recipes (the paper's four and two cross-family ones), the bundled real model configs and
``vlsi plan`` (meta device only: no weights)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from vlsi.model.backbone import parse_layers
from vlsi.run.cli import main
from vlsi.run.config import build_config
from vlsi.run.distill import DistillConfig
from vlsi.run.memory import GIB, estimate_memory
from vlsi.run.plan import (
    PlanConfig,
    block_centres,
    check_pair,
    complete_recipe,
    load_recipe,
    make_plan,
    summarize,
)
from vlsi.train.interact import InteractConfig
from vlsi.train.sft import SFTConfig
from vlsi.train.verbalize import VerbalizeConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
QWEN_72B, QWEN_7B, QWEN_2B = (f"Qwen/Qwen2-VL-{s}-Instruct" for s in ("72B", "7B", "2B"))
QWEN25_72B = "Qwen/Qwen2.5-VL-72B-Instruct"
OV = "llava-hf/llava-onevision-qwen2-{}-ov-hf"

# Parameter totals the hub lists for these checkpoints; the bundled configs must rebuild them exactly.
REAL_TOTALS = {
    QWEN_2B: 2_208_985_600,
    QWEN_7B: 8_291_375_616,
    QWEN_72B: 73_405_560_320,
    OV.format("0.5b"): 893_675_552,
    OV.format("7b"): 8_030_807_584,
    OV.format("72b"): 73_181_570_592,
}
# Every bundled model: the paper's six (their totals above) and the cross-family recipes' teacher, whose
# config is assembled from two named sources (its SOURCE.md) and has no published total to check against.
BUNDLED = (*REAL_TOTALS, QWEN25_72B)
# The target layers (student, teacher): the paper's; the 7B LLaVA-OV student and the cross-family pairs are this
# project's choice, each keeping the paper's lists for its teacher depth and student (block_centres).
RECIPE_LAYERS = {
    "qwen2vl-72b-to-2b": (list(range(2, 28, 4)), list(range(2, 80, 4))),
    "qwen2vl-72b-to-7b": (list(range(2, 28, 4)), list(range(2, 80, 4))),
    "llava-ov-72b-to-0.5b": ([4, 12, 20], [10, 30, 50, 70]),
    "llava-ov-72b-to-7b": (block_centres(28, 3), [10, 30, 50, 70]),
    "qwen25vl-72b-to-qwen2vl-2b": (block_centres(28, 7), block_centres(80, 20)),
    "qwen25vl-72b-to-llava-ov-0.5b": (block_centres(24, 3), block_centres(80, 4)),
}
# The recipes whose teacher and student are of two families (docs/method.md#cross-family-pairs).
CROSS_FAMILY = {
    "qwen25vl-72b-to-qwen2vl-2b": ("qwen2_5_vl", "qwen2_vl"),
    "qwen25vl-72b-to-llava-ov-0.5b": ("qwen2_5_vl", "llava_onevision"),
}
STEP_CLASSES = {"verbalize": VerbalizeConfig, "interact": InteractConfig, "sft": SFTConfig}


@functools.cache
def _bundled_summary(name: str):
    return summarize(name)


@pytest.fixture(autouse=True)
def _each_bundled_model_summarized_once(monkeypatch):
    """A summary is a meta-device build of the whole model (up to 80 layers, ~0.2 s): `vlsi plan` and
    make_plan reuse the module's one summary of each bundled model; local folders, which tests edit, are
    summarized afresh."""
    import vlsi.run.plan

    monkeypatch.setattr(
        vlsi.run.plan,
        "summarize",
        lambda name: _bundled_summary(name) if name in BUNDLED else summarize(name),
    )


@pytest.fixture(scope="module")
def summaries():
    return {name: _bundled_summary(name) for name in BUNDLED}


def test_the_papers_four_and_the_cross_family_recipes_are_bundled():
    assert [p.stem for p in RECIPES] == sorted(RECIPE_LAYERS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_keys_are_config_fields(path):
    recipe = yaml.safe_load(path.read_text())
    assert set(recipe) <= {f.name for f in dataclasses.fields(DistillConfig)}
    for step, cls in STEP_CLASSES.items():
        assert set(recipe[step]) <= {f.name for f in dataclasses.fields(cls)}, step
    # ... and read exactly as `vlsi distill --config` reads it.
    cfg = build_config(DistillConfig, argparse.Namespace(), recipe)
    for step in ("interact", "sft"):
        settings = getattr(cfg, step)
        assert settings.lora and settings.lora_rank == settings.lora_alpha == 64
    for step in STEP_CLASSES:
        settings = getattr(cfg, step)
        assert (settings.lr, settings.min_lr, settings.grad_accum) == (1e-4, 1e-6, 16)
    assert cfg.sft.gradient_checkpointing
    assert cfg.interact.strategy == "vlsi" and cfg.interact.il == cfg.interact.ll == "kld"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_layers_are_the_papers_and_fit_the_models(path, summaries):
    recipe = yaml.safe_load(path.read_text())
    student_layers, teacher_layers = (parse_layers(recipe[k]) for k in ("student_layers", "teacher_layers"))
    assert (student_layers, teacher_layers) == RECIPE_LAYERS[path.stem]
    assert len(student_layers) <= len(teacher_layers)
    for layers, name in ((student_layers, recipe["student"]), (teacher_layers, recipe["teacher"])):
        assert max(layers) < summaries[name].num_layers


def test_block_centres_is_the_rule_behind_every_paper_list():
    assert block_centres(28, 7) == list(range(2, 28, 4))
    assert block_centres(80, 20) == list(range(2, 80, 4))
    assert block_centres(24, 3) == [4, 12, 20]
    assert block_centres(80, 4) == [10, 30, 50, 70]
    assert block_centres(28, 3) == [4, 14, 23]
    with pytest.raises(ValueError):
        block_centres(4, 5)


def test_bundled_configs_rebuild_the_real_models(summaries):
    for name, total in REAL_TOTALS.items():
        assert summaries[name].total == total, name
        assert "bundled" in summaries[name].source
    assert summaries[QWEN_7B].head_width == 152_064 and summaries[QWEN_2B].head_width == 151_936
    assert summaries[QWEN_72B].num_layers == 80 and summaries[OV.format("0.5b")].num_layers == 24


def test_bundled_qwen25_vl_72b_config_is_the_two_sources_values(summaries):
    """Each value as SOURCE.md gives it: where Qwen's AWQ release and torchtune's builder agree, and the rows
    AWQ pads (intermediate 29568, not 29696) and the vision geometry torchtune states."""
    folder = ROOT / "configs/models/Qwen--Qwen2.5-VL-72B-Instruct"
    source = (folder / "SOURCE.md").read_text()
    for named in (
        "Qwen/Qwen2.5-VL-72B-Instruct-AWQ",
        "666b8f5f61eebf73e8deff3e33a0f8934038d69f",
        "pytorch/torchtune",
        "49698b248e5ac5fe4a5e46950a2bf9bb05caee9c",
        "qwen2_5_vl_72b",
    ):
        assert named in source
    raw = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in raw and "_name_or_path" not in raw
    m = summaries[QWEN25_72B]
    assert "bundled" in m.source and m.family == "qwen2_5_vl"
    text, vision = m.config.get_text_config(), m.config.vision_config
    assert (m.num_layers, m.hidden_size, m.intermediate_size, m.head_width) == (80, 8192, 29568, 152_064)
    assert (text.num_attention_heads, text.num_key_value_heads, m.config.tie_word_embeddings) == (
        64,
        8,
        False,
    )
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.out_hidden_size) == (
        32,
        1280,
        3456,
        8192,
    )
    assert (vision.window_size, list(vision.fullatt_block_indexes)) == (112, [7, 15, 23, 31])
    # The same LLM sizes as Qwen2-VL-72B: its language model has that model's parameters exactly.
    assert m.language == summaries[QWEN_72B].language
    assert m.total == 73_410_777_344  # this config's count, pinned (no published total was found)


def test_verbalizers_of_the_7b_student_are_the_papers_269m(summaries):
    from vlsi.run.memory import verbalizer_parameters

    layers = list(range(2, 28, 4))
    n = verbalizer_parameters(summaries[QWEN_7B].backbone, layers)
    # 7 verb-FFNs of 3 x 3584^2 (the paper's 269M) plus a 3584-wide norm copy each.
    assert n == 7 * (3 * 3584**2 + 3584)
    assert 269e6 < n < 270e6


def test_padding_rows_are_allowed_and_noted(summaries):
    notes = check_pair(summaries[QWEN_72B], summaries[QWEN_2B])
    assert any("128 extra rows are padding" in note and "151,936" in note for note in notes)
    notes = check_pair(summaries[OV.format("72b")], summaries[OV.format("0.5b")])
    assert any("padding" in note for note in notes)


def test_a_different_tokenizer_is_refused(summaries, tmp_path):
    # Two families: allowed, their regular vocabularies compared from the tokenizers when the run starts.
    notes = check_pair(summaries[QWEN_72B], summaries[OV.format("0.5b")])
    assert "two families (qwen2_vl teacher, llava_onevision student)" in notes[0]
    assert "before any weight is loaded" in notes[1]
    # Same family, but the special ids say it is another tokenizer.
    bent = json.loads((ROOT / "configs/models/Qwen--Qwen2-VL-2B-Instruct/config.json").read_text())
    bent["eos_token_id"] = 151643
    (tmp_path / "config.json").write_text(json.dumps(bent))
    with pytest.raises(ValueError, match="eos_token_id"):
        check_pair(summaries[QWEN_7B], summarize(str(tmp_path)))


def test_local_tokenizers_are_compared_id_by_id(tiny_models, tmp_path):
    teacher, student = summarize(str(tiny_models["teacher"])), summarize(str(tiny_models["student"]))
    assert any("compared id by id" in note for note in check_pair(teacher, student))
    # Swap two ordinary tokens in a copy of the student's tokenizer: same sizes and specials, other ids.
    other = tmp_path / "student"
    shutil.copytree(tiny_models["student"], other, ignore=shutil.ignore_patterns("*.safetensors"))
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="spell different tokens"):
        check_pair(teacher, summarize(str(other)))


def test_memory_shards_under_fsdp_and_grows_with_tokens(summaries):
    recipe = load_recipe(ROOT / "configs/recipes/qwen2vl-72b-to-7b.yaml")
    t, s = summaries[QWEN_72B], summaries[QWEN_7B]
    ddp = estimate_memory(t, s, recipe, "ddp", 8)
    fsdp = estimate_memory(t, s, recipe, "fsdp", 8)
    assert ddp.keys() == fsdp.keys() == {"1 verbalize teacher", "1 verbalize student", "2 interact", "3 sft"}
    interact_ddp, interact_fsdp = ddp["2 interact"][0], fsdp["2 interact"][0]
    assert interact_ddp.weights / GIB > 140  # the 72B teacher alone is 137 GiB in bf16
    assert interact_fsdp.weights < interact_ddp.weights / 4
    # The teacher's embeddings, head and vision tower stay whole on every GPU, however many there are.
    whole = (t.total - t.decoder) * 2
    assert whole / GIB > 5
    many = estimate_memory(t, s, recipe, "fsdp", 1024)["2 interact"][0]
    assert whole < many.weights - many.gathered < whole * 1.1
    longer = estimate_memory(t, s, recipe, "fsdp", 8, seq_len=4096)["2 interact"][0]
    assert longer.activations > interact_fsdp.activations
    # Whole [N, V] logits (the reference losses) cost far more than the chunked ones.
    raw = yaml.safe_load((ROOT / "configs/recipes/qwen2vl-72b-to-7b.yaml").read_text())
    reference = complete_recipe({**raw, "interact": {**raw["interact"], "loss_impl": "reference"}})
    assert estimate_memory(t, s, reference, "fsdp", 8)["2 interact"][0].heads > 10 * interact_fsdp.heads
    # ZeRO-3 partitions the head, so the chunked losses fall back to the reference there.
    zero3 = estimate_memory(t, s, recipe, "zero3", 8)["2 interact"][0]
    assert zero3.heads > 10 * interact_fsdp.heads


def test_unknown_recipe_keys_are_refused(tmp_path):
    recipe = yaml.safe_load((ROOT / "configs/recipes/qwen2vl-72b-to-2b.yaml").read_text())
    recipe["interact"]["lora_rnak"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="lora_rnak"):
        load_recipe(path)


def test_layers_beyond_the_model_are_refused(tmp_path):
    recipe = yaml.safe_load((ROOT / "configs/recipes/qwen2vl-72b-to-2b.yaml").read_text())
    recipe["student_layers"] = "2,6,30"
    path = tmp_path / "deep.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="28 layers"):
        make_plan(PlanConfig(recipe=str(path)))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_vlsi_plan_prints_every_recipe(path, capsys):
    assert main(["plan", str(path), "--engine", "fsdp", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for needle in ("target layers", "verbalizers", "vocabulary", "fsdp on 8 GPUs"):
        assert needle in out
    # A per-GPU row for every step, each within an 80 GiB GPU (none marked over --gpu-memory).
    rows = [line for line in out.splitlines() if line[:3] in ("  1", "  2", "  3")]
    assert [" ".join(row.split()[:3]) for row in rows] == [
        "1 verbalize teacher",
        "1 verbalize student",
        "2 interact 2",
        "3 sft 4",
    ]
    assert all(0 < float(row.split()[-1]) < 80 for row in rows) and "> --gpu-memory" not in out
    if path.stem == "qwen2vl-72b-to-7b":
        assert "student  7 x   38.5M =   269.8M" in out
    if path.stem in CROSS_FAMILY:
        teacher, student = CROSS_FAMILY[path.stem]
        assert f"two families ({teacher} teacher, {student} student)" in out
        assert "config: bundled configs/models/Qwen--Qwen2.5-VL-72B-Instruct" in out
    assert "verbalize chunked (1024), interact chunked (1024)" in out  # a GPU's chunk, as a GPU run takes


def test_vlsi_plan_refuses_a_bad_engine(capsys):
    assert main(["plan", str(RECIPES[0]), "--engine", "megatron"]) == 2
    assert "--engine" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_interact", ROOT / "benchmarks" / "gpu_interact.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens_per_second"] > 0 and len(result["losses"]) == 2
    assert result["plan_estimate_gib"]["total"] > 0


def _tiny_recipe(tmp_path, teacher, student, layers=("1,3", "1")) -> Path:
    recipe = yaml.safe_load((ROOT / "configs/recipes/qwen2vl-72b-to-2b.yaml").read_text())
    recipe.update(
        teacher=str(teacher), student=str(student), teacher_layers=layers[0], student_layers=layers[1]
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_vlsi_plan_of_a_mixture_of_experts_teacher_for_a_dense_student(family_models, tmp_path, capsys):
    teacher, student = family_models("qwen3_vl_moe")["teacher"], family_models("qwen3_vl")["student"]
    assert (
        main(["plan", str(_tiny_recipe(tmp_path, teacher, student)), "--engine", "fsdp", "--gpus", "2"]) == 0
    )
    out = capsys.readouterr().out
    moe = summarize(str(teacher))
    # 4 experts, 2 per token: half of the expert weights are active.
    experts = sum(
        p.numel() for m in moe.model.modules() if type(m).__name__.endswith("Experts") for p in m.parameters()
    )
    assert experts and moe.active == moe.total - experts // 2
    assert moe.intermediate_size == 2 * moe.config.text_config.moe_intermediate_size
    assert f"mixture of experts: {moe.active / 1e6:.1f}M active of {moe.total / 1e6:.1f}M per token" in out
    assert "two families (qwen3_vl_moe teacher, qwen3_vl student)" in out
    assert "tokenizers: the same" in out
    for step in ("1 verbalize teacher", "1 verbalize student", "2 interact", "3 sft"):
        assert step in out


def test_vlsi_plan_refuses_two_families_with_other_regular_vocabularies(family_models, tmp_path):
    other = tmp_path / "student"
    shutil.copytree(
        family_models("llava_onevision")["student"], other, ignore=shutil.ignore_patterns("*.safetensors")
    )
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="2 with other ids"):
        make_plan(PlanConfig(recipe=str(_tiny_recipe(tmp_path, family_models("qwen3_vl")["teacher"], other))))


def test_vlsi_plan_under_zero3_refuses_the_steps_with_a_frozen_model(capsys):
    assert main(["plan", "qwen2vl-72b-to-2b", "--engine", "zero3", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line[:3] in ("  1", "  2", "  3")}
    assert "refused under zero3" in rows["verbalize"] and "refused under zero3" in rows["interact"]
    assert "refused" not in rows["sft"]
    assert "steps 1 and 2 are refused" in out
