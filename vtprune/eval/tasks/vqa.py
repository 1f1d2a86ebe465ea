"""Open-ended VQA benchmarks scored by VQA accuracy: TextVQA (with or without OCR tokens), VQAv2, VizWiz.

All three share one shape: a question, an image, ten human answers (absent on test splits), the LLaVA-1.5
short-answer prompt, the VQA answer normaliser (`vtprune.eval.vqa_answers`) and VQA accuracy. Every run also
writes `submission.json` in the run folder, the file the benchmark's EvalAI server takes (answers normalised as
LLaVA's submission scripts do; a sample that failed gets ""): the only score of a test split.

- `textvqa` (`lmms-lab/textvqa`, split `validation`): LLaVA-1.5's prompt with the OCR tokens of the image,
  "{question}\\nReference OCR token: {t1}, {t2}, ...\\nAnswer the question using a single word or phrase."
  (the line is left out when an image has no OCR tokens) -- the setting of the LLaVA-1.5 paper and the pruning
  papers. `textvqa_noocr`: the same without OCR tokens (lmms-eval's `textvqa_val` default).
- `vqav2` (`lmms-lab/VQAv2`, split `validation`; `testdev` for the server's test-dev number).
- `vizwiz` (`lmms-lab/VizWiz-VQA`, split `val`; `test` for the server): LLaVA-1.5's prompt asks to answer
  "Unanswerable" when the image does not tell; the summary reports unanswerable questions separately.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any, ClassVar

from vtprune.eval.store import write_json_atomic
from vtprune.eval.tasks.base import Example, Task, columns, image_loader, load_table, unique_ids
from vtprune.eval.vqa_answers import (
    answer_strings,
    human_matches,
    majority_answer,
    normalize_answer,
    vqa_accuracy,
)

VQA_INSTRUCTION = "\nAnswer the question using a single word or phrase."
VIZWIZ_INSTRUCTION = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
SUBMISSION_JSON = "submission.json"


def _parse_vqa(text: str) -> str:
    return normalize_answer(text)


class VqaTask(Task):
    """Question + image + human answers, VQA accuracy, an EvalAI submission file."""

    label: ClassVar[str] = "VQA"
    parsers = {"vqa": _parse_vqa}
    default_parser = "vqa"
    default_max_new_tokens = 128
    primary_metric = "accuracy"
    required_columns: ClassVar[tuple[str, ...]] = ("question", "image")
    type_column: ClassVar[str | None] = None  # the column of the per-type breakdown (answer type, category)
    extra_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submission_path: str | None = None

    def build_question(self, question: str, values: dict[str, Any]) -> str:
        return f"{question}{VQA_INSTRUCTION}"

    def load(self, limit: int | None = None) -> list[Example]:
        loaded = load_table(self, self.label)
        table = loaded.table
        n = table.num_rows if limit is None else min(limit, table.num_rows)
        names = ("question", "answers", "question_id", *((self.type_column,) if self.type_column else ()),
                 *self.extra_columns)
        cols = columns(table, names, n)
        uids = unique_ids(cols["question_id"], self.split)
        examples = []
        for row in range(n):
            values = {name: cols[name][row] for name in names}
            question, answers = values["question"], answer_strings(values["answers"])
            fields = {"split": self.split, "question_id": values["question_id"], "question": question,
                      "answers": answers}
            if self.type_column:
                fields[self.type_column] = values[self.type_column]
            examples.append(Example(
                uid=uids[row],
                index=row,
                question=self.build_question(question, values) if question else "",
                target=majority_answer(answers),
                fields=fields,
                image_loader=image_loader(table, row),
                base_dir=loaded.base_dir,
                error=None if question and str(question).strip() else "missing field: question",
            ))
        return examples

    def score(self, parsed: str | None, example: Example) -> float | None:
        answers = example.fields.get("answers")
        return vqa_accuracy(parsed, answers, normalized=True) if answers else None

    def is_correct(self, parsed: str | None, example: Example) -> bool:
        # The plain VQA rule: an answer is right when at least 3 of the humans gave it.
        return human_matches(parsed, example.fields.get("answers") or [], normalized=True) >= 3

    # ------------------------------------------------------------------------------- submission, metrics

    def submission_entry(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"question_id": row.get("question_id"), "answer": row.get("parsed") or ""}

    def finalize(self, run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        path = run_dir / SUBMISSION_JSON
        write_json_atomic(path, [self.submission_entry(r) for r in rows])
        self.submission_path = str(path)
        return rows

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r for r in rows if r.get("answers")]
        metrics: dict[str, Any] = {"n": len(rows), "scored_n": len(scored)}
        if not scored:
            metrics.update(accuracy=None, scored=False,
                           note="no human answers in this split: submit submission.json to the benchmark server")
        else:
            accs = [vqa_accuracy(r.get("parsed"), r["answers"], normalized=True) for r in scored]
            metrics.update(accuracy=mean(accs), scored=True)
            if self.type_column:
                groups: dict[str, list[float]] = defaultdict(list)
                for r, acc in zip(scored, accs, strict=True):
                    groups[str(r.get(self.type_column))].append(acc)
                metrics["per_type"] = {k: {"n": len(v), "accuracy": mean(v)} for k, v in sorted(groups.items())}
        metrics["submission_file"] = self.submission_path
        metrics["protocol"] = ("VQA accuracy: mean over the 10 leave-one-out subsets of min(#humans/3, 1), "
                               "answers normalised as the official VQA/EvalAI evaluation")
        return metrics

    def summary_table(self, metrics: dict[str, Any]) -> str:
        lines = ["| group | n | VQA accuracy |", "|---|---|---|"]
        acc = metrics.get("accuracy")
        lines.append(f"| **overall** | {metrics.get('scored_n', 0)} | "
                     f"**{'not scored (test split)' if acc is None else f'{acc:.4f}'}** |")
        for name, m in metrics.get("per_type", {}).items():
            lines.append(f"| {self.type_column}: {name} | {m['n']} | {m['accuracy']:.4f} |")
        if metrics.get("submission_file"):
            lines.append(f"| submission | {metrics['n']} | `{metrics['submission_file']}` |")
        return "\n".join(lines)


class TextVQATask(VqaTask):
    name = "textvqa"
    label = "TextVQA"
    default_dataset = "lmms-lab/textvqa"
    default_split = "validation"
    extra_columns = ("ocr_tokens",)
    use_ocr: ClassVar[bool] = True

    def build_question(self, question: str, values: dict[str, Any]) -> str:
        tokens = [str(t) for t in values.get("ocr_tokens") or []]
        if self.use_ocr and tokens:
            return f"{question}\nReference OCR token: {', '.join(tokens)}{VQA_INSTRUCTION}"
        return f"{question}{VQA_INSTRUCTION}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ocr_tokens_in_prompt": self.use_ocr}


class TextVQANoOcrTask(TextVQATask):
    name = "textvqa_noocr"
    use_ocr = False


class VQAv2Task(VqaTask):
    name = "vqav2"
    label = "VQAv2"
    default_dataset = "lmms-lab/VQAv2"
    default_split = "validation"
    type_column = "answer_type"


class VizWizTask(VqaTask):
    name = "vizwiz"
    label = "VizWiz-VQA"
    default_dataset = "lmms-lab/VizWiz-VQA"
    default_split = "val"
    type_column = "category"

    def build_question(self, question: str, values: dict[str, Any]) -> str:
        return f"{question}{VIZWIZ_INSTRUCTION}{VQA_INSTRUCTION}"

    def submission_entry(self, row: dict[str, Any]) -> dict[str, Any]:
        # The VizWiz server keys answers by image file name; lmms-lab's question ids are those names' stems.
        qid = str(row.get("question_id"))
        return {"image": qid if qid.endswith(".jpg") else f"{qid}.jpg", "answer": row.get("parsed") or ""}

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        metrics = super().summarize(rows)
        scored = [r for r in rows if r.get("answers")]
        if scored:
            unanswerable = [r for r in scored if majority_answer(r["answers"]) == "unanswerable"]
            metrics["unanswerable"] = {
                "n": len(unanswerable),
                "accuracy": mean(vqa_accuracy(r.get("parsed"), r["answers"], normalized=True)
                                 for r in unanswerable) if unanswerable else None,
                "predicted_unanswerable_rate": mean(r.get("parsed") == "unanswerable" for r in scored),
            }
        return metrics
