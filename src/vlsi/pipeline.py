"""The built-in tiny setting, end to end: data, models, base training, evaluation.

Every stage writes its outputs and then a marker, so a rerun skips finished stages and picks an
interrupted one back up (SFT resumes from its own checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlsi.evaluate import EvalConfig, evaluate
from vlsi.export import is_exported
from vlsi.sft import SFTConfig, train_sft
from vlsi.synth import SynthConfig, generate
from vlsi.tiny import TinyConfig, build_tiny


@dataclass
class TinySettings:
    """The built-in tiny setting's data and base models; ``vlsi distill`` runs it when no models are given."""

    seed: int = field(default=0, metadata={"help": "seed of data, weights and training"})
    train: int = field(default=6000, metadata={"help": "synthetic train questions"})
    test: int = field(default=500, metadata={"help": "synthetic test records"})
    captions: bool = field(
        default=False,
        metadata={"help": "add a train-only 'describe the board' record per image (see the README's trials)"},
    )
    steps: int = field(default=1000, metadata={"help": "SFT optimizer steps for the teacher base"})
    student_steps: int = field(
        default=0, metadata={"help": "SFT optimizer steps for the student base (0 = same as --steps)"}
    )
    batch_size: int = field(default=32, metadata={"help": "SFT batch size"})
    lr: float = field(default=5e-4, metadata={"help": "peak SFT learning rate (from-scratch tiny models)"})
    min_lr: float = field(default=5e-6, metadata={"help": "final SFT learning rate"})
    warmup_steps: int = field(default=30, metadata={"help": "SFT warm-up steps"})


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


def base_sft_config(cfg: TinySettings, model: Path, data: Path, out: Path, steps: int = 0) -> SFTConfig:
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
    )


def evaluate_once(model: Path, data: Path, out: Path, label: str, image_root: str | None = None) -> dict:
    """``out/metrics.json``, computed unless a finished run left it."""
    metrics_file = out / "metrics.json"
    if stage(metrics_file, f"evaluation of {label}"):
        evaluate(EvalConfig(model=str(model), data=str(data), out=str(out), image_root=image_root))
    return json.loads(metrics_file.read_text())


def prepare_tiny(cfg: TinySettings, root: Path, student: bool = True) -> dict[str, Path]:
    """Synthetic data, tiny models and their SFT bases under ``root``: paths of train, test and each base."""
    data, models = root / "data", root / "models"
    # Markers are written after the stage's last file, so a stage killed half-way runs again.
    if stage(data / "synth_complete", "synthetic data"):
        generate(
            SynthConfig(out=str(data), train=cfg.train, test=cfg.test, seed=cfg.seed, captions=cfg.captions)
        )
        (data / "synth_complete").touch()
    if stage(models / "tiny_complete", "tiny teacher and student"):
        build_tiny(TinyConfig(out=str(models), seed=cfg.seed))
        (models / "tiny_complete").touch()
    paths = {"train": data / "train.json", "test": data / "test.json"}
    steps = {"teacher": cfg.steps, "student": cfg.student_steps or cfg.steps}
    for name in ["teacher", "student"] if student else ["teacher"]:
        trained = root / f"{name}_sft"
        if stage(trained / "export_complete.json", f"SFT of the {name} base"):
            train_sft(base_sft_config(cfg, models / name, paths["train"], trained, steps[name]))
        assert is_exported(trained)
        paths[name] = trained
    return paths


def run_baselines(cfg: BaselinesConfig) -> dict:
    root = Path(cfg.out)
    t0 = time.perf_counter()
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
