"""Loading models: a name that is neither a folder nor a hub id is refused as such; LoRA adapters go where
the plan counts them."""

from __future__ import annotations

import pytest
import torch

from vlsi.model.loading import load_model, resolve_model
from vlsi.model.lora import apply_lora
from vlsi.run.cli import main
from vlsi.run.memory import lora_parameters


def test_a_mistyped_model_folder_is_named_as_one(tmp_path, synth_data, capsys):
    missing = tmp_path / "runs" / "sft-typo"
    args = [
        "sft",
        "--model",
        str(missing),
        "--data",
        str(synth_data / "train.json"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"'{missing}' is not a folder, and the hub id could not be reached/resolved" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_interact_names_a_missing_teacher(tmp_path, tiny_models, verbalizers, synth_data, capsys):
    missing = tmp_path / "teacher-typo"
    args = [
        "interact",
        *("--teacher", str(missing), "--teacher-verbalizers", str(verbalizers["teacher"])),
        *("--student", str(tiny_models["student"]), "--student-verbalizers", str(verbalizers["student"])),
        *("--data", str(synth_data / "train.json"), "--out", str(tmp_path / "o")),
    ]
    assert main(args) == 2
    assert f"'{missing}' is not a folder" in capsys.readouterr().err


def test_a_file_is_not_a_model(tmp_path, tiny_models):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; a model is a checkpoint folder or a hub id"):
        load_model(weights)
    assert resolve_model(tiny_models["student"]) == str(tiny_models["student"])


def test_lora_adapters_are_where_the_plan_counts_them(tiny_models):
    model = load_model(tiny_models["student"], dtype=torch.float32)
    expected = lora_parameters(model, rank=4)
    adapted = apply_lora(model, rank=4, alpha=4, seed=0)
    # What peft actually added, counted by name, against the plan's formula over the same pattern.
    added = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    assert added == expected > 0
    assert not any("lora_" in name for name, _ in adapted.named_parameters() if ".visual." in name)
