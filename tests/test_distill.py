"""`vlsi distill`: the stage order, the controls' budget, markers that make a rerun skip, and the report."""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from vlsi.run.cli import main
from vlsi.run.distill import MODELS, TINY_PRESET, DistillConfig, check_config, control_budget, record_config
from vlsi.train.interact import InteractSettings
from vlsi.train.sft import SFTSettings
from vlsi.train.verbalize import VerbalizeSettings

# Every step of the built-in setting shrunk to a few updates on a few records.
SMALL = (
    "--tiny-train 16 --tiny-pool 24 --tiny-val 3 --tiny-test 4 --tiny-vision-steps 2 --tiny-eval-every 1 "
    "--tiny-steps 2 --tiny-student-steps 2 --tiny-batch-size 4 "
    "--verbalize-max-steps 2 --verbalize-batch-size 4 --interact-max-steps 2 --interact-batch-size 4 "
    "--interact-save-every 1 --sft-max-steps 3 --sft-batch-size 4 --eval-batch-size 8"
).split()


def test_control_budget_matches_steps_2_and_3():
    assert control_budget(InteractSettings(max_steps=5), SFTSettings(max_steps=7)) == {"max_steps": 12}
    budget = control_budget(InteractSettings(epochs=1.0), SFTSettings(epochs=0.5))
    assert budget == {"max_steps": 0, "epochs": 1.5}
    with pytest.raises(ValueError, match="max_steps on both"):
        control_budget(InteractSettings(max_steps=5), SFTSettings())


def test_tiny_preset_names_only_real_options():
    # A typo in the preset would only surface when a user runs `vlsi distill`; build it here.
    from vlsi.run.config import build_config

    cfg = build_config(DistillConfig, object(), TINY_PRESET)
    assert cfg.controls and cfg.interact.max_steps == TINY_PRESET["interact"]["max_steps"]


@pytest.mark.slow  # the whole tiny setting with its controls
def test_builtin_setting_end_to_end_and_rerun_skips(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--out", str(out), *SMALL]
    assert main(args) == 0

    # The teacher base learned from the pool, the student base from the distillation set.
    teacher_sft = json.loads((out / "teacher_sft" / "train_summary.json").read_text())
    student_sft = json.loads((out / "student_sft" / "train_summary.json").read_text())
    assert teacher_sft["records"] == 24 and student_sft["records"] == 16
    assert (out / "stage0_vision" / "vision_summary.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(MODELS)
    for metrics in results.values():
        assert metrics["n"] == 4 * 3 and 0.0 <= metrics["accuracy"] <= 1.0
    report = (out / "report.md").read_text()
    assert "| VLsI student (`vlsi`) |" in report and "step2_interact/matches_last.png" in report
    assert "curves.png" in report and (out / "curves.png").exists() and (out / "skills.png").exists()
    # The SFT control had steps 2 + 3's updates; final-layer KD trained no verbalized layer.
    control = json.loads((out / "control_sft" / "train_summary.json").read_text())
    assert control["steps"] == 2 + 3
    kd = json.loads((out / "control_kd_step2" / "train_summary.json").read_text())
    assert kd["final_loss_parts"]["il"] == 0.0 and kd["final_loss_parts"]["ll"] > 0.0
    vlsi = json.loads((out / "step2_interact" / "train_summary.json").read_text())
    assert vlsi["final_loss_parts"]["il"] > 0.0
    resolved = yaml.safe_load((out / "distill_config.yaml").read_text())
    assert resolved["interact"]["max_steps"] == 2 and resolved["controls"] is True

    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[run ]" not in printed and printed.count("[skip]") >= 10


@pytest.mark.slow  # the whole tiny setting on the grid task
def test_grid_task_with_captions_still_runs(tmp_path):
    # The earlier task, with its train-only captions: records of another shape and length.
    out = tmp_path / "grid"
    grid = ["--tiny-task", "grid", "--tiny-captions", "--tiny-train", "32", "--tiny-test", "8"]
    assert main(["distill", "--out", str(out), *SMALL, *grid, "--no-controls"]) == 0
    assert "caption" in {r["skill"] for r in json.loads((out / "data" / "train.json").read_text())}
    assert all(r["skill"] != "caption" for r in json.loads((out / "data" / "test.json").read_text()))
    assert json.loads((out / "results.json").read_text())["vlsi"]["n"] == 8


def test_config_with_a_teacher_needs_student_and_data(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "o"), "teacher": "some/teacher"}))
    assert main(["distill", "--config", str(config)]) == 2
    assert "needs 'student' and 'train_data'" in capsys.readouterr().err


@pytest.mark.slow  # steps 1-3 end to end
def test_config_runs_the_three_steps_on_given_models(tmp_path, tiny_models, synth_data):
    config = {
        "out": str(tmp_path / "o"),
        "teacher": str(tiny_models["teacher"]),
        "student": str(tiny_models["student"]),
        "train_data": str(synth_data / "train.json"),
        "student_layers": "1",
        "verbalize": {"max_steps": 1, "batch_size": 4},
        "interact": {"max_steps": 2, "batch_size": 4, "strategy": "uniform"},
        "sft": {"max_steps": 1, "batch_size": 4},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(path)]) == 0
    out = tmp_path / "o"
    matches = json.loads((out / "step2_interact" / "matches.json").read_text())
    assert matches["student_layers"] == [1] and matches["steps"] == 2
    assert (out / "step3_sft" / "export_complete.json").exists()
    # No test data, no controls: nothing is evaluated and no control is trained.
    assert not (out / "results.json").exists() and not (out / "control_sft").exists()


def test_bad_settings_are_refused_before_any_training():
    with pytest.raises(ValueError, match="max_steps on both"):
        check_config(DistillConfig(controls=True, interact=InteractSettings(max_steps=5)))
    with pytest.raises(ValueError, match="3 student layers but only 2 teacher layers"):
        check_config(DistillConfig(teacher_layers="1,2", student_layers="0,1,2"))
    with pytest.raises(ValueError, match="--il"):
        check_config(DistillConfig(interact=InteractSettings(il="mse")))


def test_rerun_with_other_settings_is_refused(tmp_path):
    cfg = DistillConfig(out=str(tmp_path / "a"))
    record_config(cfg, tmp_path)
    # Moving the run, adding the controls or another eval batch leaves finished stages valid.
    record_config(
        dataclasses.replace(cfg, out=str(tmp_path / "b"), controls=True, eval_batch_size=4), tmp_path
    )
    with pytest.raises(ValueError, match=r"\(interact.lr differ"):
        record_config(dataclasses.replace(cfg, interact=InteractSettings(lr=1.0)), tmp_path)


def test_an_option_newer_than_the_run_counts_as_its_default(tmp_path):
    cfg = DistillConfig(out=str(tmp_path / "a"))
    record_config(cfg, tmp_path)
    path = tmp_path / "distill_config.yaml"
    older = yaml.safe_load(path.read_text())
    del older["step3_data"]  # as a run recorded before the option existed
    path.write_text(yaml.safe_dump(older))
    record_config(cfg, tmp_path)
    path.write_text(yaml.safe_dump(older))
    with pytest.raises(ValueError, match="step3_data differ"):
        record_config(dataclasses.replace(cfg, step3_data="other.json"), tmp_path)


def test_a_step_option_newer_than_the_run_reads_as_what_the_run_did(tmp_path):
    # A run recorded before its steps had group_by_length (it shuffled plainly) and --num-workers.
    plain = {"group_by_length": False}
    cfg = DistillConfig(
        out=str(tmp_path / "a"),
        verbalize=VerbalizeSettings(**plain),
        interact=InteractSettings(**plain),
        sft=SFTSettings(**plain),
    )
    record_config(cfg, tmp_path)
    path = tmp_path / "distill_config.yaml"
    older = yaml.safe_load(path.read_text())
    for step in ("verbalize", "interact", "sft"):
        for key in ("group_by_length", "num_workers", "prefetch_factor"):
            del older[step][key]
    path.write_text(yaml.safe_dump(older))
    record_config(cfg, tmp_path)
    path.write_text(yaml.safe_dump(older))
    # How batches are loaded may change; their order may not (the steps' default is grouped now).
    record_config(dataclasses.replace(cfg, sft=SFTSettings(**plain, num_workers=2)), tmp_path)
    path.write_text(yaml.safe_dump(older))
    with pytest.raises(ValueError, match=r"\(sft.group_by_length differ"):
        record_config(dataclasses.replace(cfg, sft=SFTSettings()), tmp_path)


def test_the_tiny_setting_keeps_the_plain_shuffle():
    # Its numbers were made so; every step of a run on given models groups by length unless told not to.
    from pathlib import Path

    from vlsi.run.pipeline import TinySettings, base_sft_config

    for step in ("verbalize", "interact", "sft"):
        assert TINY_PRESET[step]["group_by_length"] is False
    assert base_sft_config(TinySettings(), Path("m"), Path("d"), Path("o")).group_by_length is False
    assert SFTSettings().group_by_length and InteractSettings().group_by_length


def test_tiny_preset_applies_only_without_a_teacher():
    from vlsi.run.cli import _default_values

    assert _default_values("distill", argparse.Namespace(teacher=None)) is TINY_PRESET
    assert _default_values("distill", argparse.Namespace(teacher="Qwen/Qwen2-VL-72B-Instruct")) is None


def _distill(out) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "vlsi.run.cli", "distill", "--out", str(out), *SMALL]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_distill_resumes_its_unfinished_stage(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = _distill(killed)
    # Killed once step 2 has written its first checkpoint: steps before it are finished, step 2 is not.
    first = killed / "step2_interact" / "checkpoints" / "step-0000001" / "state.json"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "step2_interact" / "train_summary.json").exists()

    rerun = _distill(killed)
    printed = rerun.communicate()[0]
    assert rerun.returncode == 0, printed[-3000:]
    assert "[skip] step 1: verbalizers of the student" in printed and "[run ] step 2: interaction" in printed
    reference = _distill(whole)
    assert reference.communicate()[0] and reference.returncode == 0

    def losses(root):
        return [
            json.loads(line)["loss"]
            for line in (root / "step2_interact/train_log.jsonl").read_text().splitlines()
        ]

    assert losses(killed) == pytest.approx(losses(whole), rel=1e-6)
    ours, theirs = (json.loads((root / "results.json").read_text()) for root in (killed, whole))
    assert {k: m["accuracy"] for k, m in ours.items()} == {k: m["accuracy"] for k, m in theirs.items()}


@pytest.mark.slow  # the whole tiny setting in a regime of the map: new images, phrased answers, teacher labels
def test_builtin_setting_on_new_images_with_the_teachers_answers(tmp_path):
    out = tmp_path / "run"
    args = ["distill", "--out", str(out), *SMALL, "--tiny-distill", "8", "--tiny-answers", "free"]
    # A teacher trained long enough to answer something (a 2-step one answers nothing, and every record would
    # be dropped as unanswered).
    assert main([*args, "--tiny-labels", "teacher", "--tiny-steps", "40"]) == 0
    labelled = json.loads((out / "data" / "distill_teacher_answers.json").read_text())
    phrased = json.loads((out / "data" / "distill.json").read_text())
    assert len(labelled) == len(phrased) == 8
    assert [r["digits"] for r in labelled] == [r["digits"] for r in phrased]
    # Steps 1-3 and the controls trained on the teacher's answers to the new images, not on the student's set.
    control = json.loads((out / "control_sft" / "train_summary.json").read_text())
    assert control["records"] == 8
    for name in ("results.json", "results_val.json"):
        results = json.loads((out / name).read_text())
        assert set(results) == set(MODELS)
    assert json.loads((out / "results_val.json").read_text())["vlsi"]["n"] == 3 * 3


def test_image_bounds_reach_every_step_and_export(tmp_path, tiny_models, verbalizers, synth_data):
    from vlsi.run.distill import Distiller

    root, cache = tmp_path / "run", tmp_path / "cache"
    cfg = DistillConfig(
        out=str(root),
        max_pixels=1024,  # the tiny checkpoints' own: 2304
        interact=InteractSettings(max_steps=1, batch_size=4, teacher_cache=str(cache)),
        sft=SFTSettings(max_steps=1, batch_size=4),
    )
    teacher, student = str(tiny_models["teacher"]), str(tiny_models["student"])
    distiller = Distiller(cfg, teacher, student, str(synth_data / "train.json"))
    # The cache's teacher and step 2's student read images alike, or step 2 would refuse the cache.
    distiller.teacher_cache(verbalizers["teacher"])
    step2 = distiller.interact(root / "step2", student, verbalizers["teacher"], verbalizers["student"], "2")
    step3 = distiller.sft(root / "step3", str(step2), "3")
    for out in (step2, step3):
        assert json.loads((out / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 1024


def test_no_stage_s_models_survive_into_the_next(tmp_path, tiny_models, synth_data, monkeypatch):
    import gc
    import weakref

    import vlsi.model.loading as loading
    import vlsi.run.distill as distill
    import vlsi.train.interact as interact
    import vlsi.train.sft as sft
    import vlsi.train.verbalize as verbalize

    loaded: list[tuple[str, weakref.ref]] = []  # (stage, model) of every checkpoint a stage loaded
    survivors: dict[str, list[str]] = {}  # stage -> earlier stages whose models were alive at its start
    stage = [""]

    def recorded(load):
        def load_model(*args, **kwargs):
            model = load(*args, **kwargs)
            loaded.append((stage[0], weakref.ref(model)))
            return model

        return load_model

    def staged(name, run):
        def wrapper(cfg):
            survivors[name] = sorted({s for s, ref in loaded if ref() is not None})
            stage[0] = name
            return run(cfg)

        return wrapper

    # Frozen backbones load through engines.load_frozen, which imports loading.load_model when it runs.
    for module in (verbalize, interact, sft, loading):
        monkeypatch.setattr(module, "load_model", recorded(module.load_model))
    monkeypatch.setattr(distill, "train_verbalizers", staged("step1", distill.train_verbalizers))
    monkeypatch.setattr(distill, "train_interaction", staged("step2", distill.train_interaction))
    monkeypatch.setattr(distill, "train_sft", staged("step3", distill.train_sft))
    cfg = DistillConfig(
        out=str(tmp_path / "run"),
        student_layers="1",
        verbalize=VerbalizeSettings(max_steps=1, batch_size=4),
        interact=InteractSettings(max_steps=1, batch_size=4),
        sft=SFTSettings(max_steps=1, batch_size=4),
    )
    teacher, student = str(tiny_models["teacher"]), str(tiny_models["student"])
    # The cyclic collector off, as when a stage allocates few Python objects: only what distill frees is freed.
    gc.disable()
    try:
        distill.Distiller(cfg, teacher, student, str(synth_data / "train.json")).run()
    finally:
        gc.enable()
    assert [s for s, _ in loaded].count("step1") == 2 and {"step2", "step3"} <= {s for s, _ in loaded}
    # Step 1's teacher (and everything else) is gone before the next stage starts, and after the last one.
    assert survivors == {"step1": [], "step2": [], "step3": []}
    assert all(ref() is None for _, ref in loaded)
