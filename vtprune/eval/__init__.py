"""Evaluation: benchmark tasks, the resumable multi-process runner, paired comparison and sweeps.

    from vtprune.eval import EvalConfig, run_eval
    run_eval(EvalConfig(model="llava-hf/llava-1.5-7b-hf", task="pope", split="adversarial",
                        method="vispruner", keep=32, batch_size=16))

Imports here are light (no model, no `datasets`); heavy modules load inside the functions that need them.
"""

from vtprune.eval.config import EvalConfig
from vtprune.eval.errors import DatasetError, EvalInputError
from vtprune.eval.tasks import (
    BUILTIN_TASKS,
    Example,
    GQATask,
    MMBenchCNTask,
    MMBenchTask,
    MMETask,
    MMVetTask,
    PopeTask,
    ScienceQATask,
    Task,
    TextVQANoOcrTask,
    TextVQATask,
    VizWizTask,
    VQAv2Task,
    get_task,
    list_tasks,
    register_task,
)


def run_eval(*args, **kwargs):
    """See `vtprune.eval.runner.run_eval` (imported lazily: it pulls in torch and transformers)."""
    from vtprune.eval.runner import run_eval as _run_eval

    return _run_eval(*args, **kwargs)


__all__ = [
    "BUILTIN_TASKS",
    "DatasetError",
    "EvalConfig",
    "EvalInputError",
    "Example",
    "GQATask",
    "MMBenchCNTask",
    "MMBenchTask",
    "MMETask",
    "MMVetTask",
    "PopeTask",
    "ScienceQATask",
    "Task",
    "TextVQANoOcrTask",
    "TextVQATask",
    "VQAv2Task",
    "VizWizTask",
    "get_task",
    "list_tasks",
    "register_task",
    "run_eval",
]
