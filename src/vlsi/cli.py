"""The ``vlsi`` command line: one subcommand per step, each a view of its config dataclass.

Flags are generated from the dataclass fields (their ``help`` metadata is the ``--help`` text);
``--config FILE.yaml`` supplies values first and flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import yaml


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    """int | None -> int; leaves plain types alone."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    # Required options first in --help: a step's config lists its shared training knobs before them.
    fields = sorted(dataclasses.fields(cls), key=lambda f: not _is_required(f))
    for f in fields:
        tp = _base_type(hints[f.name])
        name = prefix + f.name
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, prefix=name + "_")
            continue
        help_text = f.metadata.get("help", "")
        required = (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and not prefix
        )
        if f.metadata.get("positional"):  # e.g. `vlsi plan RECIPE`
            parser.add_argument(name, type=tp, nargs=None if required else "?", default=None, help=help_text)
            continue
        if tp is bool:
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(
                _flag(name),
                dest=name,
                type=tp,
                default=None,
                help=help_text + (" (required)" if required else ""),
            )


def _coerce(value, tp, name: str):
    """YAML reads some values as another type than the option's (PyYAML: `1e-4` is a string)."""
    if tp is bool:
        if not isinstance(value, bool):
            raise SystemExit(f"config: '{name}' must be true or false, got {value!r}")
        return value
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise SystemExit(f"config: '{name}' must be a {tp.__name__}, got {value!r}") from None


def build_config(cls, args: argparse.Namespace, file_values: dict | None = None, prefix: str = ""):
    """Config from (lowest to highest priority) dataclass defaults, the YAML file, then flags."""
    hints = typing.get_type_hints(cls)
    file_values = file_values or {}
    unknown = set(file_values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise SystemExit(f"config: unknown keys {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        name = prefix + f.name
        if dataclasses.is_dataclass(tp):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            nested_file = dict(dataclasses.asdict(default)) if default else {}
            nested_file.update(file_values.get(f.name) or {})
            kwargs[f.name] = build_config(tp, args, nested_file, prefix=name + "_")
            continue
        value = getattr(args, name, None)
        if value is None and file_values.get(f.name) is not None:
            value = _coerce(file_values[f.name], tp, f.name)
        if value is not None:
            kwargs[f.name] = value
        elif _is_required(f):
            raise SystemExit(f"missing required option {_flag(name)} (or '{f.name}' in --config)")
    return cls(**kwargs)


def _cmd_synth(cfg):
    from vlsi.synth import generate

    summary = generate(cfg)
    print(json.dumps(summary, indent=2))


def _cmd_tiny(cfg):
    from transformers import AutoModelForImageTextToText

    from vlsi.tiny import build_tiny, count_parameters

    for name, path in build_tiny(cfg).items():
        model = AutoModelForImageTextToText.from_pretrained(path)
        print(
            f"{name}: {path}  ({count_parameters(model):,} parameters, {model.config.text_config.num_hidden_layers} layers)"
        )


def _cmd_sft(cfg):
    from vlsi.sft import train_sft

    summary = train_sft(cfg)
    print(json.dumps(summary, indent=2))


def _cmd_eval(cfg):
    from vlsi.evaluate import evaluate

    metrics = evaluate(cfg)
    print(format_metrics(metrics))


def _cmd_baselines(cfg):
    from vlsi.pipeline import run_baselines

    results = run_baselines(cfg)
    print(json.dumps({k: v["accuracy"] for k, v in results.items()}, indent=2))


def _cmd_verbalize_train(cfg):
    from vlsi.verbalize import train_verbalizers

    summary = train_verbalizers(cfg)
    print(json.dumps(summary["held_out"], indent=2))


def _cmd_verbalize(cfg):
    from vlsi.verbalize import format_verbalized, verbalize

    lines = verbalize(
        cfg.model, cfg.verbalizers, cfg.image, cfg.question, cfg.max_new_tokens, max_length=cfg.max_length
    )
    if cfg.json:
        print(json.dumps([{"label": label, "text": text} for label, text in lines], indent=2))
    else:
        print(format_verbalized(lines))


def _cmd_interact(cfg):
    from vlsi.interact import train_interaction

    summary = train_interaction(cfg)
    print(json.dumps(summary, indent=2))


def _cmd_teacher_cache(cfg):
    from vlsi.teacher_cache_build import build_teacher_cache

    print(json.dumps(build_teacher_cache(cfg), indent=2))


def _cmd_distill(cfg):
    from vlsi.distill import run_distill

    outcome = run_distill(cfg)
    print(
        json.dumps({k: v["accuracy"] for k, v in outcome["results"].items()} or outcome["models"], indent=2)
    )


def _read_config(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return values


def _default_values(command: str, args: argparse.Namespace) -> dict | None:
    """What a command reads when no --config is given: `distill` with no teacher runs the built-in tiny
    setting (a run on given models gets the steps' own defaults, never the tiny setting's budgets)."""
    if command == "distill" and not args.teacher:
        from vlsi.distill import TINY_PRESET

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
    from vlsi.distill import DistillConfig
    from vlsi.evaluate import EvalConfig
    from vlsi.interact import InteractConfig
    from vlsi.pipeline import BaselinesConfig
    from vlsi.plan import PlanConfig, run_plan
    from vlsi.sft import SFTConfig
    from vlsi.synth import SynthConfig
    from vlsi.teacher_cache_build import TeacherCacheConfig
    from vlsi.tiny import TinyConfig
    from vlsi.verbalize import InspectConfig, VerbalizeConfig

    return {
        "synth": (SynthConfig, _cmd_synth, "write the synthetic visual-question dataset"),
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
        file_values = _read_config(args.config) if args.config else _default_values(args.command, args)
        cfg = build_config(cls, args, file_values)
        run(cfg)
    except (ValueError, OSError) as e:
        # Errors that name a bad input are for the user, not a traceback (VLSI_DEBUG=1 shows it).
        if os.environ.get("VLSI_DEBUG"):
            raise
        print(f"vlsi {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
