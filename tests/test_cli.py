"""End to end through the real command line, on the tiny models and a small synthetic set."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

from vlsi.data.processing import VLProcessor
from vlsi.data.records import Encoder, load_records
from vlsi.run.cli import main
from vlsi.run.evaluate import generate_answers


def _sft(model, data, out, options: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "--out", str(out), *options.split()]


@pytest.mark.slow  # synth, tiny, sft, eval and the stock reload, end to end
def test_synth_tiny_sft_eval_export(tmp_path):
    data, models = tmp_path / "data", tmp_path / "models"
    assert main(["synth", "--out", str(data), "--train", "32", "--test", "8", "--seed", "1"]) == 0
    assert main(["tiny", "--out", str(models)]) == 0
    out = tmp_path / "sft"
    args = _sft(
        models / "student",
        data / "train.json",
        out,
        "--max-steps 4 --batch-size 4 --grad-accum 2 --save-every 2 --lr 1e-3",
    )
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped"] == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    trained = Qwen2VLForConditionalGeneration.from_pretrained(out)
    base = Qwen2VLForConditionalGeneration.from_pretrained(models / "student")
    assert trained.config.to_dict()["text_config"] == base.config.to_dict()["text_config"]
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)

    ev = tmp_path / "eval"
    assert main(["eval", "--model", str(out), "--data", str(data / "test.json"), "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["per_skill"]) == {"attribute", "count", "spatial", "pattern"}
    predictions = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8

    # The export reloads with the stock auto class and, greedy, gives the same answers.
    stock = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(stock) is Qwen2VLForConditionalGeneration
    processor = VLProcessor.from_pretrained(out)
    encoder = Encoder(processor)
    prompts = [encoder.encode_prompt(r, data)[0] for r in load_records(data / "test.json")]
    answers = generate_answers(stock, processor, prompts, max_new_tokens=32)
    assert [a.strip() for a in answers] == [p["prediction"] for p in predictions]


def test_lora_sft_exports_a_merged_plain_checkpoint(tmp_path, tiny_models, synth_data):
    out = tmp_path / "lora"
    options = "--max-steps 2 --batch-size 4 --lora --lora-rank 4 --lora-alpha 4 --lr 1e-2"
    args = _sft(tiny_models["student"], synth_data / "train.json", out, options)
    assert main(args) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k for k in keys)
    merged = Qwen2VLForConditionalGeneration.from_pretrained(out)
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["student"])
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])  # adapters were merged in
    # LoRA leaves everything outside the adapters untouched.
    emb = "model.language_model.embed_tokens.weight"
    assert torch.equal(merged.state_dict()[emb], base.state_dict()[emb])


def test_bad_data_file_is_a_clear_error(tmp_path, tiny_models, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    code = main(
        ["sft", "--model", str(tiny_models["student"]), "--data", str(bad), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "bad.json:1: invalid JSON" in capsys.readouterr().err


def test_missing_required_option_is_a_clear_error(capsys):
    assert main(["sft", "--model", "x"]) == 2
    assert "missing required option --data" in capsys.readouterr().err


def test_freeze_vision_trains_only_the_language_side(tmp_path, tiny_models, synth_data):
    out = tmp_path / "frozen"
    options = "--max-steps 2 --batch-size 4 --freeze-vision --lr 1e-2"
    assert main(_sft(tiny_models["student"], synth_data / "train.json", out, options)) == 0
    before = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["student"]).state_dict()
    after = Qwen2VLForConditionalGeneration.from_pretrained(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.visual."))
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_no_resume_starts_clean(tmp_path, tiny_models, synth_data):
    out = tmp_path / "run"
    data = synth_data / "train.json"
    first = "--max-steps 3 --batch-size 4 --save-every 1 --log-every 1"
    assert main(_sft(tiny_models["student"], data, out, first)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    options = "--max-steps 2 --batch-size 4 --save-every 1 --log-every 1 --lr 5e-3 --no-resume"
    assert main(_sft(tiny_models["student"], data, out, options)) == 0
    # The old run's later checkpoints and log rows are gone, not left to outrank the new ones.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_yaml_config_values_take_the_option_types(tmp_path, tiny_models, synth_data, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {tiny_models['student']}\ndata: {synth_data / 'train.json'}\nlr: 1e-3\nmax_steps: 1\n"
    )
    assert main(["sft", "--config", str(config), "--out", str(tmp_path / "o"), "--batch-size", "2"]) == 0
    assert json.loads((tmp_path / "o" / "train_summary.json").read_text())["steps"] == 1
    config.write_text("lr: fast\n")
    assert main(["sft", "--config", str(config), "--model", "m", "--data", "d", "--out", "o"]) == 2
    assert "'lr' must be a float, got 'fast'" in capsys.readouterr().err


def _bf16_tied_copy(student, out):
    """The tiny student as a real 2B checkpoint ships: bf16, embeddings tied to the head."""
    shutil.copytree(student, out)
    model = Qwen2VLForConditionalGeneration.from_pretrained(student, dtype=torch.float32)
    model.config.tie_word_embeddings = model.config.get_text_config().tie_word_embeddings = True
    model.tie_weights()
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def _saved_dtypes(path) -> set:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}, set(f.keys())


def test_exports_keep_the_source_checkpoint_dtype(tmp_path, tiny_models, verbalizers, synth_data):
    source = _bf16_tied_copy(tiny_models["student"], tmp_path / "bf16")
    data = synth_data / "train.json"
    lora = "--max-steps 2 --batch-size 4 --lora --lora-rank 4 --lora-alpha 4 --lr 1e-2"
    assert main(_sft(source, data, tmp_path / "sft", lora)) == 0
    interact = ["interact", "--teacher", str(tiny_models["teacher"]), "--teacher-verbalizers",
                str(verbalizers["teacher"]), "--student", str(source), "--student-verbalizers",
                str(verbalizers["student"]), "--data", str(data), "--out", str(tmp_path / "interact"),
                "--max-steps", "1", "--batch-size", "4"]  # fmt: skip
    assert main(interact) == 0
    for out in (tmp_path / "sft", tmp_path / "interact"):
        dtypes, keys = _saved_dtypes(out)
        assert dtypes == {torch.bfloat16}
        assert "lm_head.weight" not in keys  # still tied: written once
        config = json.loads((out / "config.json").read_text())
        assert config["dtype"] == config["text_config"]["dtype"] == "bfloat16"
        loaded = AutoModelForImageTextToText.from_pretrained(out, dtype="auto")
        assert (
            loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.get_input_embeddings().weight
        )

    # LoRA was merged into the fp32 weights, then cast once: the same run from an fp32 copy of the source
    # (bf16 -> fp32 is exact) exports fp32 weights that cast to the bf16 export's bit for bit.
    fp32 = tmp_path / "fp32"
    shutil.copytree(source, fp32, ignore=shutil.ignore_patterns("model*.safetensors*"))
    Qwen2VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).save_pretrained(fp32)
    assert main(_sft(fp32, data, tmp_path / "sft32", lora)) == 0
    assert _saved_dtypes(tmp_path / "sft32")[0] == {torch.float32}
    bf16 = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "sft", dtype="auto").state_dict()
    full = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "sft32", dtype="auto").state_dict()
    assert all(torch.equal(full[k].to(torch.bfloat16), bf16[k]) for k in bf16)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    base = Qwen2VLForConditionalGeneration.from_pretrained(source, dtype="auto").state_dict()
    assert not torch.equal(bf16[q], base[q])  # the merged adapters survive the cast


def test_max_pixels_keeps_large_images_and_the_skips_are_reported_before_training(
    tmp_path, tiny_models, capsys
):
    # The tiny student with the stock Qwen2-VL ceiling (12,845,056 px), as the released checkpoints ship.
    source = tmp_path / "stock"
    shutil.copytree(tiny_models["student"], source)
    pre = json.loads((source / "preprocessor_config.json").read_text())
    pre["size"]["longest_edge"] = 12_845_056
    (source / "preprocessor_config.json").write_text(json.dumps(pre))
    # Half the records carry a 400 x 400 image: 625 tokens at 16 x 16 px each, over --max-length 256.
    records = []
    for i in range(8):
        size = 400 if i % 2 else 48
        Image.new("RGB", (size, size), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": turns})
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))

    options = "--max-steps 4 --batch-size 2 --max-length 256"
    assert main(_sft(source, data, tmp_path / "stock_ceiling", options)) == 0
    printed = capsys.readouterr().out
    assert "data: 8 of 8 records encoded before training; 4 (50.0%) would be skipped" in printed
    assert "too long: 4 (50.0%), e.g. record 1 (id 'r1'): too long: " in printed
    assert "lower --max-pixels" in printed

    out = tmp_path / "bounded"
    assert main(_sft(source, data, out, options + " --max-pixels 2304")) == 0
    assert (
        "data: 8 of 8 records encoded before training; 0 (0.0%) would be skipped" in capsys.readouterr().out
    )
    assert json.loads((out / "train_summary.json").read_text())["skipped"] == 0  # one epoch: every record
    # The export reads images as the run did, with no option.
    assert json.loads((out / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 2304
    assert VLProcessor.from_pretrained(out).image_processor.size["longest_edge"] == 2304


@pytest.mark.slow  # a subprocess
def test_python_dash_m_vlsi_is_the_command():
    """`python -m vlsi` (and so `accelerate launch -m vlsi`) runs the CLI; the docs launch it that way."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "vlsi", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "interact" in done.stdout and "teacher-cache" in done.stdout
    root = Path(__file__).resolve().parents[1]
    for doc in ("README.md", "docs/cluster.md"):
        assert "-m vlsi.run.cli" not in (root / doc).read_text(), doc
