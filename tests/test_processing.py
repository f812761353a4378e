"""vlsi's processor against the stock transformers processors, family by family.

The stock processors need a video processor, and that needs torchvision, which this CPU setting lacks; each
is built here without it (its image rule, tokenizer handling and tensors untouched), from the files of the
tiny checkpoints. Where torchvision exists, ``AutoProcessor`` itself is compared.
"""

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    LlavaOnevisionProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)

from vlsi.data.processing import VLProcessor
from vlsi.data.records import Encoder, collate, to_messages
from vlsi.model.loading import check_pair

STOCK = {
    "qwen2_vl": Qwen2VLProcessor,
    "qwen2_5_vl": Qwen2_5_VLProcessor,
    "qwen3_vl": Qwen3VLProcessor,
    "llava_onevision": LlavaOnevisionProcessor,
}
FAMILIES = list(STOCK)

# (width, height): the 48 px board (one anyres tile), wide and tall images that take several tiles, and
# one large enough that LLaVA-OneVision shrinks its grid to anyres_max_9.
SIZES = [(48, 48), (100, 40), (30, 70), (250, 260)]


def image_only(cls):
    """The stock processor class without its video processor."""

    class ImageOnly(cls):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnly


def stock_processor(family: str, path):
    extra = json.loads((path / "processor_config.json").read_text()) if family == "llava_onevision" else {}
    extra.pop("processor_class", None)
    return image_only(STOCK[family])(
        image_processor=AutoImageProcessor.from_pretrained(path, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(path),
        **extra,
    )


def record(tmp_path, sizes: list[tuple[int, int]], name: str = "r") -> dict:
    paths = []
    for i, size in enumerate(sizes):
        image = Image.new("RGB", size)
        # A gradient, so resizing and tiling errors change the pixels.
        image.putdata([(x % 256, y % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])])
        image.save(tmp_path / f"{name}{i}.png")
        paths.append(f"{name}{i}.png")
    question = "".join("<image>" for _ in paths) + "\nWhat is at the top left?"
    return {
        "id": name,
        "image": paths,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}],
    }


def stock_inputs(processor: VLProcessor, stock, rec: dict, base) -> dict:
    messages = to_messages(rec, len(rec["image"]))[:-1]
    text = processor.render(messages, add_generation_prompt=True)
    images = [Image.open(base / p).convert("RGB") for p in rec["image"]]
    return stock(text=[text], images=[images], return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sizes", [[s] for s in SIZES] + [[(100, 40), (30, 70)]], ids=str)
def test_inputs_match_the_stock_processor(family, sizes, family_models, tmp_path):
    path = family_models(family)["student"]
    processor = VLProcessor.from_pretrained(path)
    rec = record(tmp_path, sizes)
    ours, _ = Encoder(processor).encode_prompt(rec, tmp_path)
    stock = stock_inputs(processor, stock_processor(family, path), rec, tmp_path)
    assert ours["input_ids"].tolist() == stock["input_ids"][0].tolist()
    pixel_keys = {"pixel_values", "image_grid_thw", "image_sizes", "batch_num_images"}
    assert pixel_keys & set(ours) == pixel_keys & set(stock)
    for key in pixel_keys & set(ours):
        assert torch.equal(ours[key], stock[key]), key
    if processor.token_types:
        assert ours["mm_token_type_ids"].tolist() == stock["mm_token_type_ids"][0].tolist()
    else:
        assert "mm_token_type_ids" not in ours


def test_llava_onevision_tiling_is_what_the_stock_processor_makes(family_models, tmp_path):
    """The acceptance case spelled out: several tiles, newline tokens and the anyres_max_9 shrinking."""
    processor = VLProcessor.from_pretrained(family_models("llava_onevision")["student"])
    counts = {}
    for size in SIZES:
        inputs = processor.process_images([Image.new("RGB", size)])
        tiles = inputs["pixel_values"].shape[1]
        counts[size] = (tiles, processor.image_token_counts(inputs)[0])
    # 3 x 3 features per 48 px tile: the base tile's 9, then the grid's rows, each with a newline.
    assert counts[(48, 48)] == (2, 9 + 3 * (3 + 1))
    assert counts[(100, 40)][0] == 1 + 3  # the 48 x 144 pinpoint: a row of three tiles
    assert counts[(30, 70)][0] == 1 + 2  # 96 x 48: two tiles, one above the other
    big_tiles, big_tokens = counts[(250, 260)]
    assert big_tiles == 1 + 36 and big_tokens < 9 + 36 * 9  # 6 x 6 tiles, shrunk to about 9 tiles


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_reads_as_many_features_as_placeholders(family, family_models, tmp_path):
    """Extreme and mixed shapes in one batch: the model refuses placeholders that its features do not fill."""
    path = family_models(family)["student"]
    processor = VLProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    encoder = Encoder(processor)
    shapes = [[(48, 48)], [(250, 260)], [(3, 500)], [(600, 20), (8, 8)], []]
    items = []
    for i, sizes in enumerate(shapes):
        rec = record(tmp_path, sizes, f"r{i}-")
        if not sizes:
            del rec["image"]
            rec["conversations"][0]["value"] = "No image here?"
        items.append(encoder.encode(rec, tmp_path))
    batch = collate(items, processor.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_the_processor_refuses_is_a_skipped_counted_record(family, family_models, tmp_path):
    from vlsi.data.records import ChatDataset

    processor = VLProcessor.from_pretrained(family_models(family)["student"])
    good, thin = record(tmp_path, [(48, 48)], "good"), record(tmp_path, [(300, 1)], "thin")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([good, thin]))
    dataset = ChatDataset(data, Encoder(processor))
    items = [dataset[0], dataset[1]]
    assert items[0] is not None
    if family == "llava_onevision":
        # Its resize rule takes any shape (the batch test above feeds it 3 x 500 and 600 x 20).
        assert items[1] is not None and dataset.skips.total == 0
    else:
        # Qwen's resize refuses an aspect ratio beyond 200.
        assert items[1] is None
        assert dataset.skips.summary() == {
            "skipped": 1,
            "skipped_by_reason": {"image rejected by the processor": 1},
        }


def test_two_families_pair_on_their_regular_vocabulary_and_two_tokenizers_are_refused(
    family_models, tmp_path
):
    qwen, llava = family_models("qwen2_5_vl"), family_models("llava_onevision")
    assert not check_pair(qwen["teacher"], qwen["student"]).cross_family
    # LLaVA-OneVision's <image> and <video> are added on top of the shared BPE: left out of the divergences.
    pair = check_pair(qwen["teacher"], llava["student"])
    assert pair.cross_family and (pair.teacher_family, pair.student_family) == (
        "qwen2_5_vl",
        "llava_onevision",
    )
    qwen_tok = VLProcessor.from_pretrained(qwen["teacher"]).tokenizer
    assert pair.vocab.keep.tolist() == list(range(len(qwen_tok)))
    # Same family, another tokenizer: two token ids swapped (the merges still load).
    other = tmp_path / "other"
    shutil.copytree(qwen["teacher"], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="do not share a tokenizer") as err:
        check_pair(other, qwen["student"])
    assert str(other) in str(err.value) and str(qwen["student"]) in str(err.value)
    # Two families whose regular vocabularies differ: refused from the files alone, before any weight is
    # read (this teacher has none left), naming the tokens that differ.
    (other / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="2 with other ids: ") as err:
        check_pair(other, llava["student"])
    assert repr(a) in str(err.value) and repr(b) in str(err.value)
    assert "(qwen2_5_vl) and student" in str(err.value) and "cannot be paired" in str(err.value)


def test_a_checkpoint_whose_tokenizer_lacks_the_image_token_is_refused(family_models, tmp_path):
    path = tmp_path / "broken"
    shutil.copytree(family_models("llava_onevision")["student"], path)
    config = json.loads((path / "config.json").read_text())
    config["image_token_index"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"broken: the tokenizer spells '<image>' as id \d+, but the model's"
    ):
        VLProcessor.from_pretrained(path)


def test_a_chat_template_in_the_older_processor_file_is_read(family_models, tmp_path):
    source = family_models("llava_onevision")["student"]
    path = tmp_path / "legacy"
    shutil.copytree(source, path)
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert VLProcessor.from_pretrained(path).tokenizer.chat_template == template
    (path / "chat_template.json").write_text(json.dumps({"template": template}))
    with pytest.raises(ValueError, match="chat_template.json: no 'chat_template' string"):
        VLProcessor.from_pretrained(path)
    (path / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="legacy: no chat template"):
        VLProcessor.from_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_processor_gives_the_same_inputs_where_torchvision_exists(family, family_models, tmp_path):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    path = family_models(family)["student"]
    processor = VLProcessor.from_pretrained(path)
    rec = record(tmp_path, [(100, 40)])
    ours, _ = Encoder(processor).encode_prompt(rec, tmp_path)
    stock = stock_inputs(processor, AutoProcessor.from_pretrained(path), rec, tmp_path)
    assert ours["input_ids"].tolist() == stock["input_ids"][0].tolist()
    assert torch.allclose(ours["pixel_values"], stock["pixel_values"], atol=1e-5)


def test_every_family_has_its_placeholder_rule():
    from vlsi.data.processing import PLACEHOLDERS
    from vlsi.model.backbone import FAMILIES

    assert set(PLACEHOLDERS) == {mt for family in FAMILIES.values() for mt in family.model_types}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_pixel_bounds_resize_as_named_and_are_saved(family, family_models, tmp_path):
    path = family_models(family)["student"]
    big, small = record(tmp_path, [(400, 300)], "big"), record(tmp_path, [(20, 20)], "small")

    def tokens(processor, rec):
        return Encoder(processor).encode_prompt(rec, tmp_path)[0]["image_grid_thw"].prod().item()

    plain = VLProcessor.from_pretrained(path)
    token_px = (plain.image_processor.patch_size * plain.image_processor.merge_size) ** 2
    low, high = 3 * token_px, 4 * token_px  # between the tiny checkpoints' own bounds
    bounded = VLProcessor.from_pretrained(path, min_pixels=low, max_pixels=high)
    merge = plain.image_processor.merge_size**2
    assert tokens(bounded, big) // merge <= 4 < tokens(plain, big) // merge
    assert tokens(plain, small) // merge < 3 <= tokens(bounded, small) // merge
    # The stock processor given the same keywords makes the same inputs.
    stock = image_only(STOCK[family])(
        image_processor=AutoImageProcessor.from_pretrained(
            path, backend="pil", min_pixels=low, max_pixels=high
        ),
        tokenizer=AutoTokenizer.from_pretrained(path),
    )
    ours = Encoder(bounded).encode_prompt(big, tmp_path)[0]
    assert torch.equal(ours["pixel_values"], stock_inputs(bounded, stock, big, tmp_path)["pixel_values"])
    # Saved with the processor, as an export saves it: a reload needs no options to read images alike.
    out = tmp_path / "saved"
    bounded.save_pretrained(out)
    shutil.copy(path / "config.json", out / "config.json")
    reloaded = VLProcessor.from_pretrained(out)
    assert tokens(reloaded, big) == tokens(bounded, big) and tokens(reloaded, small) == tokens(bounded, small)

    with pytest.raises(ValueError, match="min_pixels"):
        VLProcessor.from_pretrained(path, min_pixels=high + 1, max_pixels=high)


def test_pixel_bounds_are_refused_for_llava_onevision(family_models):
    with pytest.raises(ValueError, match="llava_onevision image processor has no min_pixels / max_pixels"):
        VLProcessor.from_pretrained(family_models("llava_onevision")["student"], max_pixels=100_000)
