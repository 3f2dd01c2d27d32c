"""Command-line options from a settings dataclass, for the argparse verbs beside LightningCLI (`prepare`,
`make-pairs`): one `--kebab-case` option per field, typed from the annotation, defaulting to the field's
default, documented by the field's docstring (the same text `--help` of the LightningCLI shows for stage
configs), so a new setting is one field and never a second list of flags."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def field_docs(cls) -> dict[str, str]:
    """{field: docstring} of a dataclass, including the fields it inherits."""
    from docstring_parser import parse_from_object

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({p.arg_name: (p.description or "").strip() for p in parse_from_object(klass).params})
    return docs


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in TRUE + FALSE:
        raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
    return value in TRUE


def _scalar(annotation) -> type:
    """`int | None` -> int; the type argparse converts the text to."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar(args[0]) if len(args) == 1 else str
    return annotation if annotation in (int, float, str, bool) else str


def _comma_separated(item: type):
    """`tuple[int, ...]` fields: "16,32,64" -> (16, 32, 64)."""
    def parse(text: str) -> tuple:
        try:
            return tuple(item(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got '{text}'") from None
    return parse


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass `cls` (except `skip`); a tuple field takes comma-separated values."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        if typing.get_origin(hints[field.name]) is tuple:
            item = _scalar(typing.get_args(hints[field.name])[0])
            default = field.default
            parser.add_argument("--" + field.name.replace("_", "-"), type=_comma_separated(item), default=default,
                                help=(docs.get(field.name, "") + f" (comma-separated; default: {','.join(map(str, default))})")
                                .replace("%", "%%").strip())
            continue
        kind = _scalar(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else field.default
        text = docs.get(field.name, "") + ("" if required else f" (default: {default})")
        parser.add_argument("--" + field.name.replace("_", "-"), type=parse_bool if kind is bool else kind, default=default,
                            required=required, help=text.replace("%", "%%").strip())


def from_options(cls, args: argparse.Namespace, **given: Any):
    """The dataclass `cls` from parsed options (fields not in `args` keep their defaults; `given` wins)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})
