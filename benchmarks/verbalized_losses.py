"""Side by side: what the verbalized losses cost at Qwen2-VL's real vocabulary, reference vs chunked.

    PYTHONPATH=src python benchmarks/verbalized_losses.py --out bench_cpu.json             # CPU, ~10 min
    PYTHONPATH=src python benchmarks/verbalized_losses.py --device cuda --out bench_gpu.json
    PYTHONPATH=src python benchmarks/verbalized_losses.py --quick --out /tmp/smoke.json     # seconds

Random-weight Qwen2-VL models with the real vocabulary (151,936 rows) and scaled-down widths (``--preset
cpu``: student 512 x 8 layers, teacher 1024 x 16; ``--preset gpu``: Qwen2-VL-2B's and -7B's language model
sizes, the 7B head padded to 152,064 rows as in the real checkpoints). On one batch of ``--tokens`` response
tokens (after a short prompt) it times one optimizer step of

- ``sft``: the student's step 3, the model's own logits and response cross-entropy (:mod:`vlsi.train.sft`);
- ``interact``: step 2, the teacher forward without grad, the student with its verbalizers, matching and
  the losses of :class:`vlsi.train.interact.InteractingStudent` (``reference`` and ``chunked``);
- ``verbalize``: step 1, the frozen student's states and :class:`vlsi.train.verbalize.VerbalizedLoss`;

each also ``off``: the same step with the verbalized losses replaced by a head-free loss on the same
states, so that "extra memory" (the peak of forward and backward above the step's starting point, minus
the same for ``off``) is what the losses themselves hold, not the weights, the optimizer state or the
optimizer update's temporaries (its peak is reported apart). On CPU memory is the resident
set's high-water mark over the measured step, reset through ``/proc/self/clear_refs`` before it (glibc is
told to hand large blocks back, so the resident set follows the live tensors); ``--isolate`` also runs each
configuration in a fresh process. On CUDA it is ``torch.cuda.max_memory_allocated`` over the step. Beside the measured
times the script prints each step's FLOPs, counted analytically (matmuls 2mnk, backward twice the forward;
elementwise passes over ``[tokens, vocabulary]`` at a few ops per element), and the interaction / SFT time
ratio they predict. The prediction holds only where matmuls dominate: one 528-token sequence leaves a
GPU launch- and bandwidth-bound (the student's SFT step then runs at a few % of peak), so there give it
several sequences per step with ``--batch``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from vlsi.losses.tokens import IGNORE_INDEX  # noqa: E402

IMPLS = ("off", "reference", "chunked")
# Approximate elementwise ops per [token, vocabulary] element, for the FLOP count: a log-softmax reads,
# subtracts the max, exponentiates, sums and subtracts the log-sum; its backward about as much.
LOG_SOFTMAX_OPS, KL_OPS, DOT_OPS, GRAD_OPS = 5, 4, 2, 5


@dataclass
class LM:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 151936
    tie: bool = False


@dataclass
class Preset:
    student: LM
    teacher: LM
    student_layers: list[int]
    teacher_layers: list[int]
    prompt: int = 16
    tokens: list[int] = field(default_factory=lambda: [128, 256, 512])


PRESETS = {
    "cpu": Preset(LM(512, 8, 8, 2, 1408), LM(1024, 16, 16, 2, 2816), [1, 3, 5], [2, 6, 10, 13]),
    # Qwen2-VL-2B (tied head) and -7B language models; verbalizers at the recipes' layers 2, 6, ..., 26, the
    # teacher's on every other layer.
    "gpu": Preset(
        LM(1536, 28, 12, 2, 8960, tie=True),
        LM(3584, 28, 28, 4, 18944, vocab=152064),
        list(range(2, 28, 4)),
        list(range(1, 28, 2)),
    ),
    # Seconds on a CPU: the smoke test's setting (a small vocabulary).
    "quick": Preset(
        LM(32, 2, 2, 1, 64, vocab=1024), LM(48, 3, 2, 1, 96, vocab=1040), [0], [0, 1], 4, [8, 16]
    ),
}


# --- models and batches ----------------------------------------------------------------------------------


def qwen2_vl_config(lm: LM):
    from transformers import Qwen2VLConfig

    from vlsi.model.tiny import mrope_sections

    mrope = mrope_sections(lm.hidden // lm.heads // 2)
    text = dict(
        vocab_size=lm.vocab,
        hidden_size=lm.hidden,
        num_hidden_layers=lm.layers,
        num_attention_heads=lm.heads,
        num_key_value_heads=lm.kv_heads,
        intermediate_size=lm.intermediate,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        tie_word_embeddings=lm.tie,
    )
    # A minimal vision tower: the batches are text only, the language model is what is measured.
    vision = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=lm.hidden, patch_size=8)
    ids = dict(image_token_id=lm.vocab - 4, video_token_id=lm.vocab - 3)
    ids |= dict(vision_start_token_id=lm.vocab - 2, vision_end_token_id=lm.vocab - 1)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=lm.tie, **ids)


def build_model(lm: LM, seed: int, device: str, dtype: torch.dtype = torch.float32):
    """Random weights, built where they will live and in their dtype (a 7B teacher never exists in fp32)."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2VLForConditionalGeneration(qwen2_vl_config(lm))
    finally:
        torch.set_default_dtype(default)


def make_batch(preset: Preset, tokens: int, device: str, batch: int = 1) -> dict:
    """``batch`` sequences: ``prompt`` masked tokens, then ``tokens`` labelled ones, each predicted by the
    state before it, so exactly ``tokens`` response states per sequence."""
    g = torch.Generator().manual_seed(tokens)
    length = preset.prompt + tokens
    ids = torch.randint(0, preset.student.vocab - 8, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, : preset.prompt] = IGNORE_INDEX
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=torch.zeros_like(ids),
        labels=labels,
    )
    return {k: v.to(device) for k, v in batch.items()}


# --- FLOPs -----------------------------------------------------------------------------------------------


def decoder_flops(lm: LM, tokens: int) -> int:
    """Forward matmul FLOPs of the decoder layers on one sequence of ``tokens``."""
    head_dim = lm.hidden // lm.heads
    projections = 2 * tokens * lm.hidden * (2 * lm.hidden + 2 * lm.kv_heads * head_dim)  # q, o; k, v
    attention = 2 * 2 * tokens * tokens * lm.hidden  # scores and the weighted sum
    mlp = 2 * tokens * 3 * lm.hidden * lm.intermediate
    return lm.layers * (projections + attention + mlp)


def step_flops(preset: Preset, kind: str, impl: str, tokens: int, batch: int = 1) -> dict[str, float]:
    """FLOPs of one step's forward and backward by part, ``batch`` sequences of ``tokens`` response tokens.
    The optimizer update is not counted: it is memory-bound, the same in every step of a kind, and timed
    on its own."""
    s, t = preset.student, preset.teacher
    seq, n = preset.prompt + tokens, tokens * batch  # one sequence's length; response tokens in the step
    decoder = lambda lm: batch * decoder_flops(lm, seq)  # noqa: E731
    v = min(s.vocab, t.vocab)
    t_s, t_l = len(preset.student_layers), len(preset.teacher_layers)
    head_s, head_t = 2 * n * s.hidden * s.vocab, 2 * n * t.hidden * t.vocab
    ffn = lambda d: 2 * n * 3 * d * d  # noqa: E731  (a verbalizer's FFN, forward)
    if kind == "sft":
        return {
            "student backbone": 3 * decoder(s),
            # The model's own logits at every position, forward and backward (input and weight).
            "head": 3 * 2 * batch * seq * s.hidden * s.vocab,
            "elementwise": (LOG_SOFTMAX_OPS + GRAD_OPS) * batch * seq * s.vocab,
        }
    if kind == "verbalize":
        parts = {"student backbone": decoder(s), "verbalizers": t_s * 3 * ffn(s.hidden)}
        if impl != "off":
            # Forward and the input gradient; the head is frozen in step 1.
            parts["heads"] = t_s * 2 * head_s
            parts["elementwise"] = t_s * (LOG_SOFTMAX_OPS + GRAD_OPS) * n * s.vocab
        return parts
    parts = {
        "teacher backbone": decoder(t) + t_l * ffn(t.hidden),
        "student backbone": 3 * decoder(s) + t_s * 3 * ffn(s.hidden),
    }
    if impl == "off":
        return parts
    terms = t_s + 1  # the matched pairs and the last layer
    # Scoring: every student and teacher target layer through its head once.
    parts["scoring heads"] = t_s * head_s + t_l * head_t
    if impl == "reference":
        # Each pair log-softmaxes both sides and sums the KL elementwise.
        parts["scoring elementwise"] = t_s * t_l * (2 * LOG_SOFTMAX_OPS + KL_OPS) * n * v
        # The matched teacher layers and the last layers; the student logits are kept from scoring.
        parts["loss heads"] = t_s * head_t + head_s + head_t
    else:
        # One log-softmax per layer, one exp per teacher layer, one dot product per pair.
        parts["scoring elementwise"] = (
            ((t_s + t_l) * LOG_SOFTMAX_OPS + t_l * (1 + DOT_OPS) + t_s * t_l * DOT_OPS) * n * v
        )
        # The chunked loss recomputes the student logits it did not keep.
        parts["loss heads"] = terms * (head_s + head_t)
    parts["loss elementwise"] = terms * (2 * LOG_SOFTMAX_OPS + KL_OPS + GRAD_OPS) * n * v
    parts["head backward"] = terms * 2 * head_s  # input and weight: full fine-tuning trains the head
    return parts


# --- one configuration -----------------------------------------------------------------------------------


def _proc_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Memory:
    """Peak memory of what runs between :meth:`reset` and :meth:`peak`, in MB."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def reset(self) -> float:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return _proc_kb("VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _proc_kb("VmHWM") / 1024


def _touch(params) -> torch.Tensor:
    """Zero, with a gradient for each of ``params``, the trained parameters only the verbalized losses reach
    (the head, the verbalizers): the ``off`` step then holds the same gradients (model state, like weights
    and optimizer state) as the real one, created at the same point, the start of backward."""
    return sum(p.sum() for p in params if p.requires_grad) * 0.0


class Steps:
    """The models and one step of each kind, as the package's training loops run them."""

    def __init__(
        self, preset: Preset, device: str, dtype: str, chunk: int, models: Path | None, batch: int = 1
    ):
        from vlsi.model.backbone import Backbone
        from vlsi.model.verbalizer import VerbalizerConfig, build_verbalizers
        from vlsi.train.interact import Reader

        self.preset, self.device, self.chunk, self.batch = preset, device, chunk, batch
        self.autocast = lambda: torch.autocast(device, torch.bfloat16, enabled=dtype == "bf16")
        if models is not None:
            from transformers import Qwen2VLForConditionalGeneration

            load = Qwen2VLForConditionalGeneration.from_pretrained
            student, teacher = (load(models / name, dtype=torch.float32) for name in ("student", "teacher"))
        else:
            # The frozen teacher in bf16 when training in bf16, as vlsi.train.interact loads it.
            t_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
            student, teacher = (
                build_model(preset.student, 0, device),
                build_model(preset.teacher, 1, device, t_dtype),
            )
        teacher = teacher.to(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
        self.student = Backbone(student.to(device))
        self.teacher = Backbone(teacher.eval().requires_grad_(False))
        torch.manual_seed(2)
        # Trained-looking verbalizers (a non-zero FFN), fp32 like the package's.
        cfg = VerbalizerConfig(zero_init=False)
        self.verbalizers = build_verbalizers(self.student, preset.student_layers, cfg)
        t_verb = build_verbalizers(self.teacher, preset.teacher_layers, cfg).requires_grad_(False)
        self.teacher_read = Reader(self.teacher, t_verb)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _optimizer(self, module):
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-7)

    def prepare(self, kind: str, impl: str, optimizer=None):
        """(step function, optimizer) for one configuration; step(batch) runs forward, backward, update.
        ``optimizer``: one to reuse (its state kept), else a new one."""
        from vlsi.losses.tokens import response_cross_entropy
        from vlsi.model.verbalizer import response_states
        from vlsi.train.interact import InteractConfig, InteractingStudent, teacher_response_states
        from vlsi.train.verbalize import VerbalizedLoss

        model, layers = self.student.model, self.verbalizers.layers
        last = self.student.num_layers - 1
        if kind == "sft":
            model.requires_grad_(True).train()
            optimizer = optimizer or self._optimizer(model)

            def loss_fn(batch):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
                return response_cross_entropy(logits, batch["labels"])

        elif kind == "verbalize":
            model.requires_grad_(False).eval()
            self.verbalizers.requires_grad_(True)
            loss_module = VerbalizedLoss(self.verbalizers, self.chunk if impl == "chunked" else None)
            optimizer = optimizer or self._optimizer(loss_module)

            def loss_fn(batch):
                with torch.no_grad():
                    hidden = self.student.layer_states(layers, batch)
                if impl == "off":  # the verbalizers without the head
                    states = [response_states(hidden[layer], batch["labels"])[0] for layer in layers]
                    return sum(
                        self.verbalizers.features(layer, h).float().square().sum()
                        for layer, h in zip(layers, states, strict=True)
                    )
                return sum(loss_module(hidden, batch["labels"]).values())

        else:
            model.requires_grad_(True).train()
            self.verbalizers.requires_grad_(True)
            cfg = InteractConfig(
                teacher="", teacher_verbalizers="", student="", student_verbalizers="", data="", out="",
                loss_impl="reference" if impl == "reference" else "chunked", loss_chunk_tokens=self.chunk,
            )  # fmt: skip
            loss_module = InteractingStudent(model, self.verbalizers, cfg)
            optimizer = optimizer or self._optimizer(loss_module)
            generator = torch.Generator().manual_seed(0)
            t_layers = self.teacher_read.verbalizers.layers

            def loss_fn(batch):
                teacher_states = teacher_response_states(self.teacher, t_layers, batch)
                if impl == "off":  # the student's backbone without the head
                    hidden = self.student.layer_states([last], batch)
                    states = response_states(hidden[last], batch["labels"])[0]
                    heads = [self.student.lm_head.weight, *self.verbalizers.parameters()]
                    return states.float().square().sum() + _touch(heads)
                return loss_module(batch, teacher_states, self.teacher_read, t_layers, generator)[0]

        def step(batch, memory: Memory | None = None) -> tuple[float, float, float, float | None]:
            """(loss, forward + backward seconds, update seconds, peak MB of forward + backward)."""
            n = max(1, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
            start = time.perf_counter()
            with self.autocast():
                loss = loss_fn(batch) / n
            loss.backward()
            self._sync()
            middle = time.perf_counter()
            # Before the update: AdamW's temporaries (parameter-sized) would otherwise set every peak.
            peak = memory.peak() if memory is not None else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._sync()
            return float(loss.detach()), middle - start, time.perf_counter() - middle, peak

        return step, optimizer


def measure(steps: Steps, kind: str, impl: str, tokens: int, repeats: int) -> dict:
    memory = Memory(steps.device)
    batch = make_batch(steps.preset, tokens, steps.device, steps.batch)
    small = make_batch(steps.preset, min(16, tokens), steps.device, steps.batch)
    optimizer = None
    if impl == "off":
        # The optimizer state of the real step exists in the "off" one too: the same persistent memory.
        step, optimizer = steps.prepare(kind, "chunked")
        step(small)
    step, optimizer = steps.prepare(kind, impl, optimizer)
    step(small)  # warm-up: optimizer state, allocator, kernels
    base = memory.reset()
    runs = [step(batch, memory) for _ in range(repeats)]
    peak_with_update = memory.peak()
    del optimizer
    loss, compute, update, _ = min(runs, key=lambda r: r[1] + r[2])  # the fastest repeat
    peak = max(r[3] for r in runs)
    timing = {"time_s": compute + update, "compute_s": compute, "update_s": update}
    memory_mb = {
        "peak_mb": peak,
        "peak_with_update_mb": peak_with_update,
        "base_mb": base,
        "step_mb": peak - base,
    }
    return {**timing, **memory_mb, "loss": loss}


# --- the run ---------------------------------------------------------------------------------------------


CONFIGS = [("sft", "-"), *[("interact", i) for i in IMPLS], *[("verbalize", i) for i in IMPLS]]


def _worker(spec: dict) -> None:
    preset = Preset(**{k: v for k, v in spec["preset"].items() if k not in ("student", "teacher")},
                    student=LM(**spec["preset"]["student"]), teacher=LM(**spec["preset"]["teacher"]))  # fmt: skip
    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    steps = Steps(preset, "cpu", spec["dtype"], spec["chunk"], Path(spec["models"]), spec["batch"])
    result = measure(steps, spec["kind"], spec["impl"], spec["tokens"], spec["repeats"])
    print("RESULT " + json.dumps(result), flush=True)


def _run_isolated(args, preset: Preset) -> dict:
    """Each configuration in a fresh process, so that each has its own resident-set peak."""
    results = {}
    with tempfile.TemporaryDirectory() as models:
        for name, lm, seed in (("student", preset.student, 0), ("teacher", preset.teacher, 1)):
            build_model(lm, seed, "cpu").save_pretrained(Path(models) / name)
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
        )
        # Large blocks straight from and back to the OS: the resident set then follows the live tensors.
        env |= {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
        for tokens in args.tokens:
            for kind, impl in CONFIGS:
                spec = dict(preset=asdict(preset), models=models, kind=kind, impl=impl, tokens=tokens)
                spec |= dict(dtype=args.dtype, chunk=args.chunk, repeats=args.repeats, threads=args.threads)
                spec |= dict(batch=args.batch)
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise RuntimeError(f"{kind}/{impl} at {tokens} tokens failed:\n{proc.stderr[-3000:]}")
                results[(tokens, kind, impl)] = json.loads(lines[-1][len("RESULT ") :])
                _progress(tokens, kind, impl, results[(tokens, kind, impl)])
    return results


def _release_large_blocks() -> None:
    """glibc: serve and return large blocks with mmap, so the resident set follows the live tensors."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed, so it no longer grows with freed blocks)
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


def _run_in_process(args, preset: Preset) -> dict:
    """Every configuration in this process: the models are built once; memory is reset per measurement."""
    if args.device == "cpu":
        with contextlib.suppress(OSError):
            _release_large_blocks()
    steps = Steps(preset, args.device, args.dtype, args.chunk, None, args.batch)
    results = {}
    for tokens in args.tokens:
        for kind, impl in CONFIGS:
            results[(tokens, kind, impl)] = measure(steps, kind, impl, tokens, args.repeats)
            _progress(tokens, kind, impl, results[(tokens, kind, impl)])
    return results


def _progress(tokens, kind, impl, r) -> None:
    print(
        f"  {tokens:>5} {kind:>9} {impl:>9}  {r['time_s']:8.3f} s  peak {r['peak_mb']:9.0f} MB",
        file=sys.stderr,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    # Extra memory can come out <= 0 at tiny sizes (below the allocator's granularity): no ratio then.
    return a / b if a is not None and b is not None and b > 0 else None


def summarise(args, preset: Preset, results: dict) -> dict:
    rows = []
    for (tokens, kind, impl), r in results.items():
        flops = step_flops(preset, kind, impl, tokens, args.batch)
        off = results.get((tokens, kind, "off"))
        rows.append(
            {
                "tokens": tokens,
                "step": kind,
                "impl": impl,
                **r,
                "extra_mb": r["step_mb"] - off["step_mb"] if off and impl != "-" else None,
                "gflops": sum(flops.values()) / 1e9,
                "gflops_by_part": {k: v / 1e9 for k, v in flops.items()},
            }
        )
    by = {(r["tokens"], r["step"], r["impl"]): r for r in rows}
    per_tokens = {}
    for tokens in args.tokens:
        ref, chk, sft = (
            by[tokens, "interact", "reference"],
            by[tokens, "interact", "chunked"],
            by[tokens, "sft", "-"],
        )
        v_ref, v_chk = by[tokens, "verbalize", "reference"], by[tokens, "verbalize", "chunked"]
        predicted = chk["gflops"] / sft["gflops"]
        # Forward + backward against their FLOPs; the update (the same parameters in both) is reported apart.
        measured = chk["compute_s"] / sft["compute_s"]
        per_tokens[tokens] = {
            "interact_extra_mem_ratio_chunked_vs_reference": _ratio(chk["extra_mb"], ref["extra_mb"]),
            "interact_time_ratio_chunked_vs_reference": chk["time_s"] / ref["time_s"],
            "verbalize_extra_mem_ratio_chunked_vs_reference": _ratio(v_chk["extra_mb"], v_ref["extra_mb"]),
            "verbalize_time_ratio_chunked_vs_reference": v_chk["time_s"] / v_ref["time_s"],
            "interact_vs_sft_measured": measured,
            "interact_vs_sft_predicted_from_flops": predicted,
            "interact_vs_sft_measured_with_update": chk["time_s"] / sft["time_s"],
            "interact_compute_time_ratio_chunked_vs_reference": chk["compute_s"] / ref["compute_s"],
            "interact_reference_vs_sft_measured": ref["compute_s"] / sft["compute_s"],
            "interact_reference_vs_sft_predicted_from_flops": ref["gflops"] / sft["gflops"],
            "measured_vs_flop_ratio": measured / predicted,
        }
    top = per_tokens[max(args.tokens)]
    return {
        "device": _device_name(args.device),
        "dtype": args.dtype,
        "preset": args.preset,
        "models": asdict(preset),
        "chunk_tokens": args.chunk,
        "tokens": args.tokens,
        "batch": args.batch,
        "at_tokens": max(args.tokens),
        "extra_mem_ratio_chunked_vs_reference": top["interact_extra_mem_ratio_chunked_vs_reference"],
        "time_ratio_chunked_vs_reference": top["interact_time_ratio_chunked_vs_reference"],
        "measured_vs_flop_ratio": top["measured_vs_flop_ratio"],
        "per_tokens": per_tokens,
        "rows": rows,
    }


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def print_table(summary: dict) -> None:
    print(
        f"{summary['device']}, {summary['dtype']}, preset {summary['preset']}, batch {summary['batch']}, "
        f"chunk {summary['chunk_tokens']} tokens"
    )
    head = (
        f"{'tokens':>6} {'step':>9} {'impl':>9} {'time s':>8} {'fwd+bwd':>8} {'update':>7} {'peak MB':>9} "
        f"{'extra MB':>9} {'GFLOP':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in summary["rows"]:
        extra = f"{r['extra_mb']:9.0f}" if r["extra_mb"] is not None else f"{'':>9}"
        print(
            f"{r['tokens']:>6} {r['step']:>9} {r['impl']:>9} {r['time_s']:8.3f} {r['compute_s']:8.3f} "
            f"{r['update_s']:7.3f} {r['peak_mb']:9.0f} {extra} {r['gflops']:8.1f}"
        )
    print()
    print(
        f"{'tokens':>6} {'interact chunked/ref':>21} {'verbalize chunked/ref':>22} {'interact/SFT, fwd+bwd':>26}"
    )
    print(
        f"{'':>6} {'extra mem':>10} {'time':>10} {'extra mem':>11} {'time':>10} {'measured':>12} {'FLOPs':>8} {'m/F':>5}"
    )
    for tokens, p in summary["per_tokens"].items():
        cells = [
            (p["interact_extra_mem_ratio_chunked_vs_reference"], 10, 3),
            (p["interact_time_ratio_chunked_vs_reference"], 10, 3),
            (p["verbalize_extra_mem_ratio_chunked_vs_reference"], 11, 3),
            (p["verbalize_time_ratio_chunked_vs_reference"], 10, 3),
            (p["interact_vs_sft_measured"], 12, 2),
            (p["interact_vs_sft_predicted_from_flops"], 8, 2),
            (p["measured_vs_flop_ratio"], 5, 2),
        ]
        print(
            f"{tokens:>6} "
            + " ".join(f"{v:{w}.{d}f}" if v is not None else f"{'-':>{w}}" for v, w, d in cells)
        )
    print("\nFLOPs by part (GFLOP) at", summary["at_tokens"], "tokens:")
    for r in summary["rows"]:
        if r["tokens"] == summary["at_tokens"]:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["gflops_by_part"].items())
            print(f"  {r['step']:>9} {r['impl']:>9}: {parts}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA"
    )
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="default: cpu or gpu by --device")
    p.add_argument("--tokens", default=None, help="response tokens, comma-separated (default 128,256,512)")
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="sequences per step, each with --tokens response tokens (a GPU needs several to be compute-bound)",
    )
    p.add_argument("--chunk", type=int, default=None, help="chunk tokens (default: the package's default)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed steps per configuration (the fastest counts)"
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (preset quick)")
    p.add_argument(
        "--isolate", action="store_true", help="CPU: each configuration in a fresh process (slower to start)"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from vlsi.losses.chunked import DEFAULT_CHUNK_TOKENS

    args.preset = "quick" if args.quick else args.preset or ("gpu" if args.device == "cuda" else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    preset = PRESETS[args.preset]
    args.tokens = [int(x) for x in args.tokens.split(",")] if args.tokens else preset.tokens
    args.chunk = args.chunk or (8 if args.quick else DEFAULT_CHUNK_TOKENS)
    # Two on CPU: with one, a configuration measured first once ran 2x slow (the 128-token SFT step).
    args.repeats = args.repeats or (3 if args.device == "cuda" else 1 if args.quick else 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    preset = PRESETS[args.preset]
    run = _run_isolated if args.isolate and args.device == "cpu" else _run_in_process
    summary = summarise(args, preset, run(args, preset))
    print_table(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
