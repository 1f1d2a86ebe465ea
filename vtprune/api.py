"""Public API: prune(), unprune(), pruned(), last_record(), list_methods()."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vtprune.engine import PruneSession
from vtprune.methods.base import METHODS, Method, PruneConfigError, make_method, method_class
from vtprune.record import PruneRecord

_SESSION_ATTR = "_vtprune_session"
_LAST_RECORD_ATTR = "_vtprune_last_record"
_ACTIVE: set[int] = set()


def prune(
    model: torch.nn.Module,
    method: str | Method = "none",
    keep: int | float | None = None,
    *,
    timing: bool = False,
    **params,
) -> torch.nn.Module:
    """Make `model` prune visual tokens with `method`; returns the same model.

    `keep` is the number of visual tokens kept per image, or a fraction in (0, 1]; None uses the method's
    paper default. Extra keyword arguments are the method's hyper-parameters (see `vtprune methods`).
    Pruning happens once per `generate()` call, at prefill; decoded tokens attend to the kept set.
    Calling prune() on an already pruned model replaces its method.
    """
    method_obj = make_method(method, keep=keep, **params)
    if getattr(model, _SESSION_ATTR, None) is not None:
        unprune(model)
    session = PruneSession(model, method_obj, timing=timing)
    session.attach()
    setattr(model, _SESSION_ATTR, session)
    _ACTIVE.add(id(model))
    return model


def unprune(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every hook vtprune added; the model behaves exactly as before prune()."""
    session: PruneSession | None = getattr(model, _SESSION_ATTR, None)
    if session is None:
        return model
    if session.record is not None:
        setattr(model, _LAST_RECORD_ATTR, session.record)
    _ACTIVE.discard(id(model))
    session.detach(active_sessions=len(_ACTIVE))
    delattr(model, _SESSION_ATTR)
    return model


@contextmanager
def pruned(
    model: torch.nn.Module, method: str | Method = "none", keep: int | float | None = None, **params
) -> Iterator[torch.nn.Module]:
    """`with vtprune.pruned(model, "fastv", keep=64): model.generate(...)` — hooks removed on exit."""
    prune(model, method, keep=keep, **params)
    try:
        yield model
    finally:
        unprune(model)


def is_pruned(model: torch.nn.Module) -> bool:
    return getattr(model, _SESSION_ATTR, None) is not None


def session_of(model: torch.nn.Module) -> PruneSession | None:
    """The pruning session attached to `model` (its hooks and plan), or None."""
    return getattr(model, _SESSION_ATTR, None)


def last_record(model: torch.nn.Module) -> PruneRecord | None:
    """What the last pruned prefill kept (per sample, per stage), or None."""
    session: PruneSession | None = getattr(model, _SESSION_ATTR, None)
    if session is not None and session.record is not None:
        return session.record
    return getattr(model, _LAST_RECORD_ATTR, None)


def get_method(name: str, keep: int | float | None = None, **params) -> Method:
    return make_method(name, keep=keep, **params)


@dataclass
class MethodInfo:
    name: str
    stage: str
    paper: str
    summary: str
    params: dict  # name -> (type, default)
    deviations: str = ""  # the "Deviations from the official code" paragraph of the method file
    doc: str = ""  # the method file's whole docstring


DEVIATIONS_HEADING = "Deviations from the official code"


def _paragraphs(doc: str) -> list[str]:
    blocks = [block.strip() for block in inspect.cleandoc(doc).split("\n\n")]
    return [block for block in blocks if block]


def deviations_paragraph(doc: str) -> str:
    """The paragraph of a method file's docstring that starts with "Deviations from the official code"
    (every method file has one; docs/ADDING_A_METHOD.md), or "" when there is none."""
    for block in _paragraphs(doc or ""):
        if block.startswith(DEVIATIONS_HEADING):
            return block
    return ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def list_methods() -> list[MethodInfo]:
    method_class("none")  # loads the built-in methods
    infos = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        hints = typing.get_type_hints(cls)
        params = {
            f.name: (
                _type_name(hints.get(f.name, f.type)),
                f.default if f.default is not dataclasses.MISSING else None,
            )
            for f in dataclasses.fields(cls)
        }
        # the summary is the class docstring's first paragraph; the deviations come from the file's docstring
        blocks = _paragraphs(cls.__doc__ or "")
        summary = " ".join(blocks[0].split()) if blocks else ""
        module_doc = inspect.getdoc(inspect.getmodule(cls)) or ""
        infos.append(
            MethodInfo(
                name,
                cls.stage_kind,
                cls.paper,
                summary,
                params,
                deviations=deviations_paragraph(module_doc),
                doc=module_doc,
            )
        )
    return infos


__all__ = [
    "prune",
    "unprune",
    "pruned",
    "is_pruned",
    "last_record",
    "get_method",
    "list_methods",
    "PruneConfigError",
]
