"""Crash safety: a run killed with SIGKILL mid-step and started again with the same command ends where an
uninterrupted run ends (per-step losses, matches, exported weights and verbalizers), and a checkpoint from
other settings or another model is refused with a message that says what differs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vlsi.model.export import is_exported
from vlsi.run.cli import main

STEPS, SAVE_EVERY = 4, 1


def _interact(tiny_models, verbalizers, synth_data, out) -> list[str]:
    return [
        "interact",
        *("--teacher", str(tiny_models["teacher"]), "--teacher-verbalizers", str(verbalizers["teacher"])),
        *("--student", str(tiny_models["student"]), "--student-verbalizers", str(verbalizers["student"])),
        *("--data", str(synth_data / "train.json"), "--out", str(out)),
        # The full VLsI matching samples from a seeded generator: its state must survive the restart too.
        *("--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--log-every", "1"),
        *("--batch-size", "2", "--lr", "1e-3", "--seed", "5"),
    ]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _kill_after_first_checkpoint(args: list[str], out) -> int:
    """Starts ``vlsi`` in a subprocess, SIGKILLs it as soon as a checkpoint is complete; the step it died in."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlsi.run.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = out / "checkpoints" / f"step-{SAVE_EVERY:07d}" / "state.json"
    deadline = time.monotonic() + 180
    while not first.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint appeared: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return max(r["step"] for r in _rows(out / "train_log.jsonl"))


@pytest.mark.slow
def test_sigkilled_interaction_resumes_to_the_uninterrupted_result(
    tmp_path, tiny_models, verbalizers, synth_data
):
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert main(_interact(tiny_models, verbalizers, synth_data, reference)) == 0

    args = _interact(tiny_models, verbalizers, synth_data, run)
    died_after = _kill_after_first_checkpoint(args, run)
    assert SAVE_EVERY <= died_after < STEPS and not is_exported(run)
    assert main(args) == 0  # the very same command
    assert is_exported(run)

    want, got = _rows(reference / "train_log.jsonl"), _rows(run / "train_log.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    # The sampled matches continue the same random sequence.
    assert _rows(run / "match_log.jsonl") == _rows(reference / "match_log.jsonl")
    for key in ("first", "last"):
        matches = json.loads((run / "matches.json").read_text())
        assert matches[key] == json.loads((reference / "matches.json").read_text())[key]
    for weights in ("model.safetensors", "verbalizers/verbalizers.safetensors"):
        a, b = load_file(run / weights), load_file(reference / weights)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sigkilled_on_policy_interaction_resumes_to_the_uninterrupted_result(
    tmp_path, tiny_models, verbalizers, synth_data
):
    # Half the batches sampled by the student: the draws, the sampled tokens and the matches must all continue
    # as they would have.
    on_policy = ["--lmbda", "0.5", "--gen-temperature", "1.0", "--gen-max-new-tokens", "4"]
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert main([*_interact(tiny_models, verbalizers, synth_data, reference), *on_policy]) == 0
    generated = [r["step"] for r in _rows(reference / "on_policy.jsonl")]
    assert 0 < len(generated) < STEPS  # both kinds of batch, for this seed

    args = [*_interact(tiny_models, verbalizers, synth_data, run), *on_policy]
    died_after = _kill_after_first_checkpoint(args, run)
    assert SAVE_EVERY <= died_after < STEPS and not is_exported(run)
    assert main(args) == 0
    assert _rows(run / "on_policy.jsonl") == _rows(reference / "on_policy.jsonl")
    assert _rows(run / "train_log.jsonl") == _rows(reference / "train_log.jsonl")
    assert _rows(run / "match_log.jsonl") == _rows(reference / "match_log.jsonl")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["on_policy"]["batches"] == len(generated)
    a, b = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in b)


def _sft(model, data, out, options: str = "") -> list[str]:
    base = f"--max-steps 2 --batch-size 4 --save-every 1 {options}"
    return ["sft", "--model", str(model), "--data", str(data), "--out", str(out), *base.split()]


def test_a_checkpoint_from_other_settings_is_refused_naming_them(tmp_path, tiny_models, synth_data, capsys):
    out, data = tmp_path / "run", synth_data / "train.json"
    assert main(_sft(tiny_models["student"], data, out, "--lr 1e-3")) == 0
    capsys.readouterr()
    assert main(_sft(tiny_models["student"], data, out, "--lr 5e-3 --max-steps 3")) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "lr: 0.001 -> 0.005" in err and "--no-resume" in err
    assert "max_steps: 2 -> 3" in err


def test_a_checkpoint_of_another_model_at_the_same_path_is_refused(tmp_path, tiny_models, synth_data, capsys):
    model, out, data = tmp_path / "model", tmp_path / "run", synth_data / "train.json"
    shutil.copytree(tiny_models["student"], model)
    assert main(_sft(model, data, out)) == 0
    # Same path, same settings: only the weights' shapes tell that the model was replaced.
    shutil.rmtree(model)
    shutil.copytree(tiny_models["teacher"], model)
    capsys.readouterr()
    assert main(_sft(model, data, out)) == 2
    err = capsys.readouterr().err
    assert "another model" in err and "->" in err


def test_unset_image_bounds_leave_the_resume_fingerprint_as_it_was():
    # --min-pixels / --max-pixels came after runs had started: a checkpoint written before them still resumes.
    import dataclasses

    from vlsi.train.checkpointing import fingerprint
    from vlsi.train.runtime import BOOKKEEPING, run_fingerprint
    from vlsi.train.sft import SFTConfig

    cfg = SFTConfig(model="m", data="d", out="o", group_by_length=False)  # grouped adds its own key
    earlier = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in (*BOOKKEEPING, "min_pixels", "max_pixels")
    }
    assert run_fingerprint(cfg, 2) == fingerprint(dict(earlier, world=2))
    assert run_fingerprint(dataclasses.replace(cfg, max_pixels=1024), 2) != run_fingerprint(cfg, 2)


def test_a_grouped_order_from_before_its_span_was_an_optimizer_step_is_refused():
    # Grouped checkpoints of the earlier grouping (spans of a micro-batch) would resume in another order.
    from vlsi.train.checkpointing import fingerprint
    from vlsi.train.runtime import run_fingerprint
    from vlsi.train.sft import SFTConfig

    grouped = run_fingerprint(SFTConfig(model="m", data="d", out="o"), 1)
    assert grouped.settings["length_groups"] == "per optimizer step"
    earlier = {k: v for k, v in grouped.settings.items() if k != "length_groups"}
    assert fingerprint({**grouped.assumed, **earlier}) != grouped
    plain = run_fingerprint(SFTConfig(model="m", data="d", out="o", group_by_length=False), 1)
    assert "length_groups" not in plain.settings
    # How batches are loaded is not what they hold: a resume may change it.
    cfg = SFTConfig(model="m", data="d", out="o", num_workers=4, prefetch_factor=8)
    assert run_fingerprint(cfg, 1) == grouped
