"""``vlsi distill``: VLsI steps 1 -> 2 -> 3 from one config, with evaluation and the controls.

Step 1 trains verbalizers on the teacher and on the student (each backbone frozen); step 2 (interaction)
trains the student's verbalized layers toward matched teacher layers; step 3 fine-tunes the result with
the ordinary next-token loss and exports it as a plain checkpoint (``DIR/step3_sft``).

With ``controls`` on (the built-in tiny setting's default) the same student base is also trained two other
ways, each with the same number of student updates as VLsI's steps 2 + 3:

- ``sft_control``: step-3 SFT only (the paper's control);
- ``final_layer_kd``: step 2 with ``il=none, ll=kld`` (KD on the output logits only, what standard KD
  frameworks do), then the same step 3. [design] It differs from VLsI only in the verbalized
  intermediate layers, which is the contribution the control isolates.

Every stage writes its outputs and then a marker file, so a rerun skips finished stages and the
unfinished one resumes from its own checkpoints. With no teacher given the built-in tiny setting runs:
synthetic data, tiny teacher and student bases trained by SFT (:mod:`vlsi.run.pipeline`), then all of the
above. ``results.json`` and ``report.md`` hold the accuracy of each model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from vlsi.data.processing import ImageSize
from vlsi.model.backbone import parse_layers
from vlsi.model.export import is_exported
from vlsi.model.loading import check_pair, head_width
from vlsi.run.evaluate import SCORES
from vlsi.run.figures import plot_curves, plot_skills, read_curve
from vlsi.run.pipeline import TinySettings, evaluate_once, prepare_tiny, results_table, stage
from vlsi.train.interact import InteractConfig, InteractSettings, train_interaction
from vlsi.train.runtime import ADDED_WAS, BOOKKEEPING
from vlsi.train.sft import SFTConfig, SFTSettings, train_sft
from vlsi.train.teacher_cache import INDEX_FILE, is_complete
from vlsi.train.teacher_cache_build import TeacherCacheConfig, build_teacher_cache
from vlsi.train.verbalize import VerbalizeConfig, VerbalizeSettings, train_verbalizers

# results.json keys, in table order, with the label each gets in report.md.
MODELS = {
    "teacher": "teacher",
    "student_base": "student base",
    "sft_control": "student base + SFT only (same updates as steps 2+3)",
    "final_layer_kd": "student base + final-layer KD (il=none, ll=kld) + step 3",
    "vlsi_step2": "VLsI student after step 2 (interaction) only",
    "vlsi": "VLsI student",
}


@dataclass
class DistillConfig(ImageSize):
    """One run; ``min_pixels`` / ``max_pixels`` (the image bounds, :class:`vlsi.data.processing.ImageSize`) apply to
    every step, so teacher and student read images alike and every export carries them."""

    out: str = field(default="runs/distill", metadata={"help": "run directory"})
    teacher: str = field(
        default="", metadata={"help": "teacher checkpoint path or hub id; empty = the built-in tiny setting"}
    )
    student: str = field(default="", metadata={"help": "student checkpoint path or hub id"})
    train_data: str = field(default="", metadata={"help": "LLaVA-format JSON/JSONL training file"})
    test_data: str = field(
        default="", metadata={"help": "LLaVA-format file every model is evaluated on (empty = no evaluation)"}
    )
    step3_data: str = field(
        default="",
        metadata={
            "help": "step 3's file, for VLsI and the final-layer-KD control (empty = train_data), e.g. the "
            "teacher's own answers where train_data's are missing or wrong; the SFT control keeps train_data"
        },
    )
    val_data: str = field(
        default="",
        metadata={
            "help": "validation file every model is also evaluated on, for choosing settings (results_val.json)"
        },
    )
    score: str = field(
        default="exact",
        metadata={"help": "evaluation scoring: exact (normalised match) | number (last number)"},
    )
    image_root: str | None = field(
        default=None, metadata={"help": "image folder (default: each data file's); replaces the steps' own"}
    )
    teacher_layers: str = field(
        default="", metadata={"help": "teacher target layers, e.g. '2,6,10' (empty = verbalize-train's rule)"}
    )
    student_layers: str = field(default="", metadata={"help": "student target layers (empty = the rule)"})
    seed: int = field(
        default=0, metadata={"help": "seed of every step and of the tiny setting (replaces the steps' own)"}
    )
    controls: bool = field(
        default=False, metadata={"help": "also train the SFT-only and final-layer-KD controls"}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "prompts generated together in evaluation"})
    verbalize: VerbalizeSettings = field(default_factory=VerbalizeSettings)
    interact: InteractSettings = field(default_factory=InteractSettings)
    sft: SFTSettings = field(default_factory=SFTSettings)
    tiny: TinySettings = field(default_factory=TinySettings)


# The built-in tiny setting (`vlsi distill` with no --config): sized so the whole run, bases and controls
# included, fits in 25 min on a quiet 2-core CPU, 6 once the bases exist (docs/tiny_setting.md). The bases'
# budgets are TinySettings' own defaults (3,000 steps each: their plateaus). Flags still override any of it.
TINY_PRESET: dict = {
    "out": "runs/distill",
    "controls": True,
    # Scored on the number, so regimes whose answers are phrased or worked (benchmarks/regimes.py) compare.
    "score": "number",
    # Batches in the plain shuffle, not grouped by length (the steps' default): the setting's numbers, in
    # docs and tests, were made so.
    "verbalize": {
        "max_steps": 150,
        "batch_size": 32,
        "lr": 1e-3,
        "min_lr": 1e-5,
        "max_length": 256,
        "group_by_length": False,
    },
    "interact": {
        "group_by_length": False,
        "max_steps": 150,
        "batch_size": 32,
        "lr": 2e-4,
        "min_lr": 2e-6,
        "warmup_steps": 10,
        "max_length": 256,
        "save_every": 50,
    },
    "sft": {
        "group_by_length": False,
        "max_steps": 150,
        "batch_size": 32,
        "lr": 2e-4,
        "min_lr": 2e-6,
        "warmup_steps": 10,
        "weight_decay": 0.01,
        "max_length": 256,
        "save_every": 50,
    },
}


def control_budget(interact: InteractSettings, sft: SFTSettings) -> dict:
    """The SFT control's length: as many student updates as steps 2 and 3 together."""
    if interact.max_steps and sft.max_steps:
        return {"max_steps": interact.max_steps + sft.max_steps}
    if not interact.max_steps and not sft.max_steps:
        return {"max_steps": 0, "epochs": interact.epochs + sft.epochs}
    raise ValueError(
        "set max_steps on both interact and sft, or on neither, so the SFT control can match their budget"
    )


def release_memory() -> None:
    """Called after every stage, so that none of its models reaches the next.

    A stage's models are unreachable once it returns, but they sit in reference cycles (module hooks and their
    closures, back-references from accelerate and peft) that only Python's cyclic collector frees, and that runs
    on object counts, not bytes: step 1's 72B teacher could still hold its memory while step 2 loads it again.
    CUDA's caching allocator then keeps the freed blocks reserved by this process; they are handed back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _with(settings, **values) -> dict:
    """A step's settings as keyword arguments, with the run-level values on top."""
    return dict(dataclasses.asdict(settings), **values)


class Distiller:
    """Runs the stages of one ``vlsi distill`` directory, each skipped when its marker exists."""

    def __init__(self, cfg: DistillConfig, teacher: str, student: str, train: str):
        self.cfg, self.root = cfg, Path(cfg.out)
        self.teacher, self.student, self.train = teacher, student, train
        self.common = {"seed": cfg.seed, "image_root": cfg.image_root, **self.pixels}

    @property
    def pixels(self) -> dict:
        return {"min_pixels": self.cfg.min_pixels, "max_pixels": self.cfg.max_pixels}

    def verbalizers(self, model: str, layers: str, name: str) -> Path:
        out = self.root / f"step1_{name}_verbalizers"
        # train_summary.json is written after the verbalizers and their metrics.
        if stage(out / "train_summary.json", f"step 1: verbalizers of the {name}"):
            settings = _with(self.cfg.verbalize, **self.common)
            train_verbalizers(
                VerbalizeConfig(**settings, model=model, data=self.train, out=str(out), layers=layers)
            )
            release_memory()
        return out

    def teacher_cache(self, tv: Path) -> None:
        """Step 2's cached teacher (``interact: {teacher_cache: DIR}``), built once after step 1, over the
        vocabulary the pair shares: step 2 compares on it, and a cache over the teacher's padded head
        (152,064 rows for a 151,936-row student) would be refused there, after the whole teacher pass."""
        settings, path = self.cfg.interact, self.cfg.interact.teacher_cache
        if not path or is_complete(path):
            return
        print(f"[run ] teacher cache in {path}")
        build_teacher_cache(
            TeacherCacheConfig(
                teacher=self.teacher, teacher_verbalizers=str(tv), data=self.train, out=path, student=self.student,
                max_length=settings.max_length, image_root=self.cfg.image_root, precision=settings.precision,
                kd_temperature=settings.kd_temperature, vocab_width=shared_width(self.teacher, self.student),
                **self.pixels,
            )
        )  # fmt: skip
        release_memory()

    def interact(self, out: Path, student: str, tv: Path, sv: Path, label: str, **overrides) -> Path:
        # train_summary.json is written after the export, so it marks a finished stage.
        if stage(out / "train_summary.json", label):
            settings = _with(self.cfg.interact, **self.common, **overrides)
            cfg = InteractConfig(
                **settings,
                teacher=self.teacher,
                teacher_verbalizers=str(tv),
                student=student,
                student_verbalizers=str(sv),
                data=self.train,
                out=str(out),
            )
            train_interaction(cfg)
            release_memory()
        return out

    def sft(self, out: Path, model: str, label: str, data: str = "", **overrides) -> Path:
        if stage(out / "train_summary.json", label):
            settings = _with(self.cfg.sft, **self.common, **overrides)
            train_sft(SFTConfig(**settings, model=model, data=data or self.train, out=str(out)))
            release_memory()
        if not is_exported(out):
            raise RuntimeError(f"{out}: marked finished but holds no complete export; remove it to retrain")
        return out

    def run(self) -> dict[str, str]:
        """Trains everything; returns the checkpoint of each model in :data:`MODELS`."""
        cfg, root = self.cfg, self.root
        tv = self.verbalizers(self.teacher, cfg.teacher_layers, "teacher")
        sv = self.verbalizers(self.student, cfg.student_layers, "student")
        self.teacher_cache(tv)
        step2 = self.interact(root / "step2_interact", self.student, tv, sv, "step 2: interaction")
        step3 = self.sft(
            root / "step3_sft", str(step2), "step 3: SFT of the interacted student", data=cfg.step3_data
        )
        models = {"teacher": self.teacher, "student_base": self.student, "vlsi_step2": step2, "vlsi": step3}
        if cfg.controls:
            budget = control_budget(cfg.interact, cfg.sft)
            models["sft_control"] = self.sft(
                root / "control_sft", self.student, "control: SFT only, same budget", **budget
            )
            kd2 = self.interact(
                root / "control_kd_step2",
                self.student,
                tv,
                sv,
                "control: final-layer KD",
                il="none",
                ll="kld",
            )
            models["final_layer_kd"] = self.sft(
                root / "control_kd", str(kd2), "control: final-layer KD + step 3", data=cfg.step3_data
            )
        return {k: str(models[k]) for k in MODELS if k in models}


# Keys a rerun may change: where the run lives, what else runs, how it is reported; not what a finished
# stage computed.
RERUN_MAY_CHANGE = ("out", "controls", "eval_batch_size")


def shared_width(teacher: str, student: str) -> int:
    """The vocabulary step 2 compares the pair on (:func:`vlsi.losses.divergences.shared_vocab`): the narrower
    head, the wider one's extra rows being padding (Qwen2-VL-72B 152,064 vs 2B 151,936)."""
    return min(head_width(teacher), head_width(student))


def check_cache_width(path: str | Path, width: int) -> None:
    """Refuses a teacher cache at ``path`` (finished or not) over another vocabulary than the pair's shared
    ``width``: step 2 would refuse a wider one only after step 1, and a narrower one compares the pair on
    fewer tokens than a live teacher would."""
    index = Path(path) / INDEX_FILE
    if not index.exists():
        return
    cached = json.loads(index.read_text()).get("fingerprint", {}).get("width")
    if cached != width:
        raise ValueError(
            f"the teacher cache {path} is over a vocabulary of {cached} tokens, but the teacher and student share "
            f"{width} (the narrower head); remove it, and the run builds it again at {width}"
        )


def check_config(cfg: DistillConfig) -> None:
    """Errors a run would otherwise meet only after hours of training."""
    cfg.interact.validate()
    if cfg.score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, not {cfg.score!r}")
    if cfg.controls:
        control_budget(cfg.interact, cfg.sft)
    if cfg.teacher_layers.strip() and cfg.student_layers.strip():
        t_l, t_s = len(parse_layers(cfg.teacher_layers)), len(parse_layers(cfg.student_layers))
        if t_s > t_l:
            raise ValueError(f"{t_s} student layers but only {t_l} teacher layers: each needs its own match")
    if cfg.teacher and cfg.student and cfg.interact.teacher_cache:
        # From the configs alone: the cache is built (or was) over the pair's shared vocabulary.
        check_cache_width(cfg.interact.teacher_cache, shared_width(cfg.teacher, cfg.student))


def _changed(old: dict, new: dict, default: dict, within: str = "") -> list[str]:
    """The settings of ``new`` that differ from the run's record ``old``, a step's own as ``step.key``.

    An option newer than the record counts as what the run did without it: the value of
    :data:`vlsi.train.runtime.ADDED_WAS` for a step's option that came with a changed default (a step's
    ``group_by_length``: off), else its default. How a step loads and reports (its bookkeeping settings,
    ``--num-workers`` among them) may change."""
    changed = []
    for key, value in new.items():
        if key in (BOOKKEEPING if within else RERUN_MAY_CHANGE):
            continue
        was = old.get(key, ADDED_WAS.get(key, default.get(key)) if within else default.get(key))
        if isinstance(value, dict) and isinstance(was, dict):
            changed += _changed(was, value, default.get(key) or {}, f"{within}{key}.")
        elif was != value:
            changed.append(within + key)
    return changed


def record_config(cfg: DistillConfig, root: Path) -> None:
    """Writes the resolved config; a rerun with other settings is refused, since its finished stages
    (skipped by their markers) would silently come from the old ones."""
    path = root / "distill_config.yaml"
    new = dataclasses.asdict(cfg)
    if path.exists():
        old = yaml.safe_load(path.read_text()) or {}
        changed = _changed(old, new, dataclasses.asdict(DistillConfig()))
        if changed:
            raise ValueError(
                f"{root} was run with other settings ({', '.join(changed)} differ from {path}); "
                "use a new --out, or remove the stages the change affects together with that file"
            )
    path.write_text(yaml.safe_dump(new, sort_keys=False))


def run_distill(cfg: DistillConfig) -> dict:
    # The chunk of the verbalized losses by this machine's device (0 = by device), recorded as resolved.
    cfg = dataclasses.replace(cfg, verbalize=cfg.verbalize.on_device(), interact=cfg.interact.on_device())
    check_config(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record_config(cfg, root)
    if cfg.teacher:
        if not (cfg.student and cfg.train_data):
            raise ValueError("a distill config with a teacher also needs 'student' and 'train_data'")
        check_pair(cfg.teacher, cfg.student)
        teacher, student, train, test = cfg.teacher, cfg.student, cfg.train_data, cfg.test_data
        val = cfg.val_data
    else:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("the built-in tiny setting runs in one process; launch it without accelerate")
        tiny = dataclasses.replace(cfg.tiny, seed=cfg.seed)
        paths = prepare_tiny(tiny, root)
        teacher, student, train, test = (str(paths[k]) for k in ("teacher", "student", "distill", "test"))
        val = cfg.val_data or (str(paths["val"]) if paths["val"].exists() else "")

    models = Distiller(cfg, teacher, student, train).run()
    results = {}
    # Evaluation is greedy generation on one device, by the main process only (under `accelerate launch`
    # every process would otherwise write the same files); a model that needs several GPUs to generate
    # (a 72B teacher) is better left out: leave test_data empty and run `vlsi eval` on what fits.
    if int(os.environ.get("RANK", "0")) == 0:
        if val:
            results_val = evaluate_all(models, val, root / "eval_val", cfg)
            (root / "results_val.json").write_text(json.dumps(results_val, indent=2))
        if test:
            results = evaluate_all(models, test, root / "eval", cfg)
            (root / "results.json").write_text(json.dumps(results, indent=2))
            (root / "report.md").write_text(report(results, root))
            print(results_table(results))
    print(f"done in {time.perf_counter() - t0:.0f} s; outputs in {root}")
    return {"models": models, "results": results}


def evaluate_all(models: dict[str, str], data: str, out: Path, cfg: DistillConfig) -> dict:
    results = {}
    for key, path in models.items():
        results[key] = evaluate_once(Path(path), Path(data), out / key, key, cfg.image_root, cfg.score)
        release_memory()
    return results


def report(results: dict, root: Path) -> str:
    """``report.md``: the accuracy table, per-skill accuracy, then the heat maps and depth plots."""
    lines = ["# VLsI distillation report", "", "| model | accuracy |", "| --- | --- |"]
    lines += [f"| {MODELS[k]} (`{k}`) | {m['accuracy']:.3f} |" for k, m in results.items()]
    lines += ["", "## Per skill", "", results_table(results), ""]
    plot_skills(results, root / "skills.png")
    lines += ["![accuracy per skill](skills.png)", ""]
    curves = {name: read_curve(root / f"{name}_sft" / "curve.jsonl") for name in ("teacher", "student")}
    if any(curves.values()):
        plot_curves({f"{k} base": v for k, v in curves.items()}, root / "curves.png")
        lines += [
            "## Learning curves of the bases (validation split)",
            "",
            "![learning curves](curves.png)",
            "",
        ]
    figures = [
        ("Step 2 matches, first 10% of steps", "step2_interact/matches_first.png"),
        ("Step 2 matches, last 10% of steps", "step2_interact/matches_last.png"),
        ("Teacher verbalizers by depth", "step1_teacher_verbalizers/verbalized_depth.png"),
        ("Student verbalizers by depth", "step1_student_verbalizers/verbalized_depth.png"),
    ]
    for title, rel in figures:
        if (root / rel).exists():
            lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    return "\n".join(lines)
