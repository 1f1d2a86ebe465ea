"""Model adapters, one file per family, looked up by the config's `model_type` (as transformers does).

A new family is one file here with a `@register_adapter` class (see `base.py` for the protocol): every module
of this package is imported when an adapter is first looked up, so nothing else needs an edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from vtprune.errors import PruneConfigError

ADAPTERS: dict[str, type] = {}  # config.model_type -> ModelAdapter subclass


def register_adapter(cls: type) -> type:
    """Class decorator: serve every `config.model_type` in `cls.model_types`."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__} names no model_types")
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def _load_builtin_adapters() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def supported_models() -> dict[str, tuple[str, ...]]:
    """model_type -> the model classes its adapter accepts."""
    _load_builtin_adapters()
    return {model_type: cls.model_classes for model_type, cls in sorted(ADAPTERS.items())}


def adapter_for(model):
    """The adapter of `model`'s family, or PruneConfigError naming the supported models."""
    _load_builtin_adapters()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        supported = "; ".join(
            f"{model_type} ({', '.join(classes)})" for model_type, classes in supported_models().items()
        )
        raise PruneConfigError(
            f"unsupported model class {type(model).__name__} (model_type {model_type!r}); supported: {supported}"
        )
    return cls(model)
