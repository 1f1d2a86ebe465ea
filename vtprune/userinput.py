"""Reading what a user types: method parameters, visual-token budgets and comma-separated lists.

Every command and configuration reads these through the functions here, so `--param recycle=false` means the
same thing in `generate`, `eval`, `sweep`, `bench` and `analyze`. Bad input raises `UserInputError` with the
text that was given and what was expected. Whether a value suits a method's field (type, range) is the
method's own check (vtprune/methods/base.py); this module only turns text into Python values.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from vtprune.errors import UserInputError


def parse_value(raw: str) -> Any:
    """Text to a Python value: JSON (3, 0.1, true, null, [1, 2], "x"), then a Python literal (True, None,
    (1, 2)), else the text itself. Both spellings of booleans and None therefore read the same."""
    text = raw.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def parse_param(item: str) -> tuple[str, Any]:
    """`name=value` -> (name, parsed value); `method.name=value` keeps the dotted name."""
    name, sep, raw = item.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UserInputError(f"--param expects name=value, got {item!r}")
    return name, parse_value(raw)


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """Repeated `--param name=value` of one method."""
    return dict(parse_param(item) for item in items or [])


def split_params(items: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Repeated `--param` of a command that runs several methods: `method.name=value` applies to that method,
    `name=value` to every method but `none`."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items or []:
        key, value = parse_param(item)
        method, dot, name = key.partition(".")
        if not dot:
            for m in methods:
                if m != "none":
                    out[m][key] = value
        elif method in out and name:
            out[method][name] = value
        else:
            raise UserInputError(f"--param {item!r} names method {method!r}, which is not among {methods}")
    return out


def parse_keep(value: int | float | str) -> int | float:
    """A visual-token budget per image. `64` -> 64 tokens, `0.25` -> a quarter of the tokens, `1` -> one
    token, `1.0` -> all tokens, `320/2880` -> the fraction a paper's budget is of its token count
    (LLaVA-NeXT tables: 320 of 2,880), applied to each image's own tokens."""
    message = (
        f"keep must be a whole token count >= 1, a fraction in (0, 1] or a paper budget like 320/2880; got {value!r}"
    )
    if isinstance(value, bool):
        raise UserInputError(message)
    if isinstance(value, str):
        text = value.strip()
        ratio = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
        if ratio:
            part, whole = int(ratio.group(1)), int(ratio.group(2))
            if not 0 < part <= whole:
                raise UserInputError(message)
            value = part / whole
        elif re.fullmatch(r"\d+", text):
            value = int(text)
        else:
            try:
                value = float(text)
            except ValueError as exc:
                raise UserInputError(message) from exc
    if isinstance(value, int):
        if value < 1:
            raise UserInputError(message)
        return value
    if isinstance(value, float):
        if 0 < value <= 1:
            return value
        if value > 1 and value.is_integer():
            return int(value)
    raise UserInputError(message)


def parse_keep_option(raw: str | None) -> int | float | None:
    """`--keep` of a command where it may be left out: empty or `default` -> None (the method's default)."""
    if raw is None or raw.strip() in ("", "default"):
        return None
    return parse_keep(raw)


def parse_list(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"] (empty items dropped)."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def parse_int_list(text: str, what: str, minimum: int = 1) -> list[int]:
    """`576,192,64` -> [576, 192, 64]; `what` names the option in the message."""
    items = parse_list(text)
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise UserInputError(f"{what} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise UserInputError(f"{what} must list integers >= {minimum}, got {text!r}")
    return values
