"""Tasks by name. Other parts of vtprune (the synthetic shapes testbed) add their own with `register_task`."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from vtprune.eval.errors import EvalInputError
from vtprune.eval.tasks.base import Task

TaskFactory = Callable[..., Task]

_REGISTRY: dict[str, TaskFactory] = {}
# Packages that register tasks when imported; imported lazily so `vtprune eval` does not pay for them
# unless a task name is not found among the built-in ones.
_PLUGIN_MODULES = ("vtprune.testbed",)


def register_task(name: str, factory: TaskFactory, *, overwrite: bool = False) -> None:
    """Register `factory(**options) -> Task` under `name`.

    `options` are `name` (the registered name, for messages and records) and the user's settings that are
    not None, among: dataset, split, config, revision, parser. Forward them all to the Task constructor.
    Example (a testbed reusing the POPE task on a local parquet file)::

        register_task("shapes-pope", lambda **kw: PopeTask(**{"dataset": str(PARQUET), **kw}))
    """
    if not name or not isinstance(name, str):
        raise ValueError("task name must be a non-empty string")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"task {name!r} is already registered")
    _REGISTRY[name] = factory


def list_tasks() -> list[str]:
    """Names of every registered task (built-in and plugin)."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_task(name: str, **options: object) -> Task:
    """Build the task `name` with the given options (None values mean "task default")."""
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise EvalInputError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(_REGISTRY))}")
    task = _REGISTRY[name](name=name, **{k: v for k, v in options.items() if v is not None})
    task.name = name
    return task


def _load_plugins() -> None:
    # These modules ship with vtprune: an ImportError here is a bug to show, not an absent plugin to skip
    # (swallowing it turned a broken task module into "unknown task").
    for module in _PLUGIN_MODULES:
        importlib.import_module(module)
