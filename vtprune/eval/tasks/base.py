"""What a benchmark task is: load examples, build the question text, parse an answer, score, summarise.

Tasks know nothing about models or result files; the runner combines them. Metrics are computed from the
per-sample rows the runner writes, so a resumed, merged or re-scored run gives the same numbers.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vtprune.eval.errors import DatasetError, EvalInputError

if TYPE_CHECKING:
    from vtprune.eval.data import LoadedSplit


@dataclass
class Example:
    """One sample to evaluate.

    `uid` is the resume key: unique within a run and stable across restarts (derived from the dataset's own
    id where it has one). `index` is the sample's position in the run order; merged multi-process output
    is sorted by it. `fields` are copied into the sample's result row (split, category, subject, ...).
    `error` marks a sample that cannot be evaluated (bad target, missing field): it is recorded, not run.
    """

    uid: str
    index: int
    question: str
    target: str
    fields: dict[str, Any] = field(default_factory=dict)
    image_loader: Callable[[], Any] | None = None
    base_dir: Path | None = None
    num_choices: int = 0
    error: str | None = None

    def raw_image(self) -> Any:
        """The undecoded image cell (PIL, bytes dict, path) or None for a text-only sample."""
        return self.image_loader() if self.image_loader is not None else None

    @property
    def doc_hash(self) -> str:
        """Content hash of the text side of the sample, to spot a changed dataset when comparing runs."""
        return hashlib.sha256(f"{self.question}\x00{self.target}".encode()).hexdigest()[:16]


class Task(ABC):
    """A benchmark. Subclasses set the class attributes and implement `load`, `parse`, `summarize`."""

    name: str = ""
    default_dataset: ClassVar[str] = ""
    default_config: ClassVar[str | None] = None
    default_split: ClassVar[str] = "test"
    valid_splits: ClassVar[tuple[str, ...] | None] = None  # None: any split the data has
    parsers: ClassVar[dict[str, Callable]] = {}
    default_parser: ClassVar[str] = "llava"
    default_max_new_tokens: ClassVar[int] = 128
    primary_metric: ClassVar[str] = "accuracy"
    required_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        dataset: str | None = None,
        split: str | None = None,
        config: str | None = None,
        revision: str | None = None,
        parser: str | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or self.name
        self.dataset = dataset or self.default_dataset
        self.config = config if config is not None else self.default_config
        self.split = split or self.default_split
        self.revision = revision
        self.parser = parser or self.default_parser
        if self.valid_splits is not None and self.split not in self.valid_splits:
            raise EvalInputError(
                f"unknown split {self.split!r} for task {self.name!r}; valid splits: {', '.join(self.valid_splits)}"
            )
        if self.parser not in self.parsers:
            raise EvalInputError(
                f"unknown parser {self.parser!r} for task {self.name!r}; valid parsers: {', '.join(self.parsers)}"
            )
        self.sources: list[dict[str, Any]] = []  # filled by load(): where the rows came from

    def describe(self) -> dict[str, Any]:
        """The task settings that define a run (recorded and hashed into the result folder name)."""
        return {
            "task": self.name,
            "dataset": _normalise_dataset(self.dataset),
            "dataset_config": self.config,
            "split": self.split,
            "revision": self.revision,
            "parser": self.parser,
        }

    @abstractmethod
    def load(self, limit: int | None = None) -> list[Example]:
        """Examples in a deterministic order; `limit` keeps the first N (per split for multi-split tasks)."""

    def parse(self, text: str, example: Example) -> str | None:
        """The answer read from generated text by the chosen parser; None when it cannot be read (scored
        wrong). Tasks whose parsers need more than the text (the options of a question) override it."""
        return self.parsers[self.parser](text)

    def is_correct(self, parsed: str | None, example: Example) -> bool:
        return parsed is not None and parsed == example.target

    def score(self, parsed: str | None, example: Example) -> float | None:
        """A graded per-sample score written to the row as `score` (VQA accuracy); None: the task has none."""
        return None

    def finalize(self, run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Called once per run on the merged rows (errors included) before the summary: write task outputs
        such as a benchmark server's submission file into `run_dir`, and return the rows to summarise
        (a task may add fields, e.g. judge scores). Outputs are derived from the rows, written atomically,
        and never touch the sample files. The default does nothing."""
        return rows

    @abstractmethod
    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Metrics from the result rows of successfully evaluated samples."""

    def summary_table(self, metrics: dict[str, Any]) -> str:
        """A Markdown table of the metrics (the generic form: every top-level number)."""
        lines = ["| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                lines.append(f"| {key} | {_fmt(value)} |")
        return "\n".join(lines)


def load_table(task: Task, label: str) -> LoadedSplit:
    """Load the task's split, check it exists and has the required columns, record the source."""
    from vtprune.eval.data import load_split, require_columns

    loaded = load_split(task.dataset, split=task.split, config=task.config, revision=task.revision)
    what = f"{label} data {task.dataset!r} (split {task.split!r})"
    if not loaded.split_by_files and loaded.available_splits and task.split not in loaded.available_splits:
        raise DatasetError(f"{what}: unknown split; splits present: {', '.join(loaded.available_splits)}")
    require_columns(loaded.table, task.required_columns, what)
    task.sources = [loaded.source]
    return loaded


def columns(table: Any, names: tuple[str, ...] | list[str], n: int) -> dict[str, list[Any]]:
    """The first `n` values of each named column (None for a column the table lacks)."""
    from vtprune.eval.data import column_values

    return {name: column_values(table, name)[:n] for name in names}


def image_loader(table: Any, row: int, column: str = "image") -> Callable[[], Any]:
    """A lazy reader of one image cell (decoding happens only when the sample runs)."""
    from vtprune.eval.data import cell

    return lambda: cell(table, column, row)


def _fmt(value: float | int) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _normalise_dataset(dataset: str) -> str:
    from vtprune.eval.data import is_local

    return str(Path(dataset).expanduser().resolve()) if is_local(dataset) else dataset


def unique_ids(candidates: list[Any], prefix: str) -> list[str]:
    """`prefix/<id>` when the dataset ids are present and unique, else `prefix/<row>` (still deterministic)."""
    if all(c is not None for c in candidates) and len(set(map(str, candidates))) == len(candidates):
        return [f"{prefix}/{c}" for c in candidates]
    return [f"{prefix}/{row}" for row in range(len(candidates))]
