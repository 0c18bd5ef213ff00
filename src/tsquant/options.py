"""Options as dataclass fields: a default, a help text, and choices checked from the type.

Every config class of the library and the pipeline declares its options with :func:`option`;
a field typed ``Literal[...]`` has its choices checked by :func:`check_choices` (in Python) and
by the YAML loader (in configs), from the one declaration.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import field, fields


def option(default, help: str, **kwargs):
    """A dataclass field with a default and the help text `tsquant --help` lists."""
    if isinstance(default, list | dict):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs
        )
    return field(default=default, metadata={"help": help}, **kwargs)


@functools.cache
def type_hints(cls) -> dict:
    """The resolved annotations of a dataclass (its module's names, postponed annotations)."""
    return typing.get_type_hints(cls)


def union_members(hint) -> tuple:
    """(int, str) for ``int | str``; (hint,) for a plain type."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_args(hint))
    return (hint,)


def literal_choices(hint) -> tuple | None:
    """The allowed values of ``Literal[...]`` (or ``Literal[...] | None``); None otherwise."""
    for member in union_members(hint):
        if typing.get_origin(member) is typing.Literal:
            return typing.get_args(member)
    return None


def check_choices(config) -> None:
    """ValueError naming the field and its choices for a ``Literal`` field holding another value."""
    hints = type_hints(type(config))
    for f in fields(config):
        choices = literal_choices(hints[f.name])
        value = getattr(config, f.name)
        if choices is None or value in choices:
            continue
        if value is None and type(None) in union_members(hints[f.name]):
            continue
        listed = ", ".join(str(c) for c in choices)
        raise ValueError(f"{f.name} must be one of {listed}, got {value!r}")
