"""Benchmark tasks and their registry (`pope`, `scienceqa_img`, plus any registered by other packages)."""

from vtprune.eval.tasks.base import Example, Task
from vtprune.eval.tasks.pope import POPE_SPLITS, PopeTask
from vtprune.eval.tasks.registry import get_task, list_tasks, register_task
from vtprune.eval.tasks.scienceqa import ScienceQATask

register_task("pope", PopeTask, overwrite=True)
register_task("scienceqa_img", ScienceQATask, overwrite=True)

__all__ = [
    "POPE_SPLITS",
    "Example",
    "PopeTask",
    "ScienceQATask",
    "Task",
    "get_task",
    "list_tasks",
    "register_task",
]
