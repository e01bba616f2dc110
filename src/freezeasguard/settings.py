"""Each setting is defined once, as a dataclass field with its help text; the command-line flags
(and the experiment config's keys, which are field names) are generated from the dataclasses.

Names: a ``*Config`` holds everything one run of a command takes (LearnConfig, FinetuneConfig,
ExperimentConfig, ServiceConfig); a ``*Settings`` is a group of settings that configs share
(RunSettings, MaskLearningSettings, ProtectSettings, LoraSettings).

    @dataclass
    class FinetuneConfig:
        lr: float = setting(1e-5, "AdamW learning rate")

    add_flags(parser, FinetuneConfig)          # --lr FLOAT  AdamW learning rate (default 1e-05)
    cfg = from_args(FinetuneConfig, args)
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, field, fields


def setting(default, help: str, *, flag: str | None = None, choices=None, cli: bool = True):
    """A dataclass field with what its flag needs. ``flag`` overrides the generated name
    (``--`` + the field name with dashes); ``cli=False`` keeps it out of the command line."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def add_flags(parser, cls, exclude=(), defaults: dict | None = None) -> None:
    """One flag per field of ``cls`` (except ``exclude`` and fields marked cli=False). ``defaults``
    replaces a field's default on this command line (a command whose users want other values)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True) or "help" not in f.metadata:
            continue
        default = (defaults or {}).get(f.name, _default(f))
        hint = hints[f.name]
        args = typing.get_args(hint)
        inner = next((a for a in args if a is not type(None)), hint) if args else hint
        help_text = f.metadata["help"]
        if hint is bool:
            if default:
                parser.add_argument("--no-" + flag_name(f)[2:], dest=f.name, action="store_false",
                                    help=f"{help_text} (on by default; this turns it off)")
            else:
                parser.add_argument(flag_name(f), dest=f.name, action="store_true", help=help_text)
            continue
        if typing.get_origin(hint) in (tuple, list):
            parser.add_argument(flag_name(f), dest=f.name, action="append", default=list(default or []),
                                type=args[0], help=f"{help_text} (repeatable)")
            continue
        kind = inner if inner in (int, float, str) else str
        shown = "none" if default is None else default
        parser.add_argument(flag_name(f), dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"),
                            metavar=None if f.metadata.get("choices") else kind.__name__.upper(),
                            help=f"{help_text} (default {shown})")


def from_args(cls, args: argparse.Namespace, **fixed):
    """An instance of ``cls`` from parsed flags (those add_flags made) plus ``fixed`` values."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if typing.get_origin(hints[f.name]) is tuple else v
    return cls(**values)


def copy_fields(cls, source, **fixed):
    """An instance of ``cls`` taking every field it shares with ``source`` (a settings object)."""
    values = {f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)}
    return cls(**{**values, **fixed})
