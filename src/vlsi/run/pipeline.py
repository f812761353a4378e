"""The built-in tiny setting, end to end: data, models, base training, evaluation.

Every stage writes its outputs and then a marker, so a rerun skips finished stages and picks an
interrupted one back up (SFT resumes from its own checkpoints).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlsi.data.digits import DigitsConfig
from vlsi.data.digits import generate as generate_digits
from vlsi.data.synth import SynthConfig, generate
from vlsi.model.export import is_exported
from vlsi.model.tiny import TinyConfig
from vlsi.model.tiny_models import build_tiny
from vlsi.run.evaluate import EvalConfig, evaluate
from vlsi.run.figures import read_curve
from vlsi.run.relabel import relabel
from vlsi.train.sft import SFTConfig
from vlsi.train.vision_pretrain import VisionPretrainConfig, pretrain_vision


@dataclass
class TinySettings:
    """The built-in tiny setting's data and base models; ``vlsi distill`` runs it when no models are given.

    The ``digits`` task (:mod:`vlsi.data.digits`) follows the paper's regime: the teacher base learns from a
    large pool, the student base from its own smaller set. Both bases train to their plateaus (twice the
    steps gains under a point on validation: docs/tiny_setting.md). The distillation set is the student's
    own set, or (``distill`` > 0) images new to it with answers as ``answers`` / ``noise`` / ``labels`` say:
    the regimes of ``benchmarks/regimes.py``.
    """

    seed: int = field(default=0, metadata={"help": "seed of data, weights and training"})
    task: str = field(default="digits", metadata={"help": "digits (default) | grid (the earlier task)"})
    # 1,000 images: the student base plateaus ~20 points below the teacher (docs/tiny_setting.md), the
    # paper's regime of a much stronger teacher; on 2,000 it came within 8.
    train: int = field(
        default=1000, metadata={"help": "distillation set: digits images, or grid train questions"}
    )
    pool: int = field(
        default=20000, metadata={"help": "digits images the teacher base learns from (0 = the train set)"}
    )
    val: int = field(default=100, metadata={"help": "digits validation images (learning curves)"})
    test: int = field(default=200, metadata={"help": "digits test images, or grid test records"})
    captions: bool = field(
        default=False,
        metadata={"help": "grid only: a train-only 'describe the board' record per image"},
    )
    vision_steps: int = field(
        default=300, metadata={"help": "digits: stage 0 steps of the shared vision encoder (0 = none)"}
    )
    steps: int = field(default=3000, metadata={"help": "SFT optimizer steps for the teacher base"})
    student_steps: int = field(
        default=3000, metadata={"help": "SFT optimizer steps for the student base (0 = same as --steps)"}
    )
    batch_size: int = field(default=32, metadata={"help": "SFT batch size"})
    lr: float = field(default=1e-3, metadata={"help": "peak SFT learning rate (from-scratch tiny models)"})
    min_lr: float = field(default=1e-5, metadata={"help": "final SFT learning rate"})
    warmup_steps: int = field(default=30, metadata={"help": "SFT warm-up steps"})
    eval_every: int = field(
        default=250, metadata={"help": "steps between learning-curve points of the bases"}
    )
    distill: int = field(
        default=0,
        metadata={
            "help": "digits: distillation set of this many images new to the student (0 = its own set)"
        },
    )
    answers: str = field(
        default="exact",
        metadata={"help": "digits: the new distillation set's answers: exact | free | working"},
    )
    noise: float = field(
        default=0.0, metadata={"help": "digits: fraction of the new distillation set's answers made wrong"}
    )
    labels: str = field(
        default="data",
        metadata={
            "help": "answers steps 1-3 train on: data (the set's own) | teacher (the teacher base's greedy ones)"
        },
    )

    def __post_init__(self):
        if self.task not in ("digits", "grid"):
            raise ValueError(f"tiny task must be 'digits' or 'grid', not {self.task!r}")
        if self.labels not in ("data", "teacher"):
            raise ValueError(f"labels must be 'data' or 'teacher', not {self.labels!r}")
        if self.task == "grid" and (self.distill or self.answers != "exact" or self.noise):
            raise ValueError("distill, answers and noise are options of the digits task")


@dataclass
class BaselinesConfig(TinySettings):
    out: str = field(default="runs/tiny", metadata={"help": "run directory"})
    student: bool = field(default=True, metadata={"help": "also train and evaluate the student base"})


def stage(marker: Path, label: str) -> bool:
    """True when the stage still has to run (its marker file is absent)."""
    if marker.exists():
        print(f"[skip] {label}: done ({marker})")
        return False
    print(f"[run ] {label}")
    return True


def base_sft_config(
    cfg: TinySettings, model: Path, data: Path, out: Path, steps: int = 0, val: Path | None = None
) -> SFTConfig:
    steps = steps or cfg.steps
    return SFTConfig(
        model=str(model),
        data=str(data),
        out=str(out),
        max_steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=0.01,
        seed=cfg.seed,
        save_every=max(50, steps // 4),
        max_length=256,
        group_by_length=False,  # the plain shuffle the tiny setting's numbers were made with
        # With a pretrained shared encoder the bases differ in their language models only.
        freeze_vision=cfg.task == "digits" and cfg.vision_steps > 0,
        eval_data=str(val) if val else "",
        eval_every=cfg.eval_every if val else 0,
        eval_limit=400,
    )


def evaluate_once(
    model: Path, data: Path, out: Path, label: str, image_root: str | None = None, score: str = "exact"
) -> dict:
    """``out/metrics.json``, computed unless a finished run left it."""
    metrics_file = out / "metrics.json"
    if stage(metrics_file, f"evaluation of {label}"):
        evaluate(
            EvalConfig(model=str(model), data=str(data), out=str(out), image_root=image_root, score=score)
        )
    return json.loads(metrics_file.read_text())


def _make_data(cfg: TinySettings, data: Path) -> None:
    if cfg.task == "digits":
        generate_digits(
            DigitsConfig(
                out=str(data), train=cfg.train, test=cfg.test, val=cfg.val, pool=cfg.pool, seed=cfg.seed,
                distill=cfg.distill, answers=cfg.answers, noise=cfg.noise,
            )
        )  # fmt: skip
    else:
        generate(
            SynthConfig(out=str(data), train=cfg.train, test=cfg.test, seed=cfg.seed, captions=cfg.captions)
        )


def _die_with_parent() -> None:
    # A base trainer orphaned by a killed parent would race the rerun's trainer for the same directory.
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def train_bases(configs: dict[str, SFTConfig], root: Path, poll_s: float = 30.0) -> None:
    """Trains the bases side by side, each in its own process on one thread, so the first run takes the
    longer base's time rather than the sum, and their training does not depend on the machine's core count
    (stage 0 and steps 1-3 run in this process, on torch's default threads).

    Each process resumes from its own checkpoints after an interruption; its output goes to
    ``ROOT/NAME_sft.log``, and a line every ``poll_s`` seconds reports each base's learning curve.
    """
    procs = {}
    for name, sft in configs.items():
        config = root / f"{name}_sft.yaml"
        config.write_text(yaml.safe_dump(dataclasses.asdict(sft), sort_keys=False))
        log = (root / f"{name}_sft.log").open("a")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "vlsi.run.cli", "sft", "--config", str(config)]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent), sft, log)  # fmt: skip
    t0 = last = time.perf_counter()
    try:
        while any(p.poll() is None for p, _, _ in procs.values()):
            time.sleep(1.0)
            if time.perf_counter() - last < poll_s:
                continue
            last = time.perf_counter()
            status = []
            for name, (p, sft, _) in procs.items():
                curve = read_curve(Path(sft.out) / "curve.jsonl")
                at = (
                    f"{curve[-1]['step']}/{sft.max_steps} steps, validation {curve[-1]['accuracy']:.3f}"
                    if curve
                    else "starting"
                )
                status.append(f"{name} {'done' if p.poll() == 0 else at}")
            print(f"[base] {last - t0:.0f} s: " + "; ".join(status), flush=True)
    finally:
        for p, _, log in procs.values():
            if p.poll() is None:
                p.terminate()
            p.wait()
            log.close()
    failed = [name for name, (p, _, _) in procs.items() if p.returncode]
    if failed:
        logs = ", ".join(str(root / f"{name}_sft.log") for name in failed)
        raise RuntimeError(f"training the {' and '.join(failed)} base failed; see {logs}")


def prepare_tiny(cfg: TinySettings, root: Path, student: bool = True) -> dict[str, Path]:
    """Synthetic data, tiny models and their SFT bases under ``root``: paths of each split and each base."""
    data, models = root / "data", root / "models"
    # Markers are written after the stage's last file, so a stage killed half-way runs again.
    if stage(data / "synth_complete", f"synthetic data ({cfg.task})"):
        _make_data(cfg, data)
        (data / "synth_complete").touch()
    if stage(models / "tiny_complete", "tiny teacher and student"):
        build_tiny(TinyConfig(out=str(models), seed=cfg.seed))
        (models / "tiny_complete").touch()
    init = {"teacher": models / "teacher", "student": models / "student"}
    paths = {split: data / f"{split}.json" for split in ("train", "test", "val", "pool", "distill")}
    if cfg.task == "digits" and cfg.vision_steps:
        vision = root / "stage0_vision"
        if stage(vision / "vision_summary.json", "stage 0: the shared vision encoder"):
            pretrain_vision(
                VisionPretrainConfig(
                    teacher=str(init["teacher"]),
                    student=str(init["student"]),
                    data=str(paths["pool"] if cfg.pool else paths["train"]),
                    out=str(vision),
                    steps=cfg.vision_steps,
                    seed=cfg.seed,
                )
            )
        init = {"teacher": vision / "teacher", "student": vision / "student"}
    # The teacher stands for a large model trained on far more data than the distillation set.
    teacher_data = paths["pool"] if cfg.task == "digits" and cfg.pool else paths["train"]
    val = paths["val"] if cfg.task == "digits" and cfg.val else None
    plan = {"teacher": (teacher_data, cfg.steps), "student": (paths["train"], cfg.student_steps or cfg.steps)}
    todo = {}
    for name in ["teacher", "student"] if student else ["teacher"]:
        trained = root / f"{name}_sft"
        if stage(trained / "export_complete.json", f"SFT of the {name} base"):
            train_data, steps = plan[name]
            todo[name] = base_sft_config(cfg, init[name], train_data, trained, steps, val)
        paths[name] = trained
    train_bases(todo, root)
    for name in todo:
        assert is_exported(paths[name])
    paths["distill"] = paths["distill"] if cfg.task == "digits" and cfg.distill else paths["train"]
    if cfg.labels == "teacher":
        labelled = root / "data" / "distill_teacher_answers.json"
        if stage(labelled, "the teacher base's answers to the distillation set"):
            relabel(str(paths["teacher"]), paths["distill"], labelled)
        paths["distill"] = labelled
    return paths


def run_baselines(cfg: BaselinesConfig) -> dict:
    root = Path(cfg.out)
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    # What benchmarks (plateau.py, regimes.py) read back: the settings these bases were trained with.
    (root / "baselines_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    paths = prepare_tiny(cfg, root, cfg.student)
    names = ["teacher", "student"] if cfg.student else ["teacher"]
    results = {
        name: evaluate_once(paths[name], paths["test"], paths[name] / "eval", f"the {name}") for name in names
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    table = results_table(results)
    (root / "report.md").write_text(table + "\n")
    print(table)
    print(f"done in {time.perf_counter() - t0:.0f} s; results in {root / 'results.json'}")
    return results


def results_table(results: dict) -> str:
    """Markdown: overall and per-skill accuracy of each model, with each skill's chance level."""
    names = list(results)
    skills = sorted({s for m in results.values() for s in m.get("per_skill", {})})
    lines = [
        "| skill | chance | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for skill in skills:
        chance = next(
            m["per_skill"][skill]["chance"] for m in results.values() if skill in m.get("per_skill", {})
        )
        cells = [f"{results[n]['per_skill'].get(skill, {}).get('accuracy', float('nan')):.3f}" for n in names]
        lines.append(f"| {skill} | {chance:.3f} | " + " | ".join(cells) + " |")
    lines.append("| **all** | | " + " | ".join(f"**{results[n]['accuracy']:.3f}**" for n in names) + " |")
    return "\n".join(lines)
