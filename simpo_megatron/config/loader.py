"""A run's settings from the command line and a YAML file.

Every field of every section is a flag (``--hidden-size``); ``--config FILE.yaml`` sets the
same keys, flat or under a section's name, and flags given on the command line override it.
``--help`` lists the flags by section.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from simpo_megatron.config.sections import SECTIONS, ConfigError, SimPOConfig, field_choices, flag, section_of


@functools.cache
def _fields() -> dict[str, tuple[dataclasses.Field, type, bool]]:
    """Every setting: (its field, its scalar type, whether it is a list)."""
    out = {}
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            origin = typing.get_origin(tp)
            if origin is list:
                out[f.name] = (f, typing.get_args(tp)[0], True)
            elif origin in (typing.Union, types.UnionType):
                out[f.name] = (f, next(a for a in typing.get_args(tp) if a is not type(None)), False)
            else:
                out[f.name] = (f, tp, False)
    return out


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting, grouped by section; defaults left out (SUPPRESS)."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--config FILE.yaml] [FLAG ...]",
        description="SimPO preference optimization on Megatron-Core.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of settings; command-line flags override it.")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip())
        for f in dataclasses.fields(cls):
            _, scalar, is_list = _fields()[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata["help"]
            if "(default:" not in help_text:  # some say what an unset value means instead
                help_text += f" (default: {default})"
            if scalar is bool:
                # Megatron-LM's negative switches (--no-load-optim) are plain store_true flags.
                action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
                group.add_argument(flag(f.name), action=action, help=help_text)
                continue
            choices = field_choices(f)
            if choices is not None:
                choices = [c for c in choices if c is not None]
            group.add_argument(
                flag(f.name), type=scalar, nargs="+" if is_list else None, choices=choices, help=help_text
            )
    return parser


def load_config(argv: Sequence[str] | None = None) -> SimPOConfig:
    """Defaults, then the YAML file of --config, then the command-line flags (not validated)."""
    given = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = given.pop("config", None)
    if config_file:
        values.update(read_yaml(config_file))
    values.update(given)
    return SimPOConfig.from_flat(values)


def read_yaml(path: str) -> dict[str, Any]:
    """Flat settings from a YAML mapping: keys may use dashes or underscores, and may sit under
    their section's name (``model: {hidden_size: 4096}``); unknown keys are errors."""
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    items: list[tuple[str, Any]] = []
    for key, value in raw.items():
        if str(key) in SECTIONS and isinstance(value, dict):
            items.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            items.append((str(key), value))
    known = _fields()
    values = {}
    for key, value in items:
        section, _, short = key.rpartition(".")
        name = short.replace("-", "_")
        if name not in known or (section and section_of()[name] != section):
            raise ConfigError(f"{path}: unknown setting {key!r}")
        _, scalar, is_list = known[name]
        if is_list:
            value = [str(v) for v in (value if isinstance(value, list) else str(value).split())]
        elif value is not None and scalar is float:
            value = float(value)
        values[name] = value
    return values
