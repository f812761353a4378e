"""Verbalizers and step 1 on the tiny random-weight models: the logit-lens start, frozen backbone,
per-layer gradient isolation, a falling loss, the files written, and the inspection command."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlsi.data.records import ChatDataset, Encoder, collate
from vlsi.losses.tokens import response_cross_entropy
from vlsi.model.backbone import Backbone
from vlsi.model.loading import load_model
from vlsi.model.verbalizer import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    VerbalizerConfig,
    Verbalizers,
    base_model_info,
    build_verbalizers,
    verbalized_ce,
)
from vlsi.run.cli import main
from vlsi.train.sft import model_inputs
from vlsi.train.verbalize import (
    VerbalizeConfig,
    _splits,
    default_layers,
    freeze,
    measure_depth,
    resolve_layers,
    train_verbalizers,
)


def _frozen(path) -> Backbone:
    return Backbone(freeze(load_model(path, dtype=torch.float32)))


def _batch(processor, synth_data, n: int = 4) -> dict:
    dataset = ChatDataset(synth_data / "train.json", Encoder(processor))
    return collate([dataset[i] for i in range(n)], processor.pad_token_id)


@pytest.fixture(scope="module")
def teacher(tiny_models) -> Backbone:
    return _frozen(tiny_models["teacher"])


@pytest.fixture(scope="module")
def teacher_states(teacher, processor, synth_data):
    batch = _batch(processor, synth_data)
    layers = list(range(teacher.num_layers))
    with torch.no_grad():
        hidden, output = teacher.hidden_states(layers, **model_inputs(batch))
    return hidden, output, batch["labels"]


def test_default_layers():
    assert default_layers(28) == [2, 6, 10, 14, 18, 22, 26]
    assert len(default_layers(80)) == 20 and default_layers(80)[-1] == 78
    # Shallow models: every layer but the last, so the tiny ones still show a depth trend.
    assert default_layers(8) == [0, 1, 2, 3, 4, 5, 6]
    assert default_layers(4) == [0, 1, 2]
    assert default_layers(8, start=1) == [1, 5]
    cfg = VerbalizeConfig(model="m", data="d", out="o", layers="1, 3")
    assert resolve_layers(cfg, 8) == [1, 3]


def test_untrained_verbalizer_is_the_logit_lens(teacher, teacher_states):
    hidden, output, _ = teacher_states
    layers = sorted(hidden)
    verbalizers = build_verbalizers(teacher, layers)
    by_layer = verbalizers(hidden)
    with torch.no_grad():
        for layer in layers:
            lens = teacher.lm_head(teacher.final_norm(hidden[layer]))  # [B, T, V]
            assert torch.equal(verbalizers.logits(layer, hidden[layer]), lens), layer
            assert torch.equal(by_layer[layer], lens), layer
        # The lens on the last layer is the model's own output (what metrics.json calls final_layer).
        last = teacher.lm_head(teacher.final_norm(hidden[layers[-1]]))
        torch.testing.assert_close(last, output.logits)
        # Without the zero-initialised down projection the verbalizer is not the lens: the check can fail.
        other = build_verbalizers(teacher, layers, VerbalizerConfig(zero_init=False))
        assert not torch.allclose(other.logits(0, hidden[0]), teacher.lm_head(teacher.final_norm(hidden[0])))
    assert not any(p is teacher.lm_head.weight for p in verbalizers.parameters())
    assert not any("lm_head" in k for k in verbalizers.state_dict())


def test_verbalized_ce_equals_ce_of_full_logits(teacher, teacher_states):
    hidden, _, labels = teacher_states
    verbalizers = build_verbalizers(teacher, [1, 5])
    with torch.no_grad():
        for p in verbalizers.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for layer in (1, 5):
            full = response_cross_entropy(verbalizers.logits(layer, hidden[layer]), labels)
            torch.testing.assert_close(verbalized_ce(verbalizers, layer, hidden[layer], labels), full)


def test_gradient_reaches_only_its_own_verbalizer(teacher, teacher_states):
    hidden, _, labels = teacher_states
    layers = [0, 3, 6]
    verbalizers = build_verbalizers(teacher, layers)
    with torch.no_grad():
        # As after some training: with down == 0 the gate and up projections get no gradient at all.
        for layer in layers:
            verbalizers.per_layer[str(layer)].ffn.down.weight.normal_(std=0.05)
    verbalized_ce(verbalizers, 3, hidden[3], labels).backward()
    for name, p in verbalizers.named_parameters():
        if name.startswith("per_layer.3."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in teacher.model.parameters())


@pytest.fixture(scope="module")
def trained(tiny_models, synth_data, tmp_path_factory):
    """15 steps of step 1 on the tiny student, with the backbone's weights saved beforehand."""
    model = load_model(tiny_models["student"], dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = VerbalizeConfig(
        model=str(tiny_models["student"]),
        data=str(synth_data / "train.json"),
        out=str(tmp_path_factory.mktemp("verbalizers")),
        max_steps=15,
        batch_size=4,
        lr=1e-2,
        min_lr=1e-2,
    )
    summary = train_verbalizers(cfg, model=model)
    return cfg, model, before, summary


def test_step1_leaves_the_backbone_bit_for_bit_unchanged(trained):
    _, model, before, summary = trained
    assert summary["steps"] == 15
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_verbalized_loss_falls_at_every_layer(trained, processor):
    cfg, model, _, summary = trained
    backbone = Backbone(model)
    _, _, held, held_idx = _splits(cfg, Encoder(processor, cfg.max_length))
    untrained = measure_depth(
        backbone,
        build_verbalizers(backbone, summary["target_layers"]),
        held,
        held_idx,
        4,
        processor.pad_token_id,
    )
    after = summary["held_out"]
    assert after["layers"] == untrained["layers"] == [0, 1, 2]
    for layer, lens, trained_loss in zip(after["layers"], untrained["loss"], after["loss"], strict=True):
        assert trained_loss < lens - 0.05, (layer, lens, trained_loss)
    assert after["final_layer"] == untrained["final_layer"]


def test_written_files(trained):
    cfg, _, _, _ = trained
    out = json.loads((Path(cfg.out) / CONFIG_FILE).read_text())
    assert set(out) == {"target_layers", "hidden_size", "verb_ffn_shape", "options", "base_model"}
    assert out["target_layers"] == [0, 1, 2] and out["hidden_size"] == 64
    assert out["verb_ffn_shape"] == {"gate": [64, 64], "up": [64, 64], "down": [64, 64]}
    assert out["options"] == {"residual": True, "zero_init": True, "use_norm": True}
    assert set(out["base_model"]) == {"name_or_path", "model_type", "num_layers", "hidden_size", "vocab_size"}
    assert out["base_model"]["num_layers"] == 4 and out["base_model"]["name_or_path"] == cfg.model

    metrics = json.loads((Path(cfg.out) / "metrics.json").read_text())
    assert {"layers", "loss", "accuracy", "final_layer"} <= set(metrics)
    assert len(metrics["loss"]) == len(metrics["accuracy"]) == len(metrics["layers"]) == 3
    assert set(metrics["final_layer"]) >= {"loss", "accuracy"}
    assert all(0.0 <= a <= 1.0 for a in metrics["accuracy"])
    assert (Path(cfg.out) / "verbalized_depth.png").stat().st_size > 1000
    with safe_open(str(Path(cfg.out) / WEIGHTS_FILE), "pt") as f:
        keys = list(f.keys())
    # Each layer: gate, up, down and the norm's weight; the shared head is not saved.
    assert len(keys) == 3 * 4 and all(k.startswith("per_layer.") for k in keys)


def test_save_load_round_trip(teacher, teacher_states, tmp_path):
    hidden, _, _ = teacher_states
    verbalizers = build_verbalizers(teacher, [2, 6])
    with torch.no_grad():
        for p in verbalizers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    verbalizers.save(tmp_path, base_model_info(teacher))
    loaded = Verbalizers.load(tmp_path, teacher)
    assert loaded.layers == [2, 6]
    with torch.no_grad():
        for layer in (2, 6):
            assert torch.equal(loaded.logits(layer, hidden[layer]), verbalizers.logits(layer, hidden[layer]))


def test_load_refuses_another_model(teacher, tiny_models, tmp_path):
    build_verbalizers(teacher, [2, 6]).save(tmp_path, base_model_info(teacher))
    with pytest.raises(ValueError) as err:
        Verbalizers.load(tmp_path, _frozen(tiny_models["student"]))
    message = str(err.value)
    assert str(tiny_models["teacher"]) in message and str(tiny_models["student"]) in message
    assert "hidden_size 128" in message and "hidden_size 64" in message


def test_cli_verbalize(trained, synth_data, capsys):
    cfg, _, _, _ = trained
    record = json.loads((synth_data / "test.json").read_text())[0]
    args = [
        "verbalize",
        "--model",
        cfg.model,
        "--verbalizers",
        cfg.out,
        "--image",
        str(synth_data / record["image"]),
        "--question",
        "How many shapes are there?",
        "--max-new-tokens",
        "4",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["layer 0", "layer 1", "layer 2", "final"]
    assert main([*args, "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [row["label"] for row in parsed] == ["layer 0", "layer 1", "layer 2", "final"]
    assert all(isinstance(row["text"], str) for row in parsed)


def test_cli_verbalize_wrong_model_is_a_clear_error(trained, tiny_models, capsys):
    cfg, _, _, _ = trained
    args = [
        "verbalize",
        "--model",
        str(tiny_models["teacher"]),
        "--verbalizers",
        cfg.out,
        "--question",
        "Hi?",
    ]
    assert main(args) == 2
    assert "only load onto a model of the same shape" in capsys.readouterr().err
