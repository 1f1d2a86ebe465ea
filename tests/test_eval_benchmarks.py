"""The LLaVA-1.5 benchmark tasks on tiny fixtures in the lmms-lab schemas, and their metrics by hand:
the VQA normaliser and VQA accuracy, GQA exact match, MME acc / acc+ / scores, MMBench CircularEval,
submission files, and MM-Vet's judge (a local stand-in server; never a made-up score)."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pyarrow as pa
import pytest

from vtprune.eval import DatasetError, get_task
from vtprune.eval.judge import ENV_BASE_URL, ENV_MODEL, OpenAICompatibleJudge
from vtprune.eval.tasks import registry
from vtprune.eval.tasks.mmbench import circular_scores, parse_option
from vtprune.eval.tasks.mme import mme_scores, parse_yes_no_mme
from vtprune.eval.tasks.mmvet import read_grade
from vtprune.eval.tiny_data import (
    IMAGE_TYPE,
    mmbench_rows,
    mmbench_schema,
    write_gqa_hub_folder,
    write_mmbench_hub_folder,
    write_mme_hub_folder,
    write_mmvet_hub_folder,
    write_table,
    write_textvqa_hub_folder,
    write_vizwiz_hub_folder,
    write_vqav2_hub_folder,
)
from vtprune.eval.vqa_answers import normalize_answer, vqa_accuracy


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_data")
    write_gqa_hub_folder(root / "gqa")
    write_textvqa_hub_folder(root / "textvqa")
    write_vqav2_hub_folder(root / "vqav2")
    write_vizwiz_hub_folder(root / "vizwiz")
    write_mme_hub_folder(root / "mme")
    write_mmbench_hub_folder(root / "mmbench")
    write_mmvet_hub_folder(root / "mmvet")
    return root


def _rows(task, examples, answers: list[str]) -> list[dict]:
    """Result rows as the runner writes them, for the given model answers."""
    rows = []
    for ex, text in zip(examples, answers, strict=True):
        parsed = task.parse(text, ex)
        row = {"id": ex.uid, "index": ex.index, **ex.fields, "prediction": text, "parsed": parsed,
               "target": ex.target, "correct": task.is_correct(parsed, ex), "error": None}
        score = task.score(parsed, ex)
        if score is not None:
            row["score"] = score
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ normaliser


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The dog.", "dog"),  # article, final full stop, case
        ("an apple", "apple"),
        ("Two", "2"),  # number words
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("isnt it", "isn't it"),
        ("couldnt've", "couldn't've"),
        ("yes!", "yes"),  # punctuation touching nothing else is replaced by a space, then trimmed
        ("hot-dog", "hot dog"),
        ("hot - dog", "hot dog"),  # touching a space: removed
        ("1,000", "1000"),  # digit-comma-digit: commas dropped
        ("2.5", "2.5"),  # a decimal point stays
        ("a man's hat", "man 's hat"),  # "'s" split off
        ("What?", "what"),
        ("  Left\n", "left"),
    ],
)
def test_vqa_normaliser(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(k: int, expected: float) -> None:
    # leave-one-out over 10 humans: k matching -> (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_reads_dicts() -> None:
    answers = [{"answer": "A Cup.", "answer_id": i} for i in range(4)] + [{"answer": "mug"}] * 6
    assert vqa_accuracy("cup", answers) == pytest.approx(1.0)
    assert vqa_accuracy("mug", answers) == pytest.approx(1.0)
    assert vqa_accuracy(None, answers) == 0.0 and vqa_accuracy("cup", []) == 0.0


# ------------------------------------------------------------------------------------------ VQA tasks


def test_textvqa_prompts_with_and_without_ocr(data: Path) -> None:
    ocr = get_task("textvqa", dataset=str(data / "textvqa")).load()
    plain = get_task("textvqa_noocr", dataset=str(data / "textvqa")).load()
    assert ocr[0].question == ("what does sign 0 say?\nReference OCR token: stop, sign\n"
                               "Answer the question using a single word or phrase.")
    assert ocr[2].question == "what does sign 2 say?\nAnswer the question using a single word or phrase."
    assert plain[0].question == "what does sign 0 say?\nAnswer the question using a single word or phrase."
    assert get_task("textvqa", dataset="x").describe()["ocr_tokens_in_prompt"] is True
    assert get_task("textvqa_noocr", dataset="x").describe()["ocr_tokens_in_prompt"] is False


def test_textvqa_scores_and_submission(data: Path, tmp_path: Path) -> None:
    task = get_task("textvqa", dataset=str(data / "textvqa"))
    examples = task.load()  # "stop" given by 1, 2, 3 of the 10 humans
    rows = _rows(task, examples, ["Stop.", "stop", "STOP"])
    assert [r["score"] for r in rows] == pytest.approx([0.3, 0.6, 0.9])
    assert [r["correct"] for r in rows] == [False, False, True]  # plain rule: >= 3 humans
    rows = task.finalize(tmp_path, rows)
    m = task.summarize(rows)
    assert m["accuracy"] == pytest.approx(0.6) and m["scored"] is True
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert sub == [{"question_id": 34602 + i, "answer": "stop"} for i in range(3)]


def test_textvqa_test_split_only_writes_submission(data: Path, tmp_path: Path) -> None:
    task = get_task("textvqa", dataset=str(data / "textvqa"), split="test")
    examples = task.load()
    rows = _rows(task, examples, ["Exit", "two"])
    assert all("score" not in r and not r["correct"] for r in rows)
    task.finalize(tmp_path, rows)
    m = task.summarize(rows)
    assert m["accuracy"] is None and m["scored"] is False and "submission.json" in m["submission_file"]
    assert json.loads((tmp_path / "submission.json").read_text())[1] == {"question_id": 39603, "answer": "2"}
    assert "not scored" in task.summary_table(m)


def test_vqav2_answer_types_and_testdev_submission(data: Path, tmp_path: Path) -> None:
    task = get_task("vqav2", dataset=str(data / "vqav2"))
    examples = task.load()
    assert examples[0].fields["answers"] == ["yes"] * 10  # read from the {answer, ...} structs
    rows = _rows(task, examples, ["Yes", "Two", "a cup", "blue"])  # 1.0, 0.6, 1.0 (4 humans), 0.0
    m = task.summarize(task.finalize(tmp_path, rows))
    assert m["accuracy"] == pytest.approx((1 + 0.6 + 1 + 0) / 4)
    assert m["per_type"]["yes/no"]["accuracy"] == 1.0 and m["per_type"]["number"]["accuracy"] == pytest.approx(0.6)
    assert m["per_type"]["other"]["n"] == 2
    testdev = get_task("vqav2", dataset=str(data / "vqav2"), split="testdev")
    rows = _rows(testdev, testdev.load(), ["It's a dog.", "none"])
    rows[1] = {**rows[1], "parsed": None, "error": "generation failed: boom"}  # a failed sample gets ""
    testdev.finalize(tmp_path, rows)
    assert json.loads((tmp_path / "submission.json").read_text()) == [
        {"question_id": 8000000, "answer": "it 's dog"}, {"question_id": 8000001, "answer": ""}]


def test_vizwiz_unanswerable_and_submission(data: Path, tmp_path: Path) -> None:
    task = get_task("vizwiz", dataset=str(data / "vizwiz"))
    examples = task.load()
    assert examples[0].question.endswith(
        "When the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.")
    rows = _rows(task, examples, ["Unanswerable", "soup", "no"])  # 1.0, 1.0, 4 humans -> 1.0
    m = task.summarize(task.finalize(tmp_path, rows))
    assert m["accuracy"] == pytest.approx(1.0)
    assert m["unanswerable"] == {"n": 1, "accuracy": 1.0, "predicted_unanswerable_rate": pytest.approx(1 / 3)}
    assert m["per_type"]["unanswerable"]["n"] == 1
    test = get_task("vizwiz", dataset=str(data / "vizwiz"), split="test")
    test.finalize(tmp_path, _rows(test, test.load(), ["Blue.", "unanswerable"]))
    assert json.loads((tmp_path / "submission.json").read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "blue"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"}]


# ------------------------------------------------------------------------------------------ GQA


def test_gqa_joins_images_and_scores_exact_match(data: Path) -> None:
    task = get_task("gqa", dataset=str(data / "gqa"))
    examples = task.load()
    assert len(examples) == 4 and examples[1].fields["image_id"] == "n100"
    assert examples[0].question == "Is the shape 0 red?\nAnswer the question using a single word or phrase."
    assert examples[0].raw_image() == examples[1].raw_image()  # two questions on one image
    assert len(task.sources) == 2  # instructions + images configs
    rows = _rows(task, examples, ["Yes.", "Red", "no", "red."])
    assert [r["parsed"] for r in rows] == ["yes", "red", "no", "red"]
    m = task.summarize(rows)
    assert m["accuracy"] == 0.75
    assert m["per_kind"]["binary"]["accuracy"] == 0.5 and m["per_kind"]["open"]["accuracy"] == 1.0
    assert m["per_structural"]["verify"]["n"] == 2


def test_gqa_missing_image_is_a_sample_error(data: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(data / "gqa", tmp_path / "gqa")
    write_table(tmp_path / "gqa" / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
                [{"id": "n100", "image": {"bytes": b"x", "path": None}}],
                pa.schema([("id", pa.string()), ("image", IMAGE_TYPE)]))
    examples = get_task("gqa", dataset=str(tmp_path / "gqa")).load()
    assert examples[0].error is None and "imageId 'n101'" in examples[2].error


def test_gqa_questions_with_their_own_image_column(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                        ("image", IMAGE_TYPE)])
    image = {"bytes": b"png", "path": None}
    write_table(tmp_path / "gqa.parquet", [{"id": "1", "question": "Is it red?", "answer": "Yes", "image": image}],
                schema)
    (example,) = get_task("gqa", dataset=str(tmp_path / "gqa.parquet")).load()
    assert example.error is None and example.target == "yes" and example.raw_image() == image
    write_table(tmp_path / "bad.parquet", [{"id": "1", "question": "q", "answer": "a"}], schema.remove(3))
    with pytest.raises(DatasetError, match="neither an `image` nor an `imageId` column"):
        get_task("gqa", dataset=str(tmp_path / "bad.parquet")).load()


# ------------------------------------------------------------------------------------------ MME


def test_mme_parse_and_prompt(data: Path) -> None:
    assert [parse_yes_no_mme(t) for t in ("Yes", "No.", "yes, there is", "Not really", "maybe")] == \
        ["yes", "no", "yes", "no", None]
    examples = get_task("mme", dataset=str(data / "mme")).load()
    assert examples[0].question == "Is there a dog in this image?\nAnswer the question using a single word or phrase."
    assert [e.target for e in examples[:2]] == ["yes", "no"]
    assert examples[0].uid != examples[1].uid and examples[0].fields["image_key"] == examples[1].fields["image_key"]


def test_mme_acc_plus_and_named_totals(data: Path) -> None:
    task = get_task("mme", dataset=str(data / "mme"))
    examples = task.load()
    # existence image 1: both right; image 2: one right; code_reasoning: both right
    rows = _rows(task, examples, ["Yes", "No", "Yes", "Yes", "Yes", "No"])
    m = task.summarize(rows)
    existence = m["per_subtask"]["existence"]
    assert existence["acc"] == 75.0 and existence["acc_plus"] == 50.0 and existence["score"] == 125.0
    assert m["per_subtask"]["code_reasoning"]["score"] == 200.0
    assert m["perception_score"] == 125.0 and m["cognition_score"] == 200.0 and m["total_score"] == 325.0
    assert m["accuracy"] == pytest.approx(5 / 6)
    table = task.summary_table(m)
    assert "**perception score** (max 2000)" in table and "total score (perception + cognition)" in table
    assert mme_scores([{"category": "OCR", "image_key": "a", "correct": True}])["per_subtask"]["OCR"]["acc_plus"] == 0


# ------------------------------------------------------------------------------------------ MMBench


def test_circular_eval_by_hand() -> None:
    rows = [
        {"group": 1, "rotations": 2, "correct": True, "category": "a"},
        {"group": 1, "rotations": 2, "correct": True, "category": "a"},
        {"group": 2, "rotations": 2, "correct": True, "category": "a"},
        {"group": 2, "rotations": 2, "correct": False, "category": "a"},
        {"group": 3, "rotations": 3, "correct": True, "category": "b"},  # a rotation missing: not right
    ]
    m = circular_scores(rows)
    assert m["questions"] == 3 and m["accuracy"] == pytest.approx(1 / 3)
    assert m["per_category"]["a"]["accuracy"] == 0.5 and m["per_category"]["b"]["accuracy"] == 0.0


def test_mmbench_copies_in_data_grouped_circularly(data: Path, tmp_path: Path) -> None:
    task = get_task("mmbench", dataset=str(data / "mmbench"))
    examples = task.load()
    assert len(examples) == 4 + 3 + 2 and task.circular_mode == "copies in the data"
    assert examples[1].question.endswith("\nA. green\nB. blue\nC. yellow\nD. red\n"
                                         "Answer with the option's letter from the given choices directly.")
    assert [e.target for e in examples[:4]] == ["A", "D", "C", "B"]  # the answer "red" moves with the rotation
    answers = ["A", "D", "C", "B",  # question 0: every rotation right
               "B", "green", "A",  # question 1 (answer green): right, right by option text, wrong
               "A", "A"]  # question 2: only the first right
    m = task.summarize(task.finalize(tmp_path, _rows(task, examples, answers)))
    assert m["questions"] == 3 and m["circular_accuracy"] == pytest.approx(1 / 3)
    assert m["single_pass_accuracy"] == 1.0
    submission = (tmp_path / "submission.tsv").read_text().splitlines()
    assert submission[0].startswith("index\tquestion\tA\tB\tC\tD\tprediction") and len(submission) == 10
    assert submission[2].split("\t")[0] == "1000000"


def test_mmbench_rotations_generated_when_data_has_no_copies(tmp_path: Path) -> None:
    write_table(tmp_path / "dev.parquet", mmbench_rows(2, copies=False), mmbench_schema())
    task = get_task("mmbench", dataset=str(tmp_path / "dev.parquet"), split="dev")
    examples = task.load()
    assert task.circular_mode == "rotations generated" and len(examples) == 4 + 3
    assert [e.fields["options"] for e in examples[4:]] == [["red", "green", "blue"], ["green", "blue", "red"],
                                                            ["blue", "red", "green"]]
    assert [e.target for e in examples[4:]] == ["B", "A", "C"]  # "green" followed through the rotations
    assert examples[4].uid == "dev/1/r0" and len({e.uid for e in examples}) == 7
    assert len(task.load(limit=1)) == 4  # the limit counts questions, all their rotations kept


def test_mmbench_cn_prompt_test_split_and_parsers(data: Path, tmp_path: Path) -> None:
    cn = get_task("mmbench_cn", dataset=str(data / "mmbench")).load()
    assert cn[0].question.endswith("\nD. yellow\n请直接回答选项字母。")
    test = get_task("mmbench", dataset=str(data / "mmbench"), split="test")
    m = test.summarize(test.finalize(tmp_path, _rows(test, test.load(), ["A"] * 7)))
    assert m["circular_accuracy"] is None and m["scored"] is False
    assert parse_option("The answer is (B).", ["x", "y"]) == "B"
    assert parse_option("It looks blue to me", ["red", "blue"]) == "B"
    assert parse_option("red or blue", ["red", "blue"]) is None


# ------------------------------------------------------------------------------------------ MM-Vet


def test_mmvet_without_judge_is_not_scored(data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_BASE_URL, raising=False)
    monkeypatch.delenv(ENV_MODEL, raising=False)
    task = get_task("mmvet", dataset=str(data / "mmvet"))
    examples = task.load()
    assert examples[0].question == "What is shown 0?" and task.default_max_new_tokens == 1024
    rows = task.finalize(tmp_path, _rows(task, examples, ["x = -1", "crimson", "a cat"]))
    m = task.summarize(rows)
    assert m["gpt_score"] is None and m["scored"] is False and "not scored" in m["note"]
    assert json.loads((tmp_path / "submission.json").read_text()) == {"v1_0": "x = -1", "v1_1": "crimson",
                                                                        "v1_2": "a cat"}
    assert not list(tmp_path.glob("judge-*"))


def test_judge_half_configured_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv(ENV_MODEL, "m")
    monkeypatch.delenv(ENV_BASE_URL, raising=False)
    with pytest.raises(Exception, match="needs both"):
        OpenAICompatibleJudge.from_env()


def test_read_grade() -> None:
    assert [read_grade(t) for t in ("0.5", " 1.0 because", ".7", "2.0", "none")] == [0.5, 1.0, 0.7, None, None]


class _JudgeHandler(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible server: grades 1.0 when the prediction line contains "-1", else 0.2;
    the first request for "crimson" gets an unreadable reply (to exercise the retry)."""

    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        prompt = body["messages"][0]["content"].rsplit("\n", 1)[-1]
        if "crimson" in prompt and not any("crimson" in b["messages"][0]["content"].rsplit("\n", 1)[-1]
                                           for b in type(self).seen[:-1]):
            reply = "I think it is fine"
        else:
            reply = "1.0" if "-1" in prompt else "0.2"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_mmvet_with_a_configured_judge(data: Path, tmp_path: Path, monkeypatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), _JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(ENV_BASE_URL, f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv(ENV_MODEL, "stand-in")
        task = get_task("mmvet", dataset=str(data / "mmvet"))
        rows = task.finalize(tmp_path, _rows(task, task.load(), ["x = -1 or x = -5", "crimson", "a cat"]))
        m = task.summarize(rows)
        assert m["gpt_score"] == pytest.approx(100 * (1.0 + 0.2 + 0.2) / 3)
        assert m["per_capability"]["math"]["score"] == pytest.approx(100.0)
        assert m["per_capability"]["rec"]["score"] == pytest.approx(20.0)
        first = _JudgeHandler.seen[0]
        assert first["model"] == "stand-in" and first["temperature"] == 0.0
        assert "Compare the ground truth and prediction" in first["messages"][0]["content"]
        assert first["messages"][0]["content"].endswith("| 1.0\n\nWhat is shown 0? | -1 <AND> -5 | x = -1 or x = -5 | ")
        assert any(b["temperature"] == 0.5 for b in _JudgeHandler.seen)  # the unreadable reply was retried
        asked = len(_JudgeHandler.seen)
        (judge_file,) = tmp_path.glob("judge-stand-in.jsonl")
        assert len(judge_file.read_text().splitlines()) == 3
        again = get_task("mmvet", dataset=str(data / "mmvet"))
        m2 = again.summarize(again.finalize(tmp_path, _rows(again, again.load(), ["x = -1 or x = -5", "crimson",
                                                                                    "a cat"])))
        assert len(_JudgeHandler.seen) == asked and m2["gpt_score"] == m["gpt_score"]  # grades reused, not re-asked
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ registry, errors


def test_unknown_split_lists_what_the_data_has(data: Path) -> None:
    with pytest.raises(DatasetError, match="splits present: test, validation"):
        get_task("textvqa", dataset=str(data / "textvqa"), split="train").load()


def test_missing_columns_named(tmp_path: Path) -> None:
    write_table(tmp_path / "mme.parquet", [{"question": "q"}], pa.schema([("question", pa.string())]))
    with pytest.raises(DatasetError, match=r"missing required column\(s\) \['question_id', 'answer', 'category'"):
        get_task("mme", dataset=str(tmp_path / "mme.parquet")).load()


def test_a_broken_task_module_raises_instead_of_unknown_task(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "vtprune_broken_plugin.py").write_text("import vtprune_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PLUGIN_MODULES", ("vtprune_broken_plugin",))
    with pytest.raises(ModuleNotFoundError, match="vtprune_no_such_dependency"):
        get_task("no-such-task")
    sys.modules.pop("vtprune_broken_plugin", None)
