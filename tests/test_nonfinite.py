"""A step whose loss or gradient norm is inf or nan stops the run there, naming the step and its records, and
leaves the checkpoints already written as they were: for all three training loops.

The non-finite values are real: a copy of a tiny model whose embedding row of one token ("~", which the
synthetic data never uses) is nan, and a data file where one record, placed to land in step 3, asks its
question with that token. Every other record trains normally.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from vlsi.data.processing import VLProcessor
from vlsi.data.records import BatchStream
from vlsi.model.export import is_exported
from vlsi.run.cli import main
from vlsi.train.checkpointing import STATE_FILE, CheckpointManager
from vlsi.train.runtime import Batch, NonFiniteError, check_finite, make_accelerator
from vlsi.train.training import _window

POISON = "~"
BATCH, SEED, BAD_STEP = 4, 0, 3


def poison_model(source, dest):
    """A copy of ``source`` whose embedding of ``POISON`` is nan: any sequence holding it goes nan."""
    shutil.copytree(source, dest)
    token_ids = VLProcessor.from_pretrained(dest).tokenizer.encode(POISON, add_special_tokens=False)
    assert len(token_ids) == 1
    weights = load_file(dest / "model.safetensors")
    (key,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    weights[key][token_ids[0]] = float("nan")
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def poison_data(synth_data, path):
    """The synthetic train set with the record that the seeded order puts first in step ``BAD_STEP`` made to
    use the poisoned token; returns (clean records, its index)."""
    records = json.loads((synth_data / "train.json").read_text())
    assert POISON not in json.dumps(records)
    stream = BatchStream(len(records), BATCH, SEED)
    index = [stream.next_indices() for _ in range(BAD_STEP)][-1][0]
    bad = json.loads(json.dumps(records))
    bad[index]["id"] = "poisoned"
    bad[index]["conversations"][0]["value"] += f" {POISON}"
    path.write_text(json.dumps(bad))
    return records, index


def assert_stopped_at_bad_step(err: str, out):
    assert f"step {BAD_STEP}: non-finite training values" in err, err[-2000:]
    assert "(id 'poisoned')" in err
    # Steps 1 and 2 were saved; the bad step reached neither a checkpoint nor an export.
    ckpts = CheckpointManager(out / "checkpoints").checkpoints()
    assert [p.name for p in ckpts] == ["step-0000001", "step-0000002"]
    assert json.loads((ckpts[-1] / STATE_FILE).read_text())["step"] == 2
    assert not is_exported(out) and not (out / "train_summary.json").exists()


def _common(data, synth_data, out) -> list[str]:
    return [
        *("--data", str(data), "--image-root", str(synth_data), "--out", str(out)),
        *("--max-steps", "4", "--save-every", "1", "--batch-size", str(BATCH), "--seed", str(SEED)),
        "--no-group-by-length",  # poison_data finds the bad step's record in the plain shuffle
    ]


def test_sft_stops_at_a_nan_step_and_resumes_from_the_last_checkpoint(
    tmp_path, tiny_models, synth_data, capsys
):
    model = poison_model(tiny_models["student"], tmp_path / "model")
    data, out = tmp_path / "train.json", tmp_path / "sft"
    records, _ = poison_data(synth_data, data)
    args = ["sft", "--model", str(model), *_common(data, synth_data, out), "--lr", "1e-3"]
    assert main(args) == 2
    assert_stopped_at_bad_step(capsys.readouterr().err, out)
    # With the record fixed, the same command resumes from step 2 and finishes.
    data.write_text(json.dumps(records))
    assert main(args) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4
    assert [json.loads(row)["step"] for row in (out / "train_log.jsonl").read_text().splitlines()] == [4]


def test_verbalize_train_stops_at_a_nan_step(tmp_path, tiny_models, synth_data, capsys):
    model = poison_model(tiny_models["teacher"], tmp_path / "model")
    data, out = tmp_path / "train.json", tmp_path / "verb"
    poison_data(synth_data, data)
    held_out = str(synth_data / "test.json")
    args = [
        "verbalize-train",
        "--model",
        str(model),
        *_common(data, synth_data, out),
        "--eval-data",
        held_out,
    ]
    assert main(args) == 2
    assert_stopped_at_bad_step(capsys.readouterr().err, out)
    assert not (out / "verbalizers.json").exists()


def test_interact_stops_at_a_nan_step(tmp_path, tiny_models, verbalizers, synth_data, capsys):
    student = poison_model(tiny_models["student"], tmp_path / "model")
    data, out = tmp_path / "train.json", tmp_path / "interact"
    poison_data(synth_data, data)
    args = [
        "interact",
        *("--teacher", str(tiny_models["teacher"]), "--teacher-verbalizers", str(verbalizers["teacher"])),
        *("--student", str(student), "--student-verbalizers", str(verbalizers["student"])),
        *_common(data, synth_data, out),
    ]
    assert main(args) == 2
    assert_stopped_at_bad_step(capsys.readouterr().err, out)


def test_a_non_finite_gradient_norm_alone_stops_the_step():
    accelerator = make_accelerator("fp32", 0)
    batch = Batch(input_ids=torch.zeros(1, 2, dtype=torch.long))
    batch.record_ids = ["record 7 (id 'x')"]
    check_finite(accelerator, 1, torch.tensor([1.0, 2.0]), torch.tensor(0.5), [batch])  # finite: passes
    with pytest.raises(
        NonFiniteError, match=r"step 9: .*loss finite, gradient norm inf.*record 7 \(id 'x'\)"
    ):
        check_finite(accelerator, 9, 3.0, torch.tensor(float("inf")), [batch])
    with pytest.raises(NonFiniteError, match=r"loss \[1.0, nan\], gradient norm None"):
        check_finite(accelerator, 2, torch.tensor([1.0, float("nan")]), None, [batch])


class _SteppingBackward(Accelerator):
    """accelerate's backward under DeepSpeed (``DeepSpeedEngineWrapper.backward``): the backward, then the
    engine's step (clip, update, zero grad) on the last micro-batch. DeepSpeed itself is not installed here;
    what the loop must respect is this order."""

    optimizer = None

    @property
    def distributed_type(self):
        return DistributedType.DEEPSPEED

    def backward(self, loss, **kwargs):
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def test_under_deepspeed_a_non_finite_loss_stops_before_the_backward_that_steps():
    accelerator = make_accelerator("fp32", 0)
    accelerator.__class__ = _SteppingBackward
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    accelerator.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = [p.detach().clone() for p in module.parameters()]
    batch = Batch(attention_mask=torch.ones(1, 4, dtype=torch.long), labels=torch.tensor([[-100, 5, 6, 7]]))
    batch.record_ids = ["record 3 (id 'bad')"]

    def micro_loss(batch):
        loss = module(torch.tensor([[1.0, float("nan"), 2.0]])).sum()
        return loss, loss.detach().reshape(1)

    run = SimpleNamespace(accelerator=accelerator, module=module, step=4)
    with pytest.raises(NonFiniteError, match=r"step 5: .*record 3 \(id 'bad'\)"):
        _window(run, [batch], micro_loss)
    for got, want in zip(module.parameters(), before, strict=True):
        assert torch.equal(got, want)  # the update never ran
