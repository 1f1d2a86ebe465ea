"""MM-Vet (Yu et al., 2023): 218 open-ended questions graded 0..1 by an LLM against a reference answer.

Data: `lmms-lab/MMVet`, split `test` (question_id "v1_N", question, answer, capability "rec,ocr,...", image),
or a local parquet/folder with those columns. Prompt (LLaVA-1.5 `model_vqa.py`): the question alone (a
natural-language answer, so `max_new_tokens` defaults to 1024).

Every run writes `submission.json` ({"v1_0": answer, ...}, LLaVA's `convert_mmvet_for_eval.py` format) in the
run folder, for MM-Vet's official grader. vtprune scores only through a judge the user configures
(`vtprune.eval.judge`, e.g. VTPRUNE_JUDGE_BASE_URL + VTPRUNE_JUDGE_MODEL): each answer is graded with MM-Vet's
grader prompt, the grades are appended to `judge-<model>.jsonl` in the run folder (a re-run asks only what is
missing, and a different judge gets its own file), and the summary reports the mean grade x 100 overall and
per capability. Without a judge the summary says that no score was computed; nothing is guessed. A reply that
is not a number in [0, 1] after five tries (temperature raised each time, as MM-Vet's grader does) counts 0,
and is counted in `judge_failed`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any, ClassVar

from vtprune.eval.judge import OpenAICompatibleJudge
from vtprune.eval.store import SampleWriter, write_json_atomic
from vtprune.eval.tasks.base import Example, Task, columns, image_loader, load_table, unique_ids

CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
JUDGE_TEMPERATURES = (0.0, 0.5, 1.0, 1.5, 2.0)

# MM-Vet's grader prompt, quoted as data from the benchmark's evaluator (github.com/yuweihao/MM-Vet,
# mm-vet_evaluator): the benchmark defines its metric by this text and these in-context examples, so grades
# are comparable across papers only with it.
GRADER_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""


def grader_query(question: str, answer: str, prediction: str) -> str:
    """The full judge prompt for one sample."""
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    # MM-Vet's grader: the prompt, a newline, then the sample's row left open for the grade ("... | pred | ").
    return GRADER_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def read_grade(reply: str) -> float | None:
    """The grade at the start of the judge's reply, if it is a number in [0, 1]."""
    match = re.match(r"\s*([0-9]*\.?[0-9]+)", reply)
    if not match:
        return None
    value = float(match.group(1))
    return value if 0.0 <= value <= 1.0 else None


def submission_key(question_id: Any) -> str:
    qid = str(question_id)
    return qid if qid.startswith("v1_") else f"v1_{qid}"


class MMVetTask(Task):
    name = "mmvet"
    default_dataset = "lmms-lab/MMVet"
    default_split = "test"
    parsers = {"raw": lambda text: text.strip()}
    default_parser = "raw"
    default_max_new_tokens = 1024
    primary_metric = "gpt_score"
    required_columns: ClassVar[tuple[str, ...]] = ("question", "answer", "image")

    def __init__(self, *args: Any, judge: OpenAICompatibleJudge | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.judge = judge
        self.submission_path: str | None = None
        self.judge_file: str | None = None
        self.judge_error: str | None = None

    def load(self, limit: int | None = None) -> list[Example]:
        loaded = load_table(self, "MM-Vet")
        table = loaded.table
        n = table.num_rows if limit is None else min(limit, table.num_rows)
        cols = columns(table, ("question_id", "question", "answer", "capability"), n)
        qids = [q if q is not None else f"v1_{row}" for row, q in enumerate(cols["question_id"])]
        uids = unique_ids(qids, self.split)
        return [
            Example(
                uid=uids[row],
                index=row,
                question=str(cols["question"][row] or ""),
                target=str(cols["answer"][row] or ""),
                fields={"split": self.split, "question_id": qids[row], "question": cols["question"][row],
                        "answer": cols["answer"][row], "capability": cols["capability"][row]},
                image_loader=image_loader(table, row),
                base_dir=loaded.base_dir,
                error=None if cols["question"][row] else "missing field: question",
            )
            for row in range(n)
        ]

    def is_correct(self, parsed: str | None, example: Example) -> bool:
        return False  # graded only by the judge (`judge_score`), never by string match

    # ------------------------------------------------------------------------------- submission, judge

    def finalize(self, run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        path = run_dir / "submission.json"
        write_json_atomic(path, {submission_key(r.get("question_id")): r.get("prediction") or "" for r in rows})
        self.submission_path = str(path)
        judge = self.judge or OpenAICompatibleJudge.from_env()
        if judge is None:
            return rows
        return self._grade(judge, run_dir, rows)

    def _grade(self, judge: OpenAICompatibleJudge, run_dir: Path, rows: list[dict[str, Any]]) -> list[dict]:
        cache_path = run_dir / f"judge-{re.sub(r'[^A-Za-z0-9._-]+', '_', judge.model)}.jsonl"
        self.judge_file = str(cache_path)
        grades: dict[str, dict[str, Any]] = {}
        if cache_path.exists():
            for line in cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a killed run: graded again
                    continue
                if entry.get("judge") == judge.name:
                    grades[entry["id"]] = entry
        with SampleWriter(cache_path) as cache:  # each grade fsynced as it comes: a grade paid for is kept
            for r in rows:
                if r.get("error") or r["id"] in grades:
                    continue
                try:
                    entry = self._grade_one(judge, r)
                except RuntimeError as exc:  # endpoint down: keep what is graded, say why the rest is not
                    self.judge_error = str(exc)
                    break
                cache.write(entry)
                grades[r["id"]] = entry
        return [{**r, "judge_score": grades[r["id"]]["score"], "judge_failed": grades[r["id"]]["failed"],
                 "judge": grades[r["id"]]["judge"]} if r["id"] in grades else r for r in rows]

    def _grade_one(self, judge: OpenAICompatibleJudge, row: dict[str, Any]) -> dict[str, Any]:
        prompt = grader_query(str(row.get("question")), str(row.get("answer")), str(row.get("prediction") or ""))
        replies = []
        for temperature in JUDGE_TEMPERATURES:
            reply = judge.complete(prompt, temperature=temperature)
            replies.append(reply)
            grade = read_grade(reply)
            if grade is not None:
                return {"id": row["id"], "judge": judge.name, "score": grade, "failed": False, "reply": reply}
        return {"id": row["id"], "judge": judge.name, "score": 0.0, "failed": True, "reply": replies[-1]}

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        graded = [r for r in rows if r.get("judge_score") is not None]
        metrics: dict[str, Any] = {"n": len(rows), "submission_file": self.submission_path}
        if not graded or len(graded) < len(rows):
            metrics.update(
                gpt_score=None, accuracy=None, scored=False, graded=len(graded),
                note=("not scored: MM-Vet is graded by an LLM judge and none is configured; set "
                      "VTPRUNE_JUDGE_BASE_URL and VTPRUNE_JUDGE_MODEL (an OpenAI-compatible endpoint) and run "
                      "the same command again, or grade submission.json with MM-Vet's official grader")
                if not graded and self.judge_error is None
                else f"only {len(graded)} of {len(rows)} answers graded"
                + (f"; judge error: {self.judge_error}" if self.judge_error else ""),
            )
            return metrics
        per_cap: dict[str, list[float]] = defaultdict(list)
        for r in graded:
            caps = {c.strip() for c in str(r.get("capability") or "").split(",")}
            for cap in CAPABILITIES:
                if cap in caps:
                    per_cap[cap].append(r["judge_score"])
        score = 100.0 * mean(r["judge_score"] for r in graded)
        metrics.update(
            scored=True, graded=len(graded), gpt_score=score, accuracy=score / 100.0,
            judge=graded[0].get("judge"), judge_file=self.judge_file,
            judge_failed=sum(1 for r in graded if r.get("judge_failed")),
            per_capability={c: {"n": len(v), "score": 100.0 * mean(v)} for c, v in per_cap.items()},
        )
        return metrics

    def summary_table(self, metrics: dict[str, Any]) -> str:
        lines = ["| group | n | MM-Vet score |", "|---|---|---|"]
        if metrics.get("gpt_score") is None:
            lines.append(f"| **overall** | {metrics['n']} | **{metrics.get('note')}** |")
        else:
            lines.append(f"| **overall** | {metrics['graded']} | **{metrics['gpt_score']:.2f}** |")
            for cap, m in metrics.get("per_capability", {}).items():
                lines.append(f"| {cap} | {m['n']} | {m['score']:.2f} |")
        if metrics.get("submission_file"):
            lines.append(f"| submission | {metrics['n']} | `{metrics['submission_file']}` |")
        return "\n".join(lines)
