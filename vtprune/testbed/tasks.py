"""The `shapes-pope` and `shapes-mcq` evaluation tasks: the POPE and ScienceQA task classes on generated data.

Without `--dataset-id`, the held-out data (seed 1234, the seed of the model card's numbers, never used in
training) is generated into the cache on first use, then loaded through the same parquet path as the real
datasets.
"""

from __future__ import annotations

from vtprune.eval.tasks.pope import PopeTask
from vtprune.eval.tasks.registry import register_task
from vtprune.eval.tasks.scienceqa import ScienceQATask
from vtprune.testbed.shapes import ensure_shapes_data

HELDOUT_SEED = 1234
POPE_IMAGES = 100  # 1,686 questions: 562 per split
MCQ_QUESTIONS = 300


def shapes_pope(**options) -> PopeTask:
    if "dataset" not in options:
        options["dataset"] = str(ensure_shapes_data("pope", HELDOUT_SEED, POPE_IMAGES))
    return PopeTask(**options)


def shapes_mcq(**options) -> ScienceQATask:
    if "dataset" not in options:
        options["dataset"] = str(ensure_shapes_data("mcq", HELDOUT_SEED, MCQ_QUESTIONS))
    return ScienceQATask(**options)


for _name, _factory in (("shapes-pope", shapes_pope), ("shapes-mcq", shapes_mcq)):
    register_task(_name, _factory, overwrite=True)
