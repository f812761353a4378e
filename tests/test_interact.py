"""VLsI step 2 end to end through the real command line, on the tiny models and verbalizers."""

import hashlib
import json
import shutil

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from vlsi.run.cli import main

STEPS = 4


def _args(teacher, teacher_verb, student, student_verb, data, out, options: str = "") -> list[str]:
    paths = {
        "teacher": teacher,
        "teacher-verbalizers": teacher_verb,
        "student": student,
        "student-verbalizers": student_verb,
        "data": data / "train.json",
        "out": out,
    }
    flags = [x for name, path in paths.items() for x in (f"--{name}", str(path))]
    return ["interact", *flags, "--batch-size", "4", "--lr", "1e-3", "--log-every", "1", *options.split()]


def _run(tiny_models, verbalizers, synth_data, out, options: str = "") -> int:
    teacher, student = tiny_models["teacher"], tiny_models["student"]
    return main(
        _args(teacher, verbalizers["teacher"], student, verbalizers["student"], synth_data, out, options)
    )


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # a real training run with every output checked
def test_interact_trains_the_student_and_records_ordered_matches(
    tmp_path, tiny_models, verbalizers, synth_data
):
    teacher_weights = tiny_models["teacher"] / "model.safetensors"
    before = _sha(teacher_weights)
    out = tmp_path / "run"
    assert _run(tiny_models, verbalizers, synth_data, out, f"--max-steps {STEPS} --save-every 2") == 0
    assert _sha(teacher_weights) == before

    trained = Qwen2VLForConditionalGeneration.from_pretrained(out)
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["student"])
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[q], base.state_dict()[q])
    assert (out / "verbalizers" / "verbalizers.safetensors").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_loss"] > 0
    assert set(summary["final_loss_parts"]) == {"il", "ll", "ar"} and summary["final_loss_parts"]["ar"] == 0

    matches = json.loads((out / "matches.json").read_text())
    t_s, t_l = len(matches["student_layers"]), len(matches["teacher_layers"])
    assert (t_s, t_l) == (3, 7)  # tiny student 4 layers, teacher 8: every layer but the last
    for key in ("first", "last"):
        counts = torch.tensor(matches[key])
        assert counts.shape == (t_s, t_l)
        assert counts.sum(1).tolist() == [matches["window_steps"]] * t_s
        assert (out / f"matches_{key}.png").stat().st_size > 0

    rows = [json.loads(line) for line in (out / "match_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        (chosen,) = row["teacher_index"]  # one micro-batch per step
        assert len(chosen) == t_s
        assert all(a < b for a, b in zip(chosen, chosen[1:], strict=False)), chosen
        # Algorithm 1's search range leaves room for the later student layers.
        assert all(c <= t_l - t_s + i for i, c in enumerate(chosen))

    state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
    (mine,) = state["per_process"]
    assert len(mine["generator"]) > 0 and torch.tensor(mine["first"]).sum() == t_s


@pytest.mark.slow  # two training runs
def test_final_layer_only_and_uniform_matching(tmp_path, tiny_models, verbalizers, synth_data):
    out = tmp_path / "ll_only"
    assert _run(tiny_models, verbalizers, synth_data, out, "--max-steps 2 --il none --ll kld") == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(row["il"] == 0 and row["ll"] > 0 for row in log)
    assert not (out / "match_log.jsonl").exists()

    out = tmp_path / "uniform"
    assert _run(tiny_models, verbalizers, synth_data, out, "--max-steps 2 --strategy uniform") == 0
    matches = json.loads((out / "matches.json").read_text())
    expected = torch.zeros(3, 7, dtype=torch.int64)
    expected[[0, 1, 2], [0, 2, 4]] = 1  # i_l = i_s * floor(7 / 3)
    assert torch.equal(torch.tensor(matches["first"]), expected)
    assert torch.equal(torch.tensor(matches["last"]), expected)


def test_a_student_taught_by_itself_has_zero_loss(tmp_path, tiny_models, verbalizers, synth_data):
    student, verb = tiny_models["student"], verbalizers["student"]
    out = tmp_path / "self"
    assert main(_args(student, verb, student, verb, synth_data, out, "--max-steps 1")) == 0
    (row,) = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert row["loss"] == pytest.approx(0.0, abs=1e-5)
    # With t_s == t_l, the search range and order preservation leave only the diagonal.
    (match,) = [json.loads(line) for line in (out / "match_log.jsonl").read_text().splitlines()]
    assert match["teacher_index"] == [[0, 1, 2]]


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_models, verbalizers, synth_data, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models["teacher"], teacher)
    tokenizer_file = teacher / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, two ids swapped: merges still load
    tokenizer_file.write_text(json.dumps(tokenizer))
    out = tmp_path / "refused"
    args = _args(
        teacher, verbalizers["teacher"], tiny_models["student"], verbalizers["student"], synth_data, out
    )
    assert main([*args, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "tokenizers differ" in err and "spell different tokens" in err
    assert not (out / "model.safetensors").exists()
