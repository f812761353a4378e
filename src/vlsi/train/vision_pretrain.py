"""Stage 0 of the tiny setting: one vision encoder, pretrained once, shared by teacher and student.

Qwen2-VL gives its 2B, 7B and 72B models one vision transformer; only the merger, the projection of
merged patches into each language model's width, differs. Here the same holds: the tiny teacher and
student share the encoder's architecture, and this stage trains one encoder trunk (patch embedding
and blocks) with both models' mergers on a task that is cheap to see: every merged visual token
names the digit in its column of a :mod:`vlsi.data.digits` image. A linear probe per merger reads the
digit out. The trunk then goes into both checkpoints and each model's merger into its own.

Why: trained from scratch together with a language model, the encoder learned nothing in 500
steps (both models sat at the answer prior); pretrained on its own it reads digits in seconds, and
the language models' training is then about combining what is seen, where depth and width matter.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from vlsi.data.processing import VLProcessor
from vlsi.model.export import export_checkpoint
from vlsi.model.loading import load_model
from vlsi.train.optim import build_optimizer

log = logging.getLogger("vlsi.train.vision_pretrain")


@dataclass
class VisionPretrainConfig:
    teacher: str = field(
        metadata={"help": "tiny teacher checkpoint (its encoder trunk and merger are trained)"}
    )
    student: str = field(metadata={"help": "tiny student checkpoint with the same encoder architecture"})
    data: str = field(metadata={"help": "a vlsi.data.digits JSON file whose records carry 'digits'"})
    out: str = field(
        metadata={"help": "writes OUT/teacher and OUT/student, the same models with the encoder"}
    )
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    seed: int = field(default=0, metadata={"help": "seed of the probes and the image order"})


def _column_labels(digits: list[str], grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """The digit under each merged token, in the encoder's order (row-major over the merged grid)."""
    labels = []
    for text, (t, h, w) in zip(digits, grid_thw.tolist(), strict=True):
        rows, cols = h // merge, w // merge
        if cols % len(text):
            raise ValueError(
                f"{cols} merged columns do not split evenly over the {len(text)} digits {text!r}"
            )
        per_digit = cols // len(text)
        labels += [int(text[c // per_digit]) for _ in range(t * rows) for c in range(cols)]
    return torch.tensor(labels)


def _digit_records(data: str) -> list[dict]:
    records = [r for r in json.loads(Path(data).read_text()) if "digits" in r]
    if not records:
        raise ValueError(f"{data}: no record carries 'digits'; stage 0 needs a vlsi.data.digits file")
    return records


def pretrain_vision(cfg: VisionPretrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    processor = VLProcessor.from_pretrained(cfg.teacher)
    teacher = load_model(cfg.teacher, dtype=torch.float32)
    student = load_model(cfg.student, dtype=torch.float32)
    trunk, s_merger = teacher.model.visual, student.model.visual.merger
    if trunk.config.to_dict() | {"hidden_size": 0} != student.model.visual.config.to_dict() | {
        "hidden_size": 0
    }:
        raise ValueError(
            f"{cfg.teacher} and {cfg.student} have different vision encoders; stage 0 shares one"
        )
    probes = torch.nn.ModuleList(
        [torch.nn.Linear(m.config.text_config.hidden_size, 10) for m in (teacher, student)]
    )
    params = [*trunk.parameters(), *s_merger.parameters(), *probes.parameters()]
    optimizer, scheduler = build_optimizer(
        params, cfg.lr, cfg.lr / 100, 0.0, cfg.steps, min(20, cfg.steps // 10)
    )
    base = Path(cfg.data).parent
    records = _digit_records(cfg.data)
    rng = random.Random(cfg.seed)
    history = []
    for _ in (bar := tqdm(range(cfg.steps), desc="stage 0: vision", dynamic_ncols=True)):
        batch = rng.sample(records, min(cfg.batch_size, len(records)))
        inputs = processor.process_images([Image.open(base / r["image"]).convert("RGB") for r in batch])
        labels = _column_labels(
            [r["digits"] for r in batch], inputs["image_grid_thw"], trunk.spatial_merge_size
        )
        out = trunk(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        losses = [
            torch.nn.functional.cross_entropy(probes[0](out.pooler_output), labels),
            torch.nn.functional.cross_entropy(probes[1](s_merger(out.last_hidden_state)), labels),
        ]
        optimizer.zero_grad()
        sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            acc = (probes[1](s_merger(out.last_hidden_state)).argmax(-1) == labels).float().mean().item()
        history.append(
            {"teacher_loss": losses[0].item(), "student_loss": losses[1].item(), "student_acc": acc}
        )
        bar.set_postfix(loss=f"{losses[0].item():.3f}", acc=f"{acc:.2f}")
    return _write(cfg, processor, teacher, student, history)


def _write(cfg: VisionPretrainConfig, processor, teacher, student, history: list[dict]) -> dict:
    """Both models with the trained encoder, and the summary of the probes' last 20 steps."""
    # The student gets the teacher's trunk: one encoder, as one ViT serves every Qwen2-VL size.
    trunk, student_visual = teacher.model.visual, student.model.visual
    student_visual.load_state_dict(
        {k: v for k, v in trunk.state_dict().items() if not k.startswith("merger.")}
        | {f"merger.{k}": v for k, v in student_visual.merger.state_dict().items()}
    )
    out = Path(cfg.out)
    tail = history[-20:]
    summary = {
        "steps": cfg.steps,
        "teacher_probe_loss": sum(h["teacher_loss"] for h in tail) / len(tail),
        "student_probe_loss": sum(h["student_loss"] for h in tail) / len(tail),
        "student_probe_accuracy": sum(h["student_acc"] for h in tail) / len(tail),
    }
    for name, model in (("teacher", teacher), ("student", student)):
        export_checkpoint(model, processor, out / name, extra={"vision_pretrain": summary})
    (out / "vision_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
