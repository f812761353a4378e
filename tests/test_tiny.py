import json

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

from vlsi.model.tiny import TinyConfig, build_config, build_tokenizer, count_parameters


def test_tiny_models_are_tiny_and_shaped_like_the_family(tiny_models):
    teacher = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["teacher"])
    student = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["student"])
    # Keep fixtures honest: a "tiny" model that silently grew would slow every test and the CI.
    assert count_parameters(teacher) < 3_000_000
    assert count_parameters(student) < 1_000_000
    t, s = teacher.config.text_config, student.config.text_config
    assert t.num_hidden_layers > s.num_hidden_layers and t.hidden_size > s.hidden_size
    # One vision encoder architecture for the family; only the merger's output width follows the LM.
    tv, sv = teacher.config.vision_config.to_dict(), student.config.vision_config.to_dict()
    for key in ("depth", "embed_dim", "num_heads", "patch_size", "spatial_merge_size"):
        assert tv[key] == sv[key]
    assert t.vocab_size == s.vocab_size


def test_tokenizer_is_byte_level_bpe_with_qwen_specials(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"):
        assert len(tok.tokenize(special)) == 1
    assert len(tok.tokenize("yellow triangle")) >= 2
    # Byte-level: any text round-trips, even outside the training corpus.
    text = "Ünïcode ✓ 42"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.chat_template is not None


def test_checkpoint_files_are_the_ordinary_ones(tiny_models):
    path = tiny_models["teacher"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (path / name).exists()
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2_vl"
    image_processor = AutoImageProcessor.from_pretrained(path)
    from PIL import Image

    out = image_processor(images=[Image.new("RGB", (48, 48))], return_tensors="pt")
    # 48 px, 8 px patches merged 2x2: one visual token per 16 px board cell.
    assert out["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert torch.isfinite(out["pixel_values"]).all()


def test_layer_states_through_the_output_head_give_the_models_logits(tiny_models, processor, synth_data):
    from vlsi.data.records import Encoder, collate, load_records
    from vlsi.model.backbone import Backbone

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["teacher"]).eval()
    records = load_records(synth_data / "test.json")[:2]
    batch = collate([Encoder(processor).encode(r, synth_data) for r in records], processor.pad_token_id)
    backbone = Backbone(model)
    last = backbone.num_layers - 1
    with torch.no_grad():
        states = backbone.layer_states([last], batch)
        expected = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(backbone.output_logits(states[last]), expected, atol=1e-5)


def test_mrope_section_is_checked_and_lands_in_the_config():
    tokenizer = build_tokenizer(512)
    cfg = TinyConfig(out="unused", mrope_section="1,3,12")
    config = build_config(cfg, cfg.teacher, tokenizer)  # head_dim 32: 16 frequencies
    assert config.text_config.rope_parameters["mrope_section"] == [1, 3, 12]
    for bad in ("1,3,11", "0,4,12", "4,12", "a,b,c"):
        with pytest.raises(ValueError, match="head_dim / 2 = 16"):
            build_config(TinyConfig(out="unused", mrope_section=bad), cfg.teacher, tokenizer)
