"""MME (Fu et al., 2023): yes/no questions, two per image, in 10 perception and 4 cognition subtasks.

Data: `lmms-lab/MME`, split `test` (2,374 questions; columns question_id = the image path, question, answer
"Yes"/"No", category = the subtask, image), or a local parquet/folder with those columns.
Prompt (LLaVA-1.5, as lmms-eval reproduces it): the question without its " Please answer yes or no." plus
"\\nAnswer the question using a single word or phrase.". Parsing: the official MME `calculation.py` rule
("yes"/"no" exactly, else whichever of them starts the answer's first four characters; anything else is
wrong). Per subtask: acc (% of questions right), acc+ (% of images with both questions right) and
score = acc + acc+ (at most 200).

Papers mix two totals, so both are named: `perception_score` (sum over the 10 perception subtasks, at most
2000: the "MME" column of LLaVA-1.5 and most pruning papers, e.g. 1510.7 for LLaVA-1.5-7B) and `total_score`
(perception + cognition, at most 2800). `cognition_score` is reported too; `accuracy` is the plain
per-question accuracy over all subtasks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

from vtprune.eval.metrics import accuracy
from vtprune.eval.tasks.base import Example, Task, columns, image_loader, load_table

MME_INSTRUCTION = "\nAnswer the question using a single word or phrase."
MME_SUFFIX = " Please answer yes or no."
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no_mme(text: str) -> str | None:
    """MME's calculation.py: exact yes/no, else "yes"/"no" within the first four characters, else None."""
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return None


def parse_yes_no_exact(text: str) -> str | None:
    answer = text.strip().lower().rstrip(".")
    return answer if answer in ("yes", "no") else None


def mme_question(question: str) -> str:
    return f"{question.strip().replace(MME_SUFFIX, '')}{MME_INSTRUCTION}"


def mme_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """acc, acc+ and score per subtask, and the perception / cognition / total sums (rows: category,
    image (the pair key) and correct)."""
    pairs: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        pairs[str(r.get("category"))][str(r.get("image_key"))].append(bool(r.get("correct")))
    per: dict[str, dict[str, Any]] = {}
    for category in sorted(pairs):
        images = pairs[category]
        answers = [c for cs in images.values() for c in cs]
        acc = 100.0 * sum(answers) / len(answers)
        # acc+ needs both questions of an image right; an image with one question left is counted as asked
        acc_plus = 100.0 * sum(all(cs) and len(cs) >= 2 for cs in images.values()) / len(images)
        per[category] = {"n": len(answers), "images": len(images), "acc": acc, "acc_plus": acc_plus,
                         "score": acc + acc_plus}
    perception = sum(per[c]["score"] for c in PERCEPTION if c in per)
    cognition = sum(per[c]["score"] for c in COGNITION if c in per)
    return {
        "perception_score": perception,
        "cognition_score": cognition,
        "total_score": perception + cognition,
        "perception_subtasks": [c for c in PERCEPTION if c in per],
        "cognition_subtasks": [c for c in COGNITION if c in per],
        "unknown_subtasks": [c for c in per if c not in PERCEPTION and c not in COGNITION],
        "per_subtask": per,
    }


class MMETask(Task):
    name = "mme"
    default_dataset = "lmms-lab/MME"
    default_split = "test"
    parsers = {"mme": parse_yes_no_mme, "exact": parse_yes_no_exact}
    default_parser = "mme"
    default_max_new_tokens = 128
    primary_metric = "perception_score"
    required_columns: ClassVar[tuple[str, ...]] = ("question_id", "question", "answer", "category", "image")

    def load(self, limit: int | None = None) -> list[Example]:
        loaded = load_table(self, "MME")
        table = loaded.table
        n = table.num_rows if limit is None else min(limit, table.num_rows)
        cols = columns(table, ("question_id", "question", "answer", "category"), n)
        seen: dict[str, int] = defaultdict(int)
        examples = []
        for row in range(n):
            qid, question, answer, category = (cols[c][row] for c in ("question_id", "question", "answer", "category"))
            image_key = f"{category}/{qid}"
            k = seen[image_key]  # the two questions of an image share its question_id
            seen[image_key] += 1
            target = str(answer).strip().lower().rstrip(".") if answer is not None else ""
            error = None
            if not question:
                error = "missing field: question"
            elif target not in ("yes", "no"):
                error = f"bad target: answer {answer!r} is not Yes/No"
            examples.append(Example(
                uid=f"{self.split}/{image_key}#{k}",
                index=row,
                question=mme_question(question) if question else "",
                target=target,
                fields={"split": self.split, "question_id": qid, "question": question, "category": category,
                        "image_key": image_key},
                image_loader=image_loader(table, row),
                base_dir=loaded.base_dir,
                error=error,
            ))
        return examples

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        overall = accuracy(r.get("correct") for r in rows)
        scores = mme_scores(rows) if rows else {"perception_score": 0.0, "cognition_score": 0.0,
                                                 "total_score": 0.0, "per_subtask": {}}
        return {
            "n": overall["n"],
            "perception_score": scores["perception_score"],
            "cognition_score": scores["cognition_score"],
            "total_score": scores["total_score"],
            "accuracy": overall["accuracy"],
            "unparsed": sum(1 for r in rows if r.get("parsed") is None),
            **{k: v for k, v in scores.items() if k not in ("perception_score", "cognition_score", "total_score")},
            "protocol": (f"parser={self.parser}; per subtask score = acc + acc+ (%); perception_score = sum of the "
                         "10 perception subtasks (max 2000, the usual 'MME' column); total_score = perception + "
                         "cognition (max 2800)"),
        }

    def summary_table(self, metrics: dict[str, Any]) -> str:
        lines = ["| subtask | n | acc | acc+ | score |", "|---|---|---|---|---|"]
        for name, m in metrics.get("per_subtask", {}).items():
            lines.append(f"| {name} | {m['n']} | {m['acc']:.2f} | {m['acc_plus']:.2f} | {m['score']:.2f} |")
        lines.append(f"| **perception score** (max 2000) | | | | **{metrics['perception_score']:.2f}** |")
        lines.append(f"| cognition score (max 800) | | | | {metrics['cognition_score']:.2f} |")
        lines.append(f"| total score (perception + cognition) | | | | {metrics['total_score']:.2f} |")
        return "\n".join(lines)
