"""What the engines refuse before any weights load (DeepSpeed is not installed in the CI: the accelerator
is a stand-in carrying what a ZeRO-3 launch reports, and the refusal must come before ``load_model``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

import vlsi.train.interact as interact
import vlsi.train.teacher_cache_build as teacher_cache_build
import vlsi.train.verbalize as verbalize
from vlsi.run.cli import main


def _zero3(*_args, **_kwargs):
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)),
        num_processes=8,
        process_index=0,
        is_main_process=True,
    )


def _no_weights(*_args, **_kwargs):
    raise AssertionError("weights were loaded before the refusal")


@pytest.fixture
def under_zero3(monkeypatch):
    for module in (interact, verbalize, teacher_cache_build):
        monkeypatch.setattr(module, "make_accelerator", _zero3)
    for module in (interact, verbalize):
        monkeypatch.setattr(module, "load_model", _no_weights)


def test_zero3_refuses_frozen_models_before_any_weights_load(
    under_zero3, tiny_models, verbalizers, synth_data, tmp_path, capsys
):
    data = str(synth_data / "train.json")
    teacher = ("--teacher", str(tiny_models["teacher"]), "--teacher-verbalizers", str(verbalizers["teacher"]))
    runs = {
        "step 2 with a live teacher": [
            "interact",
            *teacher,
            *("--student", str(tiny_models["student"]), "--student-verbalizers", str(verbalizers["student"])),
            *("--data", data, "--out", str(tmp_path / "interact")),
        ],
        "step 1": ["verbalize-train", "--model", str(tiny_models["teacher"]), "--data", data],
        "building a teacher cache": ["teacher-cache", *teacher, "--data", data, "--out", str(tmp_path / "c")],
    }
    for what, args in runs.items():
        if what == "step 1":
            args += ["--out", str(tmp_path / "verb")]
        assert main(args) == 2, what
        err = capsys.readouterr().err
        assert f"{what}" in err and "ZeRO-3 is not offered" in err and "146 GB" in err, err[-2000:]
        assert "configs/accelerate/fsdp2.yaml" in err


@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_the_frozen_teachers_verbalizers_are_kept_in_the_teachers_dtype(
    precision, dtype, tiny_models, verbalizers
):
    """bf16 teacher: bf16 verbalizers, their norm copies too (half the bytes of fp32); fp32 teacher: the saved
    fp32 weights unchanged."""
    import torch
    from safetensors.torch import load_file

    from vlsi.model.verbalizer import WEIGHTS_FILE

    accelerator = SimpleNamespace(distributed_type=DistributedType.NO, device=torch.device("cpu"))
    cfg = SimpleNamespace(
        teacher=str(tiny_models["teacher"]),
        teacher_verbalizers=str(verbalizers["teacher"]),
        precision=precision,
    )
    backbone, teacher_verbalizers = interact._load_teacher(cfg, accelerator)
    state = teacher_verbalizers.state_dict()
    assert {str(v.dtype) for v in state.values()} == {f"torch.{dtype}"}
    assert any(".norm." in k for k in state)
    assert next(backbone.model.parameters()).dtype == getattr(torch, dtype)
    saved = load_file(str(verbalizers["teacher"] / WEIGHTS_FILE))
    for key, value in saved.items():
        assert torch.equal(state[key], value.to(getattr(torch, dtype))), key
