"""ScienceQA-IMG: multiple-choice science questions with an image (the "SQA" / "SQA-IMG" column of papers).

Data: `lmms-lab/ScienceQA`, config `ScienceQA-IMG`, split `test` (2,017 questions), or a local parquet/folder
with the same columns (image, question, choices, answer as an index, hint, subject, grade, ...).
Prompt (LLaVA `--single-pred-prompt`, lmms-eval default format): optional "Context: {hint}\\n", the
question, the options as "A. ..." lines, then "Answer with the option's letter from the given choices
directly.". Parsing follows LLaVA's eval_science_qa.py ("A", "A. ...", "The answer is A."; otherwise
FAILED, scored wrong). Metrics: accuracy overall, on image questions, per subject and per grade.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vtprune.eval.data import cell, column_values
from vtprune.eval.metrics import accuracy, accuracy_by
from vtprune.eval.parsers import LETTER_PARSERS, OPTION_LETTERS
from vtprune.eval.tasks.base import Example, Task, load_table, unique_ids

SQA_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


def scienceqa_question(question: str, choices: list[str], hint: str | None) -> str:
    """The user text LLaVA/lmms-eval send for one ScienceQA sample (without the image placeholder)."""
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{context}{question}\n{options}{SQA_INSTRUCTION}"


class ScienceQATask(Task):
    name = "scienceqa_img"
    default_dataset = "lmms-lab/ScienceQA"
    default_config = "ScienceQA-IMG"
    default_split = "test"
    valid_splits = None
    parsers = LETTER_PARSERS
    default_parser = "llava"
    default_max_new_tokens = 128
    primary_metric = "accuracy"
    required_columns: ClassVar[tuple[str, ...]] = ("question", "choices", "answer", "image")

    def load(self, limit: int | None = None) -> list[Example]:
        loaded = load_table(self, "ScienceQA")
        table = loaded.table
        n = table.num_rows if limit is None else min(limit, table.num_rows)
        cols = {c: column_values(table, c)[:n] for c in ("question", "choices", "answer", "hint", "subject", "grade",
                                                          "category", "topic", "id", "question_id")}
        ids = cols["question_id"] if any(v is not None for v in cols["question_id"]) else cols["id"]
        uids = unique_ids(ids, self.split)
        image_present = table.column("image").is_valid().to_pylist()[:n]
        examples = []
        for row in range(n):
            question, choices, answer = cols["question"][row], cols["choices"][row], cols["answer"][row]
            error = None
            if question is None or not isinstance(choices, list) or not choices:
                error = "missing field: question or choices"
            elif len(choices) > len(OPTION_LETTERS):
                error = f"too many choices ({len(choices)}); at most {len(OPTION_LETTERS)} letters"
            elif not isinstance(answer, int) or not 0 <= answer < len(choices):
                error = f"bad target: answer {answer!r} is not an index into {len(choices)} choices"
            ok = error is None
            examples.append(
                Example(
                    uid=uids[row],
                    index=row,
                    question=scienceqa_question(question, choices, cols["hint"][row]) if ok else "",
                    target=OPTION_LETTERS[answer] if ok else "",
                    fields={
                        "split": self.split,
                        "question": question,
                        "choices": choices,
                        "subject": cols["subject"][row],
                        "grade": cols["grade"][row],
                        "category": cols["category"][row],
                        "has_image": bool(image_present[row]),
                    },
                    image_loader=(lambda r=row: cell(table, "image", r)) if image_present[row] else None,
                    base_dir=loaded.base_dir,
                    num_choices=len(choices) if ok else 0,
                    error=error,
                )
            )
        return examples

    def parse(self, text: str, example: Example) -> str | None:
        return self.parsers[self.parser](text, example.num_choices)

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        overall = accuracy(r.get("correct") for r in rows)
        img = accuracy(r.get("correct") for r in rows if r.get("has_image", True))
        return {
            "n": overall["n"],
            "accuracy": overall["accuracy"],
            "img_accuracy": img["accuracy"],
            "img_n": img["n"],
            "failed_parse": sum(1 for r in rows if r.get("parsed") is None),
            "per_subject": accuracy_by(rows, "subject"),
            "per_grade": accuracy_by(rows, "grade"),
            "protocol": f"parser={self.parser}; FAILED parses count as wrong",
        }

    def summary_table(self, metrics: dict[str, Any]) -> str:
        lines = ["| group | n | accuracy |", "|---|---|---|"]
        lines.append(f"| **overall** | {metrics['n']} | **{metrics['accuracy']:.4f}** |")
        lines.append(f"| image questions | {metrics['img_n']} | {metrics['img_accuracy']:.4f} |")
        for key, label in (("per_subject", "subject"), ("per_grade", "grade")):
            for name, m in metrics.get(key, {}).items():
                lines.append(f"| {label}: {name} | {m['n']} | {m['accuracy']:.4f} |")
        return "\n".join(lines)
