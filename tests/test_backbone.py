from types import SimpleNamespace

import pytest
import torch
from tiny_families import IMAGE_TOKEN_ID, MAX_PARAMS, TINY, build

from vlsi.model.backbone import FAMILIES, Backbone, family_for, get_module, parse_layers, target_layers

ALL = sorted(TINY)
# Families whose layer outputs are the residual stream itself, so HF's `output_hidden_states` must agree.
NO_INJECTION = [name for name in ALL if not FAMILIES[name].injects_between_layers]


@pytest.fixture(scope="module", params=ALL)
def tiny(request):
    model, inputs = build(request.param)
    return request.param, model, inputs


def _hook_counts(module: torch.nn.Module) -> tuple[int, int]:
    return len(module._forward_hooks), len(module._forward_pre_hooks)


def _all_hook_counts(bb: Backbone) -> list[tuple[int, int]]:
    return [_hook_counts(m) for m in (*bb.layers, bb.final_norm)]


def _capture_layer_inputs(bb: Backbone, inputs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The inputs of every decoder layer and of the final norm, independently of `Backbone.hidden_states`."""
    seen = []

    def grab(_module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in (*bb.layers, bb.final_norm)]
    try:
        with torch.no_grad():
            bb.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen[:-1], seen[-1]


def test_tiny_models_are_tiny(tiny):
    _, model, _ = tiny
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMS


def test_family_for_picks_family(tiny):
    name, model, _ = tiny
    assert family_for(model) is FAMILIES[name]
    assert family_for(model.config) is FAMILIES[name]
    assert Backbone(model).family.name == name


def test_family_for_unknown_model_type_names_supported():
    with pytest.raises(ValueError) as err:
        family_for(SimpleNamespace(model_type="llama"))
    message = str(err.value)
    assert "llama" in message
    for family in FAMILIES.values():
        for model_type in family.model_types:
            assert model_type in message


def test_get_module_reports_bad_path(tiny):
    _, model, _ = tiny
    assert get_module(model, "lm_head") is model.lm_head
    with pytest.raises(AttributeError, match="no_such_part"):
        get_module(model, "model.no_such_part")


def test_sizes_match_config(tiny):
    _, model, _ = tiny
    bb = Backbone(model)
    text = model.config.text_config
    assert bb.text_config is text
    assert bb.num_layers == text.num_hidden_layers
    assert bb.hidden_size == text.hidden_size
    assert bb.vocab_size == text.vocab_size == model.lm_head.out_features
    assert isinstance(bb.layers, torch.nn.ModuleList)
    assert bb.embed_tokens is model.get_input_embeddings()
    assert bb.vision_tower is get_module(model, bb.family.vision_tower)


def test_last_layer_through_norm_and_head_gives_logits(tiny):
    _, model, inputs = tiny
    bb = Backbone(model)
    last = bb.num_layers - 1
    with torch.no_grad():
        states, output = bb.hidden_states([0, last], **inputs)
    batch, seq = inputs["input_ids"].shape
    assert sorted(states) == [0, last]
    for state in states.values():
        assert state.shape == (batch, seq, bb.hidden_size)
    with torch.no_grad():
        logits = bb.lm_head(bb.final_norm(states[last]))
    assert logits.shape[-1] == bb.vocab_size
    torch.testing.assert_close(logits, output.logits, atol=1e-5, rtol=0)


def test_state_is_what_the_next_module_reads(tiny):
    _, model, inputs = tiny
    bb = Backbone(model)
    layer_inputs, norm_input = _capture_layer_inputs(bb, inputs)
    with torch.no_grad():
        states, _ = bb.hidden_states(range(bb.num_layers), **inputs)
    for i in range(bb.num_layers - 1):
        torch.testing.assert_close(states[i], layer_inputs[i + 1], atol=0, rtol=0)
    torch.testing.assert_close(states[bb.num_layers - 1], norm_input, atol=0, rtol=0)


def test_image_reaches_the_decoder(tiny):
    # Guards the fixtures: with a wrongly built image input the checks above could pass on text alone.
    _, model, inputs = tiny
    bb = Backbone(model)
    other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    with torch.no_grad():
        a, _ = bb.hidden_states([0], **inputs)
        b, _ = bb.hidden_states([0], **other)
    image = inputs["input_ids"] == IMAGE_TOKEN_ID
    first_image_pos = int(image[0].nonzero()[0])
    # Causal attention: text before the first image token cannot see the image.
    torch.testing.assert_close(a[0][:, :first_image_pos], b[0][:, :first_image_pos])
    assert not torch.allclose(a[0][image], b[0][image])


@pytest.mark.parametrize("name", NO_INJECTION)
def test_matches_output_hidden_states(name):
    model, inputs = build(name)
    bb = Backbone(model)
    mid = 1
    with torch.no_grad():
        states, _ = bb.hidden_states([mid], **inputs)
        reference = model(**inputs, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output; [-1] is tied to the final *normed* state, so only
    # intermediate entries are comparable.
    assert len(reference) == bb.num_layers + 1
    torch.testing.assert_close(states[mid], reference[mid + 1], atol=0, rtol=0)


def test_qwen3_vl_deepstack_is_included():
    """HF's `output_hidden_states` records Qwen3-VL layer outputs *before* the deepstack visual features are
    added; `Backbone` reports the stream after them, which differs only at image positions."""
    model, inputs = build("qwen3_vl")
    bb = Backbone(model)
    deepstack = len(model.config.vision_config.deepstack_visual_indexes)
    assert 0 < deepstack < bb.num_layers
    with torch.no_grad():
        states, _ = bb.hidden_states(range(bb.num_layers), **inputs)
        reference = model(**inputs, output_hidden_states=True).hidden_states
    image = inputs["input_ids"] == IMAGE_TOKEN_ID
    for i in range(deepstack):
        torch.testing.assert_close(states[i][~image], reference[i + 1][~image], atol=0, rtol=0)
        assert not torch.allclose(states[i][image], reference[i + 1][image])
    for i in range(deepstack, bb.num_layers - 1):
        torch.testing.assert_close(states[i], reference[i + 1], atol=0, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_hooks_removed(name):
    model, inputs = build(name)
    bb = Backbone(model)
    assert all(counts == (0, 0) for counts in _all_hook_counts(bb))
    with torch.no_grad():
        bb.hidden_states([0, bb.num_layers - 1], **inputs)
    assert all(len(layer._forward_hooks) == 0 for layer in bb.layers)
    assert all(counts == (0, 0) for counts in _all_hook_counts(bb))


@pytest.mark.parametrize("name", ALL)
def test_hooks_removed_after_exception_in_forward(name, monkeypatch):
    model, inputs = build(name)
    bb = Backbone(model)
    # HF installs its own permanent capture hooks the first time hidden states are requested; ours must come
    # off on top of those too.
    with torch.no_grad():
        model(**inputs, output_hidden_states=True)
    baseline = _all_hook_counts(bb)

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    # Fails inside the last decoder layer, after the hooks on earlier layers have already fired.
    monkeypatch.setattr(bb.layers[-1].mlp, "forward", explode)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        bb.hidden_states(range(bb.num_layers), **inputs)
    assert _all_hook_counts(bb) == baseline
    monkeypatch.undo()
    with torch.no_grad():
        bb.hidden_states([0], **inputs)
    assert _all_hook_counts(bb) == baseline


def test_invalid_layer_indices_raise(tiny):
    _, model, inputs = tiny
    bb = Backbone(model)
    n = bb.num_layers
    baseline = _all_hook_counts(bb)
    for bad in ([n], [-1], [0, n + 5], [True], [1.0], "0"):
        with pytest.raises(ValueError, match=rf"0\.\.{n - 1}|sequence of ints"):
            bb.hidden_states(bad, **inputs)
    # Validation happens before any hook is attached.
    assert _all_hook_counts(bb) == baseline


def test_graph_is_kept_under_gradient_checkpointing():
    model, inputs = build("qwen2_vl")
    model.gradient_checkpointing_enable()
    model.train()
    bb = Backbone(model)
    states, _ = bb.hidden_states([0], **inputs)
    assert states[0].requires_grad
    states[0].float().pow(2).mean().backward()
    grad = bb.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # Layers after the requested one do not feed it.
    assert bb.layers[-1].mlp.down_proj.weight.grad is None


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model, inputs = build("qwen2_vl")
    family = family_for(model)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=list(family.lora_target_modules), lora_dropout=0.0)
    )
    bb = Backbone(wrapped)
    assert bb.family is family
    assert bb.num_layers == model.config.text_config.num_hidden_layers
    with torch.no_grad():
        states, output = bb.hidden_states([bb.num_layers - 1], **inputs)
        logits = bb.lm_head(bb.final_norm(states[bb.num_layers - 1]))
    torch.testing.assert_close(logits, output.logits, atol=1e-5, rtol=0)


def test_target_layers():
    assert target_layers(28) == [2, 6, 10, 14, 18, 22, 26]
    assert target_layers(80) == list(range(2, 80, 4))
    assert len(target_layers(80)) == 20
    assert target_layers(3) == [2]
    assert target_layers(10, start=0, every=5) == [0, 5]
    for bad in [(0,), (28, -1), (28, 2, 0)]:
        with pytest.raises(ValueError):
            target_layers(*bad)


def test_parse_layers():
    assert parse_layers("2, 6,10") == [2, 6, 10]
    assert parse_layers(" 3 ") == [3]
    for bad in ["", " ", "2,,6", "2,6,", "a", "-1", "2;6", "1.5", "2,2"]:
        with pytest.raises(ValueError):
            parse_layers(bad)
