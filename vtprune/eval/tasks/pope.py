"""POPE (Li et al., EMNLP'23): "Is there a {object} in the image?" yes/no questions on COCO images.

Three negative-sampling splits (random, popular, adversarial). Data: `lmms-lab/POPE` on the Hub -- config
`Full` has one split per category; the default config has one `test` split with a `category` column -- or a
local parquet/folder in the same schema (filtered by `category` when its files do not name the split).
Prompt (LLaVA-1.5): question + "\\nAnswer the question using a single word or phrase.". Metrics per split:
accuracy, precision, recall, F1 (yes = positive) and the yes-ratio of the predictions; the LLaVA-paper
"POPE" number is the F1 averaged over the splits.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vtprune.eval.data import LoadedSplit, cell, column_values, is_local, load_split, require_columns
from vtprune.eval.errors import DatasetError
from vtprune.eval.metrics import binary_metrics
from vtprune.eval.parsers import YES_NO_PARSERS
from vtprune.eval.tasks.base import Example, Task, unique_ids

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_INSTRUCTION = "\nAnswer the question using a single word or phrase."


class PopeTask(Task):
    name = "pope"
    default_dataset = "lmms-lab/POPE"
    default_config = "Full"
    default_split = "adversarial"
    valid_splits = (*POPE_SPLITS, "all")
    parsers = YES_NO_PARSERS
    default_parser = "llava"
    default_max_new_tokens = 128
    primary_metric = "f1"
    required_columns: ClassVar[tuple[str, ...]] = ("question", "answer", "image")

    @property
    def splits(self) -> tuple[str, ...]:
        return POPE_SPLITS if self.split == "all" else (self.split,)

    def load(self, limit: int | None = None) -> list[Example]:
        examples: list[Example] = []
        self.sources = []
        offset = 0  # index = position in the full concatenation of splits, so it does not depend on `limit`
        for split in self.splits:
            loaded = self._load_one(split)
            self.sources.append(loaded.source)
            examples.extend(self._examples(loaded, split, start=offset, limit=limit))
            offset += len(loaded.rows) if loaded.rows is not None else loaded.table.num_rows
        return examples

    def _load_one(self, split: str) -> LoadedSplit:
        """Rows of one POPE category, whichever layout the data uses."""
        if not is_local(self.dataset) and self.config == "Full":
            loaded = load_split(self.dataset, split=split, config=self.config, revision=self.revision)
        elif not is_local(self.dataset):
            loaded = load_split(self.dataset, split="test", config=self.config, revision=self.revision)
            loaded.split_by_files = False
        else:
            loaded = load_split(self.dataset, split=split, config=self.config)
        what = f"POPE data {self.dataset!r} (split {split!r})"
        require_columns(loaded.table, self.required_columns, what)
        if not loaded.split_by_files:
            require_columns(loaded.table, ("category",), what + " -- its files do not name the split, so")
            categories = column_values(loaded.table, "category")
            rows = [i for i, c in enumerate(categories) if c == split]
            if not rows:
                raise DatasetError(
                    f"{what}: no rows with category {split!r}; categories present: {sorted(set(map(str, categories)))}"
                )
            # Keep the table as loaded (memory-mapped) and select rows by index: `take` would copy images.
            loaded.rows = rows
            loaded.source["filtered_by"] = {"category": split, "rows": len(rows)}
        return loaded

    def _examples(self, loaded: LoadedSplit, split: str, start: int, limit: int | None) -> list[Example]:
        table = loaded.table
        rows = loaded.rows if loaded.rows is not None else list(range(table.num_rows))
        rows = rows if limit is None else rows[:limit]

        def col(name: str) -> list[Any]:
            values = column_values(table, name)
            return [values[r] for r in rows]

        questions, answers, categories = col("question"), col("answer"), col("category")
        image_sources = col("image_source")
        qids = col("question_id")
        if all(q is None for q in qids):
            qids = col("id")
        uids = unique_ids(qids, split)
        examples = []
        for row in range(len(rows)):
            target = str(answers[row]).strip().lower() if answers[row] is not None else None
            error = None
            if questions[row] is None or not str(questions[row]).strip():
                error = "missing field: question"
            elif target not in ("yes", "no"):
                error = f"bad target: answer {answers[row]!r} is not yes/no"
            examples.append(
                Example(
                    uid=uids[row],
                    index=start + row,
                    question=f"{questions[row]}{POPE_INSTRUCTION}" if questions[row] is not None else "",
                    target=target or "",
                    fields={
                        "split": split,
                        "question_id": qids[row],
                        "question": questions[row],
                        "category": categories[row] if categories[row] is not None else split,
                        "image_source": image_sources[row],
                    },
                    image_loader=_image_loader(table, rows[row]),
                    base_dir=loaded.base_dir,
                    error=error,
                )
            )
        return examples

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Per-split binary metrics, the pooled metrics, and the LLaVA-paper mean F1 over splits."""
        per_split: dict[str, dict] = {}
        for split in self.splits:
            sel = [r for r in rows if r.get("split") == split]
            if sel:
                per_split[split] = binary_metrics([r.get("parsed") for r in sel], [r["target"] for r in sel])
        pooled = binary_metrics([r.get("parsed") for r in rows], [r["target"] for r in rows])
        f1s = [m["f1"] for m in per_split.values()]
        return {
            "n": pooled["n"],
            "accuracy": pooled["accuracy"],
            "precision": pooled["precision"],
            "recall": pooled["recall"],
            "f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "yes_ratio": pooled["yes_ratio"],
            "unparsed": pooled["unparsed"],
            "per_split": per_split,
            "pooled": pooled,
            "paper_summary": {
                "metric": "mean F1 over splits (LLaVA-1.5 paper 'POPE')",
                "value": sum(f1s) / len(f1s) if f1s else 0.0,
                "splits": sorted(per_split),
            },
            "protocol": f"parser={self.parser}; yes_ratio over predictions; unparsed answers count as wrong",
        }

    def summary_table(self, metrics: dict[str, Any]) -> str:
        lines = [
            "| split | n | accuracy | precision | recall | F1 | yes-ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for split, m in metrics.get("per_split", {}).items():
            lines.append(
                f"| {split} | {m['n']} | {m['accuracy']:.4f} | {m['precision']:.4f} | {m['recall']:.4f} "
                f"| {m['f1']:.4f} | {m['yes_ratio']:.4f} |"
            )
        paper = metrics.get("paper_summary", {})
        lines.append(f"| **mean F1 (paper)** | {metrics.get('n', 0)} | | | | **{paper.get('value', 0.0):.4f}** | |")
        return "\n".join(lines)


def _image_loader(table, row: int):
    return lambda: cell(table, "image", row)
