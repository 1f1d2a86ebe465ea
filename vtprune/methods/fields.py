"""Declarative validation of a method's fields: each dataclass field is checked against its type hint (bool is
not an int, an int is a number, a list is a tuple, a Literal lists the valid strings) and against the range
declared next to it with `bounded(...)`. `Method.__post_init__` calls `check_fields` once, so a wrong value
raises a PruneConfigError naming the method, the field, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from vtprune.errors import PruneConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a number field; `note` says why, when the bound is not obvious."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def contains(self, value) -> bool:
        if value != value:  # NaN is in no range
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


def bounded(default, *, ge=None, gt=None, le=None, lt=None, note: str = ""):
    """A dataclass field with a declared range: `K: int = bounded(2, ge=1)`, `R: float = bounded(0.5, ge=0, lt=1)`.
    None is always allowed when the type hint allows it; the bound applies to numbers."""
    rule = Range(
        low=gt if gt is not None else ge,
        high=lt if lt is not None else le,
        low_open=gt is not None,
        high_open=lt is not None,
        note=note,
    )
    return field(default=default, metadata={"range": rule})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _options(hint) -> tuple:
    """The members of a union hint (`int | None` -> (int, NoneType)), or the hint alone."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _accepts(hint, value) -> bool:
    """Does `value` have the type `hint` (the subset of typing the method fields use)?"""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if len(_options(hint)) > 1:
        return any(_accepts(h, value) for h in _options(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return isinstance(value, (tuple, list)) and all(_accepts(item, x) for x in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_number(value)
    return isinstance(value, hint)


def _describe(hint) -> str:
    """`hint` in words, for the error message."""
    if hint is Any:
        return "anything"
    if hint is type(None):
        return "None"
    if len(_options(hint)) > 1:
        args = _options(hint)
        if float in args:  # an int is a number already
            args = tuple(h for h in args if h is not int)
        return " or ".join(dict.fromkeys(_describe(h) for h in args))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (tuple, list):
        args = typing.get_args(hint)
        return (
            f"a sequence of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
            if args
            else "a sequence"
        )
    words = {bool: "a bool (True or False)", int: "an int", float: "a number", str: "a str"}
    return words.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _number_hint(hint):
    """int or float when `hint` is that number type (optionally | None), else None."""
    args = [h for h in _options(hint) if h is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _field_range(cls: type, name: str) -> Range | None:
    # A subclass that only changes a default (`heads: str = "auto"`) drops the field's metadata: look it up
    # in the classes above as well.
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "range" in f.metadata:
            return f.metadata["range"]
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def check_fields(method) -> None:
    """Check every dataclass field of `method` against its type hint and declared range; raise a
    PruneConfigError naming the method, the field, the value and what is expected. Sequences given to a
    tuple field are stored as tuples (records and equality then do not depend on how they were spelled)."""
    cls = type(method)
    hints = _field_hints(cls)
    for f in dataclasses.fields(method):
        hint = hints.get(f.name, Any)
        value = getattr(method, f.name)
        rule = _field_range(cls, f.name)
        note = f" ({rule.note})" if rule is not None and rule.note else ""
        if not _accepts(hint, value):
            expected = _describe(hint)
            number = _number_hint(hint)
            if rule is not None and number is not None:
                optional = ", or None" if _accepts(hint, None) else ""
                expected = f"{_describe(number)} {rule.describe()}{optional}"
            raise PruneConfigError(f"{method.name}: {f.name}={value!r} must be {expected}{note}")
        if rule is not None and value is not None:
            if isinstance(value, (tuple, list)):  # a sequence of numbers: the range holds for each item
                if not all(rule.contains(x) for x in value):
                    raise PruneConfigError(
                        f"{method.name}: {f.name}={value!r}: every item must be {rule.describe()}{note}"
                    )
            elif _is_number(value) and not rule.contains(value):
                kind = {int: "an int ", float: "a number "}.get(_number_hint(hint), "")
                raise PruneConfigError(
                    f"{method.name}: {f.name}={value!r} must be {kind}{rule.describe()}{note}"
                )
        origins = {typing.get_origin(h) for h in _options(hint)}
        if isinstance(value, list) and tuple in origins and list not in origins:
            setattr(method, f.name, tuple(value))  # a tuple field given a list (a command line writes lists)
