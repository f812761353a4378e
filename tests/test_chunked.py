"""The chunked verbalized losses equal the reference ones, values and gradients, in fp32 to 1e-5."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from written_out import divergence_by_hand

from vlsi.losses.chunked import LABELS, Term, head_losses, head_weight, score_matrix
from vlsi.losses.divergences import DIVERGENCES, divergence, log_prob_divergence, shared_vocab

N, D_S, D_T, V_S, V_T = 13, 8, 12, 37, 41  # the teacher head has 4 padding rows beyond the shared 37
# One chunk, uneven chunks, one token at a time, and a chunk larger than N.
CHUNKS = (N, 5, 1, 64)
TOL = dict(rtol=1e-5, atol=1e-5)


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(N, D_S, generator=g) for _ in range(3)]
    teacher = [torch.randn(N, D_T, generator=g) for _ in range(4)]
    w_s = torch.randn(V_S, D_S, generator=g) / 2
    w_t = torch.randn(V_T, D_T, generator=g) / 2
    target = torch.randint(0, V_S, (N,), generator=g)
    return student, teacher, w_s, w_t, target


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_log_prob_divergences_are_the_formulas_written_out(name, tau):
    # The log-prob form (what the chunked losses call) and the logits form (the reference losses) both
    # against the formula written out here: not against each other, which share one implementation.
    student, teacher, w_s, w_t, _ = _setup()
    t_logits, s_logits = shared_vocab(teacher[0] @ w_t.T, student[0] @ w_s.T)
    log_pt, log_ps = (F.log_softmax(x / tau, -1) for x in (t_logits, s_logits))
    expected = divergence_by_hand(name, log_pt, log_ps, 0.3)
    assert expected > 0
    got = log_prob_divergence(name, 0.3)(log_pt, log_ps)
    torch.testing.assert_close(got.double(), expected, **TOL)
    reference = divergence(name, 0.3)(t_logits, s_logits, tau)
    torch.testing.assert_close(reference.double(), expected * tau**2, **TOL)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_score_matrix_equals_every_reference_pair(name, chunk):
    student, teacher, w_s, w_t, _ = _setup()
    fn = divergence(name, 0.3)
    expected = torch.stack(
        [torch.stack([fn(*shared_vocab(t @ w_t.T, s @ w_s.T), 1.5) for t in teacher]) for s in student]
    )
    scores = score_matrix(student, w_s, teacher, w_t, name, beta=0.3, tau=1.5, chunk=chunk)
    assert scores.shape == (3, 4) and not scores.requires_grad
    assert torch.allclose(scores, expected, **TOL)


def _reference(terms, w_s, w_t, tau, beta):
    values = []
    for term in terms:
        s_logits = term.features @ w_s.T
        if term.op == LABELS:
            values.append(F.cross_entropy(s_logits, term.target, reduction="sum"))
        else:
            values.append(divergence(term.op, beta)(*shared_vocab(term.teacher @ w_t.T, s_logits), tau))
    return sum(t.weight * v for t, v in zip(terms, values, strict=True)), torch.stack(values)


def _grads(total, tensors):
    return torch.autograd.grad(total, [t for t in tensors if t.requires_grad])


@pytest.mark.parametrize("op", [*DIVERGENCES, LABELS])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("train_head", [True, False])
def test_head_losses_equal_the_reference_values_and_gradients(op, chunk, train_head):
    student, teacher, w_s, w_t, target = _setup(1)
    student = [s.requires_grad_() for s in student]
    w_s.requires_grad_(train_head)
    # Two terms share student features and two share teacher features (bottom-k, or one teacher layer
    # matched twice), with unequal weights, as the interaction loss builds them.
    pairs = [(0, 1, 0.5), (0, 2, 0.5), (1, 2, 1.0), (2, 3, 0.25)]
    terms = [Term(student[i], op, w, teacher[j], target) for i, j, w in pairs]
    total, values = _reference(terms, w_s, w_t, 1.7, 0.3)
    chunked_total, chunked_values = head_losses(terms, w_s, w_t, tau=1.7, beta=0.3, chunk=chunk)
    assert torch.allclose(chunked_total, total, **TOL)
    assert torch.allclose(chunked_values, values, **TOL) and not chunked_values.requires_grad
    inputs = [*student, w_s]
    for got, want in zip(_grads(chunked_total, inputs), _grads(total, inputs), strict=True):
        assert torch.allclose(got, want, **TOL)


def test_mixed_terms_scaled_by_the_upstream_gradient():
    # Last-layer KL, CE to the labels and an intermediate pair in one call, then scaled as the training
    # loop scales the summed loss (world / response tokens).
    student, teacher, w_s, w_t, target = _setup(2)
    student = [s.requires_grad_() for s in student]
    w_s.requires_grad_()
    terms = [
        Term(student[0], "forward_kl", 1.0, teacher[0]),
        Term(student[1], LABELS, 0.3, target=target),
        Term(student[2], "jsd", 1.0, teacher[1]),
    ]
    total, _ = _reference(terms, w_s, w_t, 1.0, 0.5)
    chunked, _ = head_losses(terms, w_s, w_t, chunk=4)
    inputs = [*student, w_s]
    for got, want in zip(_grads(chunked * 3 / 7, inputs), _grads(total * 3 / 7, inputs), strict=True):
        assert torch.allclose(got, want, **TOL)


def test_masked_response_tokens_only():
    # The losses see only the response positions; a masked-out position changes nothing.
    student, teacher, w_s, w_t, target = _setup(3)
    keep = torch.rand(N, generator=torch.Generator().manual_seed(0)) > 0.4
    feats = student[0].requires_grad_()
    term = [Term(feats[keep], "reverse_kl", 1.0, teacher[0][keep])]
    total, _ = head_losses(term, w_s, w_t, chunk=3)
    (grad,) = torch.autograd.grad(total, feats)
    ref_total, _ = _reference([Term(feats[keep], "reverse_kl", 1.0, teacher[0][keep])], w_s, w_t, 1.0, 0.5)
    (ref_grad,) = torch.autograd.grad(ref_total, feats)
    assert torch.allclose(total, ref_total, **TOL) and torch.allclose(grad, ref_grad, **TOL)
    assert grad[~keep].abs().max() == 0


def test_without_grad_and_without_tokens():
    student, teacher, w_s, w_t, target = _setup(4)
    with torch.no_grad():
        total, values = head_losses([Term(student[0].requires_grad_(), LABELS, target=target)], w_s)
    assert not total.requires_grad and values.shape == (1,)
    empty = torch.zeros(0, D_S, requires_grad=True)
    total, _ = head_losses([Term(empty, "forward_kl", 1.0, torch.zeros(0, D_T))], w_s, w_t)
    total.backward()
    assert total.item() == 0 and empty.grad.shape == (0, D_S)
    assert score_matrix([empty], w_s, [torch.zeros(0, D_T)], w_t, "forward_kl").tolist() == [[0.0]]


def test_bias_heads_and_bad_terms_are_refused():
    assert head_weight(nn.Linear(4, 9, bias=False)).shape == (9, 4)
    with pytest.raises(ValueError, match="has a bias"):
        head_weight(nn.Linear(4, 9))
    student, teacher, w_s, w_t, _ = _setup()
    with pytest.raises(ValueError, match="teacher features"):
        head_losses([Term(student[0], "forward_kl")], w_s, w_t)
    with pytest.raises(ValueError, match="unknown loss op"):
        head_losses([Term(student[0], "kld", teacher=teacher[0])], w_s, w_t)


# --- the two training steps on the tiny models: chunked == reference, losses, matches and every gradient ---


@pytest.fixture(scope="module")
def tiny_step(tiny_models, processor, synth_data):
    from vlsi.data.records import ChatDataset, Encoder, collate
    from vlsi.model.backbone import Backbone
    from vlsi.model.loading import load_model
    from vlsi.model.verbalizer import VerbalizerConfig, build_verbalizers
    from vlsi.train.interact import Reader, teacher_response_states

    student = load_model(tiny_models["student"], dtype=torch.float32)

    def verbalized(model):
        backbone = Backbone(model)
        # Trained-looking verbalizers: a non-zero FFN, so the verbalizers' own gradients are exercised.
        torch.manual_seed(0)
        cfg = VerbalizerConfig(zero_init=False)
        return backbone, build_verbalizers(backbone, list(range(backbone.num_layers - 1)), cfg)

    teacher, teacher_verb = verbalized(load_model(tiny_models["teacher"], dtype=torch.float32))
    dataset = ChatDataset(synth_data / "train.json", Encoder(processor))
    batch = collate([dataset[i] for i in range(4)], processor.pad_token_id)
    states = teacher_response_states(teacher, teacher_verb.layers, batch)
    return dict(
        # A fresh copy of the loaded student per run: each run trains its own.
        student=lambda: verbalized(copy.deepcopy(student)),
        batch=batch,
        teacher_states=states,
        teacher_read=Reader(teacher, teacher_verb),
        teacher_layers=teacher_verb.layers,
    )


OPTIONS = [
    {},  # the default: il kld, ll kld, forward KL, vlsi matching
    {
        "il": "ce",
        "ll": "ce",
        "divergence": "reverse_kl",
        "kd_temperature": 2.0,
        "strategy": "bottom-k",
        "k": 2,
    },
    {"il": "l2", "ll": "none", "ar_weight": 0.5, "divergence": "jsd", "jsd_beta": 0.3},
    {"il": "none", "ll": "kld", "divergence": "jsd", "ar_weight": 1.0},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_interaction_loss_chunked_equals_reference(tiny_step, options):
    from vlsi.train.interact import InteractConfig, InteractingStudent

    results = {}
    for impl, chunk in (("reference", 1), ("chunked", 5), ("chunked", 1000)):
        student, verbalizers = tiny_step["student"]()
        cfg = InteractConfig(
            teacher="", teacher_verbalizers="", student="", student_verbalizers="", data="", out="",
            loss_impl=impl, loss_chunk_tokens=chunk, **options,
        )  # fmt: skip
        cfg.validate()
        module = InteractingStudent(student.model, verbalizers, cfg)
        loss, parts, match = module(
            tiny_step["batch"],
            tiny_step["teacher_states"],
            tiny_step["teacher_read"],
            tiny_step["teacher_layers"],
            torch.Generator().manual_seed(7),
        )
        loss.backward()
        grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
        results[impl, chunk] = loss, parts, match, grads
    loss, parts, match, grads = results["reference", 1]
    assert "student.lm_head.weight" in grads  # full fine-tuning trains the head too
    # The summed loss adds several layers' token sums in another order; on AVX-512 CPUs that fp32
    # rounding reaches 2e-5 relative, while each gradient still agrees to TOL.
    loss_tol = dict(rtol=1e-4, atol=1e-5)
    for key in (("chunked", 5), ("chunked", 1000)):
        c_loss, c_parts, c_match, c_grads = results[key]
        torch.testing.assert_close(c_loss, loss, **loss_tol)
        for part in parts:
            torch.testing.assert_close(c_parts[part], parts[part], **loss_tol)
        assert (c_match is None) == (match is None)
        if match is not None:
            assert c_match.teacher_index == match.teacher_index
            torch.testing.assert_close(c_match.probabilities, match.probabilities, **TOL)
        assert c_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(c_grads[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_verbalized_loss_chunked_equals_reference(tiny_step, chunk):
    from vlsi.train.verbalize import VerbalizedLoss, freeze

    results = []
    for chunk_tokens in (None, chunk):
        backbone, verbalizers = tiny_step["student"]()
        freeze(backbone.model)
        batch = tiny_step["batch"]
        with torch.no_grad():
            hidden = backbone.layer_states(verbalizers.layers, batch)
        per_layer = VerbalizedLoss(verbalizers, chunk_tokens)(hidden, batch["labels"])
        sum(per_layer.values()).backward()
        results.append((per_layer, {n: p.grad for n, p in verbalizers.named_parameters()}))
    (reference, ref_grads), (chunked, grads) = results
    for layer in reference:
        torch.testing.assert_close(chunked[layer], reference[layer], **TOL)
    for name, grad in ref_grads.items():
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path, monkeypatch):
    # The side-by-side benchmark (benchmarks/verbalized_losses.py) in its seconds-long setting.
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "verbalized_losses.py"
    spec = importlib.util.spec_from_file_location("verbalized_losses", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--tokens", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in (
        "extra_mem_ratio_chunked_vs_reference",
        "time_ratio_chunked_vs_reference",
        "measured_vs_flop_ratio",
    ):
        assert key in result
    steps = {(r["step"], r["impl"]) for r in result["rows"]}
    assert steps == {("sft", "-"), *((s, i) for s in ("interact", "verbalize") for i in bench.IMPLS)}
    assert all(r["time_s"] > 0 and r["peak_mb"] > 0 and r["gflops"] > 0 for r in result["rows"])


def test_the_chunk_is_chosen_by_device():
    from vlsi.losses.chunked import default_chunk_tokens
    from vlsi.train.interact import InteractSettings
    from vlsi.train.verbalize import VerbalizeSettings

    # A CPU keeps the chunk every CPU result was computed with; a GPU takes 8x more tokens per head read.
    assert default_chunk_tokens("cpu") == 128
    assert default_chunk_tokens("cuda") == default_chunk_tokens(torch.device("cuda", 3)) == 1024
    if not torch.cuda.is_available():
        assert default_chunk_tokens() == 128  # this machine's device
    for settings in (InteractSettings(), VerbalizeSettings()):
        assert settings.loss_chunk_tokens == 0  # by device
        assert settings.on_device("cpu").loss_chunk_tokens == 128
        assert settings.on_device("cuda").loss_chunk_tokens == 1024
        assert type(settings)(loss_chunk_tokens=64).on_device("cuda").loss_chunk_tokens == 64  # as given
    with pytest.raises(ValueError, match="--loss-chunk-tokens must be >= 0"):
        InteractSettings(loss_chunk_tokens=-1).validate()
