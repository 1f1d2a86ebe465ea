"""Benchmark tasks and their registry (the built-in benchmarks, plus any registered by other packages).

Names are stable (presets and result folders use them): pope, scienceqa_img, gqa, textvqa, textvqa_noocr, mme,
mmbench, mmbench_cn, vqav2, vizwiz, mmvet. docs/TASKS.md gives each one's data, prompt and metric.
"""

from vtprune.eval.tasks.base import Example, Task
from vtprune.eval.tasks.gqa import GQATask
from vtprune.eval.tasks.mmbench import MMBenchCNTask, MMBenchTask
from vtprune.eval.tasks.mme import MMETask
from vtprune.eval.tasks.mmvet import MMVetTask
from vtprune.eval.tasks.pope import POPE_SPLITS, PopeTask
from vtprune.eval.tasks.registry import get_task, list_tasks, register_task
from vtprune.eval.tasks.scienceqa import ScienceQATask
from vtprune.eval.tasks.vqa import TextVQANoOcrTask, TextVQATask, VizWizTask, VQAv2Task

BUILTIN_TASKS = {
    "pope": PopeTask,
    "scienceqa_img": ScienceQATask,
    "gqa": GQATask,
    "textvqa": TextVQATask,
    "textvqa_noocr": TextVQANoOcrTask,
    "mme": MMETask,
    "mmbench": MMBenchTask,
    "mmbench_cn": MMBenchCNTask,
    "vqav2": VQAv2Task,
    "vizwiz": VizWizTask,
    "mmvet": MMVetTask,
}
for _name, _cls in BUILTIN_TASKS.items():
    register_task(_name, _cls, overwrite=True)

__all__ = [
    "BUILTIN_TASKS",
    "POPE_SPLITS",
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
]
