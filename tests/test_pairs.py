"""Cross-family pairs on hand-made tokenizers: the regular-vocabulary check, the per-record response check
and the vocabulary mask of the divergences."""

from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlsi.data.pairs import RESPONSE_MISMATCH, TEACHER_INPUTS, PairEncoder, collate_pairs
from vlsi.data.processing import GridRule, VLProcessor
from vlsi.data.records import ChatDataset, Encoder
from vlsi.losses.chunked import LABELS, Term, head_losses
from vlsi.losses.divergences import divergence
from vlsi.losses.tokens import IGNORE_INDEX
from vlsi.losses.vocab import SharedVocab, check_regular_vocab, compared_ids, regular_vocab

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]
WORDS = ["user", "assistant", "What", "is", "it", "red", "green", "blue", "circle", "square"]
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tokenizer(words=WORDS, specials=(), added=()):
    """A word-level tokenizer: ``SPECIAL`` then ``words`` as its own vocabulary, then ``specials`` (special)
    and ``added`` (plain added tokens) on top, with one chat template."""
    vocab = {w: i for i, w in enumerate([*SPECIAL, *words])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [*SPECIAL, *specials]})
    if added:
        tok.add_tokens(list(added))
    tok.chat_template = TEMPLATE
    return tok


def text_processor(tokenizer) -> VLProcessor:
    # Text-only records never reach the image processor; the rule only says the model reads token types.
    rule = GridRule(SimpleNamespace(merge_size=2), None)
    return VLProcessor(tokenizer, None, "qwen2_vl", "<|image_pad|>", rule)


def record(answer: str, i: int = 0) -> dict:
    return {
        "id": i,
        "conversations": [{"from": "human", "value": "What is it"}, {"from": "gpt", "value": answer}],
    }


# --- the pair check ---------------------------------------------------------------------------------------


def test_specials_of_one_side_are_allowed_and_left_out_of_the_compared_ids():
    teacher = make_tokenizer(specials=["<think>", "</think>"])
    student = make_tokenizer(specials=["<image>"])
    assert regular_vocab(teacher) == regular_vocab(student)
    assert check_regular_vocab(teacher, student) == len(WORDS)  # the specials are not regular
    keep = compared_ids(teacher, student)
    # The student's <image> and the teacher's <think> share an id and spell different tokens: dropped, as
    # is the teacher's </think>, which the student lacks.
    image = student.convert_tokens_to_ids("<image>")
    assert teacher.convert_tokens_to_ids("<think>") == image
    assert keep.tolist() == list(range(len(SPECIAL) + len(WORDS)))
    assert image not in keep.tolist() and teacher.convert_tokens_to_ids("</think>") not in keep.tolist()
    # One tokenizer: nothing to drop.
    assert compared_ids(teacher, make_tokenizer(specials=["<think>", "</think>"])) is None


def test_regular_vocabularies_that_differ_are_refused_naming_what_differs():
    with pytest.raises(ValueError, match=r"1 only in the teacher's: 'square'") as err:
        check_regular_vocab(make_tokenizer(), make_tokenizer(WORDS[:-1]))
    assert "the regular vocabularies differ (10 vs 9 tokens)" in str(err.value)
    swapped = [*WORDS[:5], "green", "red", *WORDS[7:]]
    with pytest.raises(ValueError, match=r"2 with other ids: 'red' is 9 vs 10, 'green' is 10 vs 9"):
        check_regular_vocab(make_tokenizer(), make_tokenizer(swapped))
    with pytest.raises(ValueError, match=r"1 only in the student's: 'triangle'"):
        check_regular_vocab(make_tokenizer(), make_tokenizer([*WORDS, "triangle"]))


# --- the response check -----------------------------------------------------------------------------------


def test_a_record_whose_response_tokenizes_differently_is_skipped_and_counted(tmp_path):
    teacher = make_tokenizer(specials=["<think>"])
    # The student's tokenizer writes "red green" as one added token: same regular vocabulary, so the pair
    # passes its check, but a response holding those words is not one id sequence for both.
    student = make_tokenizer(specials=["<image>"], added=["red green"])
    check_regular_vocab(teacher, student)
    encoder = PairEncoder(Encoder(text_processor(student)), Encoder(text_processor(teacher)))
    data = tmp_path / "data.json"
    records = [record("red circle", 0), record("red green square", 1), record("blue", 2)]
    data.write_text(__import__("json").dumps(records))
    dataset = ChatDataset(data, encoder)
    items = [dataset[i] for i in range(3)]
    assert items[1] is None
    assert dataset.skips.summary() == {"skipped": 1, "skipped_by_reason": {RESPONSE_MISMATCH: 1}}
    item = items[0]
    assert [t for t in item["labels"].tolist() if t != IGNORE_INDEX] == [
        t for t in item[TEACHER_INPUTS]["labels"].tolist() if t != IGNORE_INDEX
    ]
    batch = collate_pairs(teacher.pad_token_id)([items[0], None, items[2]], student.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch[TEACHER_INPUTS]["input_ids"].shape[0] == 2
    assert TEACHER_INPUTS not in batch[TEACHER_INPUTS]


# --- the vocabulary mask ----------------------------------------------------------------------------------


def _hand_kl(t_logits, s_logits, keep):
    p = torch.softmax(t_logits[:, keep], -1)
    q = torch.softmax(s_logits[:, keep], -1)
    return (p * (p.log() - q.log())).sum()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_a_token_only_one_side_has_never_enters_a_divergence(name):
    teacher = make_tokenizer(specials=["<think>", "</think>"])
    student = make_tokenizer(specials=["<image>"])
    vocab = SharedVocab(compared_ids(teacher, student))
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(5, len(teacher), generator=g), torch.randn(5, len(student), generator=g)
    think, image = teacher.convert_tokens_to_ids("<think>"), student.convert_tokens_to_ids("<image>")
    fn = divergence(name)
    value = fn(*vocab.restrict(t_logits, s_logits))
    # Anything at the ids one side lacks changes nothing: they are masked out, the rest renormalised.
    t2, s2 = t_logits.clone(), s_logits.clone()
    t2[:, think], t2[:, teacher.convert_tokens_to_ids("</think>")], s2[:, image] = 30.0, 30.0, -30.0
    assert torch.equal(fn(*vocab.restrict(t2, s2)), value)
    if name == "forward_kl":
        assert torch.allclose(value, _hand_kl(t_logits, s_logits, vocab.keep), atol=1e-6)
    # Without the mask the teacher's <think> mass would be set against the student's <image>.
    assert not torch.equal(fn(*SharedVocab().restrict(t2, s2)), value)


def test_the_chunked_losses_read_the_same_mask_through_reordered_heads():
    teacher = make_tokenizer(specials=["<think>", "</think>"])
    student = make_tokenizer(specials=["<image>"])
    vocab = SharedVocab(compared_ids(teacher, student))
    g = torch.Generator().manual_seed(1)
    w_s = torch.randn(len(student), 8, generator=g, requires_grad=True)
    w_t = torch.randn(len(teacher), 12, generator=g)
    f_s = torch.randn(7, 8, generator=g, requires_grad=True)
    f_t = torch.randn(7, 12, generator=g)
    target = torch.randint(0, len(student), (7,), generator=g)
    # The reference: whole logits, masked; the cross-entropy over all of the student's rows.
    ref = divergence("forward_kl")(*vocab.restrict(f_t @ w_t.T, f_s @ w_s.T))
    ref = ref + torch.nn.functional.cross_entropy(f_s @ w_s.T, target, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (f_s, w_s))
    s_head, t_head, position = vocab.heads(w_s, w_t)
    terms = [Term(f_s, "forward_kl", 1.0, f_t), Term(f_s, LABELS, 1.0, target=position[target])]
    total, _ = head_losses(terms, s_head, t_head, tau=1.0, beta=0.5, chunk=3)
    grads = torch.autograd.grad(total, (f_s, w_s))
    assert torch.allclose(total, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # Nothing to drop: the heads as they are.
    assert SharedVocab().heads(w_s, w_t)[0] is w_s
