"""The ``vlsi`` command line: one subcommand per step, each a view of its config dataclass.

Flags are generated from the dataclass fields (their ``help`` metadata is the ``--help`` text);
``--config FILE.yaml`` supplies values first and flags override them (:mod:`vlsi.run.config`). A bad value
is a ``ValueError`` there, printed here as an error with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from vlsi.run.config import add_dataclass_arguments, build_config, read_config_file


def _cmd_synth(cfg):
    from vlsi.data.synth import generate

    summary = generate(cfg)
    print(json.dumps(summary, indent=2))


def _cmd_digits(cfg):
    from vlsi.data.digits import generate

    print(json.dumps(generate(cfg), indent=2))


def _cmd_tiny(cfg):
    from transformers import AutoModelForImageTextToText

    from vlsi.model.tiny import count_parameters
    from vlsi.model.tiny_models import build_tiny

    for name, path in build_tiny(cfg).items():
        model = AutoModelForImageTextToText.from_pretrained(path)
        print(
            f"{name}: {path}  ({count_parameters(model):,} parameters, {model.config.text_config.num_hidden_layers} layers)"
        )


def _cmd_sft(cfg):
    from vlsi.train.sft import train_sft

    summary = train_sft(cfg)
    print(json.dumps(summary, indent=2))


def _cmd_eval(cfg):
    from vlsi.run.evaluate import evaluate

    metrics = evaluate(cfg)
    print(format_metrics(metrics))


def _cmd_baselines(cfg):
    from vlsi.run.pipeline import run_baselines

    results = run_baselines(cfg)
    print(json.dumps({k: v["accuracy"] for k, v in results.items()}, indent=2))


def _cmd_verbalize_train(cfg):
    from vlsi.train.verbalize import train_verbalizers

    summary = train_verbalizers(cfg)
    print(json.dumps(summary["held_out"], indent=2))


def _cmd_verbalize(cfg):
    from vlsi.train.verbalize import format_verbalized, verbalize

    lines = verbalize(
        cfg.model, cfg.verbalizers, cfg.image, cfg.question, cfg.max_new_tokens, max_length=cfg.max_length
    )
    if cfg.json:
        print(json.dumps([{"label": label, "text": text} for label, text in lines], indent=2))
    else:
        print(format_verbalized(lines))


def _cmd_interact(cfg):
    from vlsi.train.interact import train_interaction

    summary = train_interaction(cfg)
    print(json.dumps(summary, indent=2))


def _cmd_teacher_cache(cfg):
    from vlsi.train.teacher_cache_build import build_teacher_cache

    print(json.dumps(build_teacher_cache(cfg), indent=2))


def _cmd_distill(cfg):
    from vlsi.run.distill import run_distill

    outcome = run_distill(cfg)
    print(
        json.dumps({k: v["accuracy"] for k, v in outcome["results"].items()} or outcome["models"], indent=2)
    )


def _default_values(command: str, args: argparse.Namespace) -> dict | None:
    """What a command reads when no --config is given: `distill` with no teacher runs the built-in tiny
    setting (a run on given models gets the steps' own defaults, never the tiny setting's budgets)."""
    if command == "distill" and not args.teacher:
        from vlsi.run.distill import TINY_PRESET

        return TINY_PRESET
    return None


def format_metrics(metrics: dict) -> str:
    lines = [
        f"accuracy {metrics['accuracy']:.4f} on {metrics['n']} records (skipped {metrics.get('skipped', 0)})"
    ]
    for skill, m in metrics.get("per_skill", {}).items():
        lines.append(f"  {skill:<12} {m['accuracy']:.4f}  (n={m['n']}, chance {m['chance']:.3f})")
    return "\n".join(lines)


def _commands() -> dict[str, tuple[type, Callable, str]]:
    from vlsi.data.digits import DigitsConfig
    from vlsi.data.synth import SynthConfig
    from vlsi.model.tiny import TinyConfig
    from vlsi.run.distill import DistillConfig
    from vlsi.run.evaluate import EvalConfig
    from vlsi.run.pipeline import BaselinesConfig
    from vlsi.run.plan import PlanConfig, run_plan
    from vlsi.train.interact import InteractConfig
    from vlsi.train.sft import SFTConfig
    from vlsi.train.teacher_cache_build import TeacherCacheConfig
    from vlsi.train.verbalize import InspectConfig, VerbalizeConfig

    return {
        "digits": (DigitsConfig, _cmd_digits, "write the built-in digits task (the tiny setting's data)"),
        "synth": (SynthConfig, _cmd_synth, "write the earlier grid task (positions, colours, shapes)"),
        "tiny": (TinyConfig, _cmd_tiny, "build the tiny random-weight teacher and student"),
        "sft": (SFTConfig, _cmd_sft, "supervised fine-tuning (VLsI step 3)"),
        "eval": (EvalConfig, _cmd_eval, "greedy-generation accuracy on a LLaVA-format file"),
        "baselines": (
            BaselinesConfig,
            _cmd_baselines,
            "tiny setting: synth, tiny, SFT teacher+student, eval",
        ),
        "verbalize-train": (VerbalizeConfig, _cmd_verbalize_train, "train the verbalizers (VLsI step 1)"),
        "interact": (
            InteractConfig,
            _cmd_interact,
            "distil matched teacher layers into the student's verbalized layers (VLsI step 2)",
        ),
        "teacher-cache": (
            TeacherCacheConfig,
            _cmd_teacher_cache,
            "run the teacher once and store its verbalized top-k distributions for 'interact --teacher-cache'",
        ),
        "distill": (
            DistillConfig,
            _cmd_distill,
            "VLsI steps 1-3 from one YAML config; without --config, the built-in tiny setting with controls",
        ),
        "plan": (
            PlanConfig,
            run_plan,
            "target layers, parameter counts and per-GPU memory of a distill recipe, from model configs only",
        ),
        "verbalize": (
            InspectConfig,
            _cmd_verbalize,
            "what each verbalized layer says about an image, then the model's answer",
        ),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    commands = _commands()
    parser = argparse.ArgumentParser(prog="vlsi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=None, help="YAML file with values for these options")
        add_dataclass_arguments(p, cls)
    args = parser.parse_args(argv)
    cls, run, _ = commands[args.command]
    try:
        file_values = read_config_file(args.config) if args.config else _default_values(args.command, args)
        cfg = build_config(cls, args, file_values)
        run(cfg)
    except (ValueError, OSError, FloatingPointError) as e:
        # Errors that name a bad input (or, FloatingPointError, the step and records where a run went
        # non-finite) are for the user, not a traceback (VLSI_DEBUG=1 shows it).
        if os.environ.get("VLSI_DEBUG"):
            raise
        print(f"vlsi {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
