"""Times VLsI step 2 (interaction) on one GPU with real-size models built from the bundled real configs.

    PYTHONPATH=src python benchmarks/gpu_interact.py --out $OUT/gpu_interact.json
    PYTHONPATH=src python benchmarks/gpu_interact.py --tiny --out /tmp/gpu_interact.json   # CPU smoke run

The 72B teachers do not fit one GPU (147 GB in bf16), so the largest real pair that does stands in: the
Qwen2-VL-7B config as the (frozen, bf16) teacher and Qwen2-VL-2B as the student, trained as the recipes
train it (fp32 master weights under bf16 autocast, LoRA rank = alpha = 64, AdamW) with its verbalizers at
the recipes' student layers 2, 6, ..., 26. The teacher's verbalizers sit on every other layer (14 of 28), so
the search range has slack as it has against a 72B teacher's 20 layers. The pair's heads differ by padding
rows (152,064 vs 151,936), as in the paper's 72B -> 2B pair.

Weights are random (no checkpoint is read): the models are built directly on the GPU from their configs. The
step is the package's own: :func:`vlsi.train.interact.teacher_response_states` then
:class:`vlsi.train.interact.InteractingStudent`, backward, clip, AdamW, on synthetic token batches (one image each
unless --no-image) whose first --prompt tokens are masked out of the labels. After --warmup steps, --steps
are timed; the JSON reports tokens/s, step time, peak CUDA memory, the card, and ``vlsi plan``'s estimate for
the same setting.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REAL_TEACHER = "Qwen/Qwen2-VL-7B-Instruct"
REAL_STUDENT = "Qwen/Qwen2-VL-2B-Instruct"
IGNORE_INDEX = -100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument(
        "--tiny", action="store_true", help="tiny Qwen2-VL pair (vlsi.model.tiny sizes): a CPU smoke run"
    )
    p.add_argument("--teacher", default=REAL_TEACHER, help="hub id (bundled config) or checkpoint folder")
    p.add_argument("--student", default=REAL_STUDENT)
    p.add_argument("--teacher-layers", default=None, help="default: every other layer from 1")
    p.add_argument("--student-layers", default=None, help="default: 2, 6, ..., as the recipes")
    p.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence, image tokens included")
    p.add_argument("--prompt", type=int, default=256, help="leading tokens masked out of the labels")
    p.add_argument(
        "--image", action=argparse.BooleanOptionalAction, default=True, help="one image per sequence"
    )
    p.add_argument(
        "--image-grid", type=int, default=28, help="image patches per side (28 -> 196 image tokens)"
    )
    p.add_argument(
        "--lora", action=argparse.BooleanOptionalAction, default=True, help="LoRA (recipe) or full"
    )
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--loss-impl", default=None, help="step 2's loss_impl (default: the package's default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _configs(args):
    """(teacher config, student config, names for vlsi plan)."""
    if not args.tiny:
        from vlsi.run.plan import resolve_config

        return resolve_config(args.teacher)[0], resolve_config(args.student)[0], (args.teacher, args.student)
    from vlsi.model.tiny import TinyConfig, build_config, build_tokenizer

    tiny = TinyConfig(out="")
    tokenizer = build_tokenizer(tiny.vocab_size)
    configs = build_config(tiny, tiny.teacher, tokenizer), build_config(tiny, tiny.student, tokenizer)
    # vlsi plan reads configs from folders; the tiny ones live in a temporary one.
    folder = Path(tempfile.mkdtemp(prefix="vlsi-bench-"))
    names = []
    for role, config in zip(("teacher", "student"), configs, strict=True):
        config.save_pretrained(folder / role)
        names.append(str(folder / role))
    return *configs, tuple(names)


def build_model(config, dtype: torch.dtype, device: torch.device):
    """Random weights made on ``device`` itself (transformers' own init, run there): no host copy."""
    from transformers import AutoModelForImageTextToText

    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model


def synthetic_batch(config, args, generator: torch.Generator, device, mm_types: bool = True) -> dict:
    """Random regular tokens; one image per sequence after the first token; labels mask the prompt."""
    text = config.get_text_config()
    # Qwen2 ids below 151643 are ordinary tokens; the tiny tokenizer's 7 specials come first.
    low, high = (7, text.vocab_size) if args.tiny else (0, 151643)
    ids = torch.randint(low, high, (args.batch, args.seq_len), generator=generator)
    batch = {}
    if args.image:
        vision = config.vision_config
        grid, merge = args.image_grid, vision.spatial_merge_size
        n_image = grid * grid // merge**2
        if args.prompt < n_image + 3:
            raise SystemExit(
                f"--prompt {args.prompt} must hold the image's {n_image} tokens and its two markers"
            )
        ids[:, 1] = config.vision_start_token_id
        ids[:, 2 : 2 + n_image] = config.image_token_id
        ids[:, 2 + n_image] = config.vision_end_token_id
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        batch["pixel_values"] = torch.randn(args.batch * grid * grid, patch_dim, generator=generator)
        batch["image_grid_thw"] = torch.tensor([[1, grid, grid]] * args.batch)
        if mm_types:  # transformers places M-RoPE positions by these in newer versions
            batch["mm_token_type_ids"] = (ids == config.image_token_id).long()
    labels = ids.clone()
    labels[:, : args.prompt] = IGNORE_INDEX
    batch.update(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


def interact_settings(args):
    """Step 2's settings: the defaults (the recipe's) with this run's sizes."""
    from vlsi.train.interact import InteractSettings

    values = dict(lora=args.lora, lora_rank=args.lora_rank, lora_alpha=args.lora_rank, batch_size=args.batch)
    values.update(max_length=args.seq_len, seed=args.seed)
    if args.loss_impl:
        values["loss_impl"] = args.loss_impl
    return InteractSettings(**values).on_device()  # the chunk of the device this benchmark runs on


def plan_estimate(names, t_layers, s_layers, settings) -> dict:
    """``vlsi plan``'s step-2 estimate for this very setting (one GPU, so no DDP bucket)."""
    import dataclasses

    from vlsi.run.memory import GIB, estimate_memory
    from vlsi.run.plan import complete_recipe, summarize

    teacher, student = summarize(names[0]), summarize(names[1])
    interact_keys = {f.name for f in dataclasses.fields(settings)} - {"image_root"}
    recipe = complete_recipe(
        {
            "teacher": names[0],
            "student": names[1],
            "teacher_layers": ",".join(map(str, t_layers)),
            "student_layers": ",".join(map(str, s_layers)),
            "interact": {k: getattr(settings, k) for k in interact_keys},
        },
        "benchmark",
    )
    memory, _, _ = estimate_memory(teacher, student, recipe, "ddp", 1)["2 interact"]
    return {
        k: round(getattr(memory, k) / GIB, 2) for k in ("weights", "states", "activations", "heads", "total")
    }


def run(args) -> dict:
    from vlsi.losses.tokens import count_response_tokens
    from vlsi.model.backbone import Backbone, parse_layers
    from vlsi.model.lora import apply_lora
    from vlsi.model.verbalizer import build_verbalizers
    from vlsi.train.interact import InteractingStudent, Reader, teacher_response_states
    from vlsi.train.optim import build_optimizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    t_config, s_config, names = _configs(args)
    t_layers_n = t_config.get_text_config().num_hidden_layers
    s_layers_n = s_config.get_text_config().num_hidden_layers
    t_layers = parse_layers(args.teacher_layers) if args.teacher_layers else list(range(1, t_layers_n, 2))
    s_layers = parse_layers(args.student_layers) if args.student_layers else list(range(2, s_layers_n, 4))
    settings = interact_settings(args)
    result = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "teacher": names[0] if not args.tiny else "tiny teacher (vlsi.model.tiny)",
        "student": names[1] if not args.tiny else "tiny student (vlsi.model.tiny)",
        "teacher_layers": t_layers,
        "student_layers": s_layers,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "prompt_tokens_masked": args.prompt,
        "image_tokens_per_sequence": (args.image_grid**2 // 4) if args.image else 0,
        "student_training": f"LoRA r{args.lora_rank}" if args.lora else "full",
        "loss_impl": settings.loss_impl,
        "loss_chunk_tokens": settings.loss_chunk_tokens,
    }
    import transformers

    result["transformers"] = transformers.__version__

    t0 = time.perf_counter()
    # Autocast in bf16 on a GPU, as accelerate does; the CPU smoke run stays in fp32.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    teacher = (
        build_model(t_config, torch.bfloat16 if cuda else torch.float32, device).eval().requires_grad_(False)
    )
    t_backbone = Backbone(teacher)
    t_verbalizers = build_verbalizers(t_backbone, t_layers).eval().requires_grad_(False)
    student = build_model(s_config, torch.float32, device)
    if args.lora:
        student = apply_lora(student, args.lora_rank, args.lora_rank, args.seed)
    s_verbalizers = build_verbalizers(Backbone(student), s_layers)
    loss_module = InteractingStudent(student, s_verbalizers, settings).train()
    trainable = sum(p.numel() for p in loss_module.parameters() if p.requires_grad)
    optimizer, _ = build_optimizer(loss_module.parameters(), 1e-4, 1e-6, 0.0, args.warmup + args.steps, 0)
    if cuda:
        torch.cuda.synchronize()
    result["build_seconds"] = round(time.perf_counter() - t0, 1)
    result["trainable_parameters"] = trainable
    result["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
    result["student_parameters"] = sum(p.numel() for p in student.parameters())
    result["memory_after_build_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None

    mm_types = "mm_token_type_ids" in inspect.signature(type(teacher).forward).parameters
    teacher_read = Reader(t_backbone, t_verbalizers)
    generator = torch.Generator().manual_seed(args.seed)
    match_generator = torch.Generator().manual_seed(args.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, matches = [], [], []
    for step in range(args.warmup + args.steps):
        batch = synthetic_batch(s_config, args, generator, device, mm_types)
        n_resp = max(1, count_response_tokens(batch["labels"]))
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with amp:
            states = teacher_response_states(t_backbone, t_layers, batch)
            loss_sum, _, match = loss_module(batch, states, teacher_read, t_layers, match_generator)
            loss = loss_sum / n_resp
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in loss_module.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            if match is not None:
                matches.append([t_layers[i] for i in match.teacher_index])
    step_s = sum(times) / len(times)
    tokens = args.batch * args.seq_len
    result.update(
        step_seconds=round(step_s, 4),
        step_seconds_each=[round(t, 4) for t in times],
        tokens_per_second=round(tokens / step_s, 1),
        response_tokens_per_second=round(args.batch * (args.seq_len - args.prompt) / step_s, 1),
        losses=[round(x, 4) for x in losses],
        matched_teacher_layers_last_step=matches[-1] if matches else None,
        peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
    )
    try:
        result["plan_estimate_gib"] = plan_estimate(names, t_layers, s_layers, settings)
    except Exception as e:  # the measurement stands without it
        result["plan_estimate_gib"] = {"error": f"{type(e).__name__}: {e}"}
    result["plan_note"] = (
        "vlsi plan counts every token as a response token; "
        "the measured step runs interact.py as it is in this tree"
    )
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        args.batch, args.seq_len, args.prompt, args.image_grid = 2, 48, 12, 4
        args.warmup, args.steps = 0, 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    attempts = []
    for _ in range(3):
        try:
            result = run(args)
            break
        except torch.OutOfMemoryError as e:
            attempts.append({"batch": args.batch, "seq_len": args.seq_len, "error": str(e).splitlines()[0]})
            if args.batch > 1:
                args.batch //= 2
            else:
                args.seq_len //= 2
                args.prompt //= 2
        # The failed attempt's models are garbage once the exception is gone.
        gc.collect()
        torch.cuda.empty_cache()
    else:
        result = {"error": "out of memory at every size tried"}
    result["out_of_memory_attempts"] = attempts
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
