"""Sequence-level KD data: every assistant turn replaced by the model's own greedy answer."""

import json

from vlsi.data.digits import DigitsConfig, generate
from vlsi.run.evaluate import EvalConfig, evaluate
from vlsi.run.relabel import relabel


def test_a_model_scores_perfectly_on_its_own_answers(tmp_path, tiny_models):
    generate(DigitsConfig(out=str(tmp_path / "d"), train=5, test=3, seed=4))
    model = str(tiny_models["student"])
    summary = relabel(model, tmp_path / "d" / "train.json", tmp_path / "out" / "mine.json", max_new_tokens=4)
    original = json.loads((tmp_path / "d" / "train.json").read_text())
    mine = json.loads((tmp_path / "out" / "mine.json").read_text())
    assert summary["records"] == len(mine) == 5 and summary["skipped"] == 0
    for before, after in zip(original, mine, strict=True):
        # Same questions and turn structure; the answers are the model's (untrained: not the data's).
        assert [t["from"] for t in before["conversations"]] == [t["from"] for t in after["conversations"]]
        assert [t["value"] for t in before["conversations"] if t["from"] == "human"] == [
            t["value"] for t in after["conversations"] if t["from"] == "human"
        ]
    assert any(
        a["value"] != b["value"]
        for r0, r1 in zip(original, mine, strict=True)
        for a, b in zip(r0["conversations"], r1["conversations"], strict=True)
    )
    # Scored against its own answers (each last turn conditioned on its own earlier ones) it is always right.
    metrics = evaluate(EvalConfig(model=model, data=str(tmp_path / "out" / "mine.json"), max_new_tokens=4))
    assert metrics["n"] == 5 and metrics["accuracy"] == 1.0
