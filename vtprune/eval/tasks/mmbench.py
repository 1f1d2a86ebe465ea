"""MMBench and MMBench-CN (Liu et al., 2023): multiple-choice questions scored with CircularEval.

Data: `lmms-lab/MMBench`, config `en` (`mmbench`) or `cn` (`mmbench_cn`), split `dev` (scored) or `test`
(answers withheld: the submission file only); columns index, question, hint, A..D, answer, category,
L2-category, image; or a local parquet/folder with them.

CircularEval: each question is asked once per rotation of its options (ABCD, BCDA, CDAB, DABC) and counts as
right only if every rotation is answered right. MMBench's own files already hold the rotated copies (index +
k * 1,000,000), as lmms-lab's do; they are asked as they are and grouped by index mod 1,000,000. A file without
copies gets its rotations generated here (LLaVA's `--all-rounds`). `single_pass_accuracy` scores only the
original order (rotation 0).
Prompt (LLaVA-1.5 `model_vqa_mmbench.py --single-pred-prompt`): "{hint}\\n" when there is one, the question,
"\\nA. ..." per option, then "\\nAnswer with the option's letter from the given choices directly." (CN:
"\\n请直接回答选项字母。"). Parsing (no LLM): the letter forms of `parsers.parse_letter_lenient`, else the one
option whose text the answer contains (MMBench's rule before it falls back to ChatGPT).
Every run writes `submission.tsv` (and `submission.xlsx` when openpyxl is installed) with the raw predictions,
the file the MMBench server takes.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

from vtprune.eval.errors import DatasetError
from vtprune.eval.metrics import accuracy
from vtprune.eval.parsers import OPTION_LETTERS, parse_letter_lenient
from vtprune.eval.store import write_text_atomic
from vtprune.eval.tasks.base import Example, Task, columns, image_loader, load_table

MMBENCH_INSTRUCTION = {"en": "\nAnswer with the option's letter from the given choices directly.",
                       "cn": "\n请直接回答选项字母。"}
CIRCULAR_OFFSET = 1_000_000


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() != "" and str(value).strip().lower() not in ("nan", "none")


def mmbench_question(question: str, hint: Any, options: list[str], lang: str) -> str:
    text = f"{hint}\n{question}" if _present(hint) else question
    for letter, option in zip(OPTION_LETTERS, options, strict=False):
        text += f"\n{letter}. {option}"
    return text + MMBENCH_INSTRUCTION[lang]


def parse_option(text: str, options: list[str]) -> str | None:
    """A letter answer, else the single option whose text appears in the answer (case-insensitive)."""
    letter = parse_letter_lenient(text, len(options))
    if letter is not None:
        return letter
    lowered = text.lower()
    hits = [OPTION_LETTERS[i] for i, option in enumerate(options) if str(option).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def parse_letter(text: str, options: list[str]) -> str | None:
    return parse_letter_lenient(text, len(options))


def circular_scores(rows: list[dict[str, Any]], key: str = "category") -> dict[str, Any]:
    """CircularEval over rows with `group`, `rotations` (expected passes) and `correct`: a question is right
    when all its expected passes are present and right."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    verdicts = {g: len(rs) >= int(rs[0].get("rotations") or 1) and all(r.get("correct") for r in rs)
                for g, rs in groups.items()}
    per: dict[str, list[bool]] = defaultdict(list)
    for g, rs in groups.items():
        per[str(rs[0].get(key))].append(verdicts[g])
    overall = accuracy(verdicts.values())
    return {"questions": overall["n"], "accuracy": overall["accuracy"],
            f"per_{key}": {k: accuracy(v) for k, v in sorted(per.items())}}


class MMBenchTask(Task):
    name = "mmbench"
    default_dataset = "lmms-lab/MMBench"
    default_config = "en"
    default_split = "dev"
    parsers = {"option": parse_option, "letter": parse_letter}
    default_parser = "option"
    default_max_new_tokens = 128
    primary_metric = "circular_accuracy"
    required_columns: ClassVar[tuple[str, ...]] = ("index", "question", "A", "B", "image")
    lang: ClassVar[str] = "en"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submission_paths: list[str] = []
        self.circular_mode: str | None = None

    def load(self, limit: int | None = None) -> list[Example]:
        loaded = load_table(self, "MMBench-CN" if self.lang == "cn" else "MMBench")
        table = loaded.table
        l2 = "L2-category" if "L2-category" in table.column_names else "l2-category"
        names = ("index", "question", "hint", *OPTION_LETTERS, "answer", "category", l2, "split")
        cols = columns(table, names, table.num_rows)
        try:
            indices = [int(i) for i in cols["index"]]
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"MMBench data {self.dataset!r}: every row needs an integer `index` ({exc})") from exc
        has_copies = any(i >= CIRCULAR_OFFSET for i in indices)
        self.circular_mode = "copies in the data" if has_copies else "rotations generated"
        group_size: dict[int, int] = defaultdict(int)
        for i in indices:
            group_size[i % CIRCULAR_OFFSET] += 1
        # `limit` counts questions (with all their passes), so a limited run is still CircularEval-complete.
        wanted = list(dict.fromkeys(i % CIRCULAR_OFFSET for i in indices))
        wanted = set(wanted if limit is None else wanted[:limit])
        examples = []
        for row, index in enumerate(indices):
            group = index % CIRCULAR_OFFSET
            if group not in wanted:
                continue
            options = []
            for letter in OPTION_LETTERS:  # options stop at the first empty letter, as in LLaVA
                if not _present(cols[letter][row]):
                    break
                options.append(str(cols[letter][row]))
            answer = cols["answer"][row]
            answer = str(answer).strip().upper() if _present(answer) else ""
            base = {"split": self.split, "question_index": index, "group": group, "question": cols["question"][row],
                    "category": cols["category"][row], "l2_category": cols[l2][row]}
            if has_copies or not answer:  # copies in the data, or a test file: one pass per row
                passes = [(0, options, answer)]
                rotations = group_size[group]
            else:
                rotations = len(options)
                passes = []
                for r in range(rotations):
                    rotated = options[r:] + options[:r]
                    target = OPTION_LETTERS[(OPTION_LETTERS.index(answer) - r) % rotations] \
                        if answer in OPTION_LETTERS[:rotations] else ""
                    passes.append((r, rotated, target))
            for rotation, opts, target in passes:
                error = None
                if len(opts) < 2:
                    error = "missing field: fewer than two options"
                elif answer and target not in OPTION_LETTERS[: len(opts)]:
                    error = f"bad target: answer {answer!r} is not one of {len(opts)} options"
                uid = f"{self.split}/{index}" if has_copies or not answer else f"{self.split}/{index}/r{rotation}"
                examples.append(Example(
                    uid=uid,
                    index=row * len(OPTION_LETTERS) + rotation,  # stable whatever the limit
                    question=mmbench_question(str(cols["question"][row]), cols["hint"][row], opts, self.lang),
                    target=target,
                    fields={**base, "rotation": index // CIRCULAR_OFFSET if has_copies else rotation,
                            "rotations": rotations, "options": opts},
                    image_loader=image_loader(table, row),
                    base_dir=loaded.base_dir,
                    num_choices=len(opts),
                    error=error,
                ))
        return examples

    def parse(self, text: str, example: Example) -> str | None:
        return self.parsers[self.parser](text, example.fields.get("options") or [])

    def is_correct(self, parsed: str | None, example: Example) -> bool:
        return bool(example.target) and parsed == example.target

    # ------------------------------------------------------------------------------- submission, metrics

    def finalize(self, run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        header = ["index", "question", *OPTION_LETTERS[:4], "prediction", "answer", "category", "l2-category",
                  "split", "rotation"]
        table = []
        for r in rows:
            options = list(r.get("options") or []) + [""] * 4
            table.append([r.get("question_index"), r.get("question"), *options[:4], r.get("prediction") or "",
                          r.get("target") or "", r.get("category"), r.get("l2_category"), r.get("split"),
                          r.get("rotation")])
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(table)
        tsv = run_dir / "submission.tsv"
        write_text_atomic(tsv, buffer.getvalue())
        self.submission_paths = [str(tsv)]
        try:
            import pandas as pd

            xlsx = run_dir / "submission.xlsx"
            tmp = run_dir / ".submission.xlsx.tmp"
            pd.DataFrame(table, columns=header).to_excel(tmp, index=False, engine="openpyxl")
            tmp.replace(xlsx)
            self.submission_paths.append(str(xlsx))
        except ImportError:  # openpyxl (or pandas) absent: the TSV holds the same table
            pass
        return rows

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r for r in rows if r.get("target")]
        metrics: dict[str, Any] = {"n": len(rows), "circular_mode": self.circular_mode}
        if not scored:
            metrics.update(circular_accuracy=None, accuracy=None, scored=False,
                           note="no answers in this split: submit submission.xlsx/.tsv to the MMBench server")
        else:
            circular = circular_scores(scored)
            first = accuracy(r.get("correct") for r in scored if not r.get("rotation"))
            metrics.update(
                scored=True,
                circular_accuracy=circular["accuracy"],
                accuracy=circular["accuracy"],
                questions=circular["questions"],
                single_pass_accuracy=first["accuracy"],
                per_category=circular["per_category"],
                per_l2_category=circular_scores(scored, "l2_category")["per_l2_category"],
                unparsed=sum(1 for r in scored if r.get("parsed") is None),
            )
        metrics["submission_files"] = self.submission_paths
        metrics["protocol"] = (f"parser={self.parser}; CircularEval: a question is right only if every rotation "
                               "of its options is; accuracy = circular_accuracy")
        return metrics

    def summary_table(self, metrics: dict[str, Any]) -> str:
        lines = ["| group | questions | CircularEval accuracy |", "|---|---|---|"]
        if metrics.get("circular_accuracy") is None:
            lines.append(f"| **overall** | {metrics['n']} rows | **not scored (no answers)** |")
        else:
            lines.append(f"| **overall** | {metrics['questions']} | **{metrics['circular_accuracy']:.4f}** |")
            lines.append(f"| single pass (original order) | | {metrics['single_pass_accuracy']:.4f} |")
            for name, m in metrics.get("per_category", {}).items():
                lines.append(f"| {name} | {m['n']} | {m['accuracy']:.4f} |")
        for path in metrics.get("submission_files", []):
            lines.append(f"| submission | | `{path}` |")
        return "\n".join(lines)


class MMBenchCNTask(MMBenchTask):
    name = "mmbench_cn"
    default_config = "cn"
    lang = "cn"
