"""GQA (Hudson & Manning, CVPR'19) test-dev balanced: compositional questions on Visual Genome images.

Data: `lmms-lab/GQA` -- questions in config `testdev_balanced_instructions` (id, imageId, question, answer,
types, ...) and images in config `testdev_balanced_images` (id, image), both split `testdev` (12,578
questions, 398 images); joined by `imageId`. A local folder in that layout, or a parquet/folder of questions
that already carries an `image` column, works the same.
Prompt (LLaVA-1.5): question + "\\nAnswer the question using a single word or phrase.". Scoring as LLaVA's
`convert_gqa_for_eval.py` + the official `eval.py`: the answer with trailing "." removed, lower-cased, must
equal the ground truth exactly. Reported: accuracy, and (when the `types` column is there) binary/open and
per structural type accuracy, as GQA's eval script prints them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vtprune.eval.data import load_split, require_columns
from vtprune.eval.errors import DatasetError
from vtprune.eval.metrics import accuracy, accuracy_by
from vtprune.eval.tasks.base import Example, Task, columns, image_loader, load_table, unique_ids

GQA_INSTRUCTION = "\nAnswer the question using a single word or phrase."
BINARY_STRUCTURES = ("verify", "logical")  # GQA's eval.py: these structural types have yes/no answers


def parse_gqa_llava(text: str) -> str:
    """LLaVA's GQA conversion: strip trailing full stops, lower-case."""
    return text.strip().rstrip(".").lower()


class GQATask(Task):
    name = "gqa"
    default_dataset = "lmms-lab/GQA"
    default_config = "testdev_balanced_instructions"
    default_split = "testdev"
    parsers = {"llava": parse_gqa_llava}
    default_parser = "llava"
    default_max_new_tokens = 128
    primary_metric = "accuracy"
    required_columns: ClassVar[tuple[str, ...]] = ("question", "answer")

    @property
    def images_config(self) -> str | None:
        if self.config and "instructions" in self.config:
            return self.config.replace("instructions", "images")
        return None

    def load(self, limit: int | None = None) -> list[Example]:
        loaded = load_table(self, "GQA")
        table = loaded.table
        n = table.num_rows if limit is None else min(limit, table.num_rows)
        cols = columns(table, ("id", "imageId", "question", "answer", "types"), n)
        if "image" in table.column_names:
            images = table
            image_row: dict[Any, int] = {i: i for i in range(n)}
            row_key: list[Any] = list(range(n))
        else:
            if "imageId" not in table.column_names:
                raise DatasetError(f"GQA data {self.dataset!r} has neither an `image` nor an `imageId` column; it has "
                                   f"{sorted(table.column_names)}")
            images = self._load_images()
            ids = [str(v) for v in images.column("id").to_pylist()]
            image_row = {image_id: r for r, image_id in enumerate(ids)}
            row_key = [str(v) if v is not None else None for v in cols["imageId"]]
        uids = unique_ids(cols["id"], self.split)
        examples = []
        for row in range(n):
            question, answer = cols["question"][row], cols["answer"][row]
            structural = (cols["types"][row] or {}).get("structural") if isinstance(cols["types"][row], dict) else None
            img = image_row.get(row_key[row])
            error = None
            if not question or answer is None:
                error = "missing field: question or answer"
            elif img is None:
                error = f"missing image: imageId {row_key[row]!r} is not in the images table"
            examples.append(Example(
                uid=uids[row],
                index=row,
                question=f"{question}{GQA_INSTRUCTION}" if question else "",
                target=str(answer).strip().lower() if answer is not None else "",
                fields={"split": self.split, "question_id": cols["id"][row], "image_id": cols["imageId"][row],
                        "question": question, "structural": structural,
                        "kind": None if structural is None else
                        ("binary" if structural in BINARY_STRUCTURES else "open")},
                image_loader=image_loader(images, img) if img is not None else None,
                base_dir=loaded.base_dir,
                error=error,
            ))
        return examples

    def _load_images(self):
        config = self.images_config
        if config is None:
            raise DatasetError(
                f"GQA data {self.dataset!r} has no `image` column and config {self.config!r} names no images "
                "config; use the lmms-lab/GQA layout (testdev_balanced_instructions + testdev_balanced_images) "
                "or add an `image` column"
            )
        loaded = load_split(self.dataset, split=self.split, config=config, revision=self.revision)
        require_columns(loaded.table, ("id", "image"), f"GQA images {self.dataset!r} (config {config!r})")
        self.sources.append(loaded.source)
        return loaded.table

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        overall = accuracy(r.get("correct") for r in rows)
        metrics: dict[str, Any] = {"n": overall["n"], "accuracy": overall["accuracy"]}
        typed = [r for r in rows if r.get("structural")]
        if typed:
            metrics["per_kind"] = accuracy_by(typed, "kind")
            metrics["per_structural"] = accuracy_by(typed, "structural")
        metrics["protocol"] = f"parser={self.parser}; exact match after rstrip('.') and lower-casing (LLaVA)"
        return metrics

    def summary_table(self, metrics: dict[str, Any]) -> str:
        lines = ["| group | n | accuracy |", "|---|---|---|",
                 f"| **overall** | {metrics['n']} | **{metrics['accuracy']:.4f}** |"]
        for key in ("per_kind", "per_structural"):
            for name, m in metrics.get(key, {}).items():
                lines.append(f"| {name} | {m['n']} | {m['accuracy']:.4f} |")
        return "\n".join(lines)
