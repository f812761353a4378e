"""Step configs as dataclasses, read from command-line flags and YAML files.

Each step's config is a dataclass whose fields (their ``help`` metadata) become its flags. Values come from,
lowest to highest priority: the dataclass defaults, a YAML mapping, then the flags. Bad values raise
``ValueError`` naming the option, so library callers (``vlsi plan`` reading a recipe) get an exception to
handle; the command line (:mod:`vlsi.run.cli`) turns it into an error message and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

__all__ = ["add_dataclass_arguments", "build_config", "flag", "read_config_file"]


def flag(name: str) -> str:
    """The command-line spelling of a field: ``max_steps`` -> ``--max-steps``."""
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
                flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(
                flag(name),
                dest=name,
                type=tp,
                default=None,
                help=help_text + (" (required)" if required else ""),
            )


def _coerce(value, tp, name: str):
    """YAML reads some values as another type than the option's (PyYAML: `1e-4` is a string)."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config: '{name}' must be true or false, got {value!r}")
        return value
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise ValueError(f"config: '{name}' must be a {tp.__name__}, got {value!r}") from None


def build_config(cls, args: argparse.Namespace, file_values: dict | None = None, prefix: str = ""):
    """Config from (lowest to highest priority) dataclass defaults, the YAML file, then flags.

    ``args`` may be any object: an attribute it lacks counts as a flag not given.
    """
    hints = typing.get_type_hints(cls)
    file_values = file_values or {}
    unknown = set(file_values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)} for {cls.__name__}")
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
            raise ValueError(f"missing required option {flag(name)} (or '{f.name}' in --config)")
    return cls(**kwargs)


def read_config_file(path: str | Path) -> dict:
    """A ``--config`` YAML file as a dict of option names to values."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return values
