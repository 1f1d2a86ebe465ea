"""Tasks on tiny datasets written in the real schemas: layouts, splits, prompts, bad input, images."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vtprune.eval import DatasetError, EvalInputError, PopeTask, get_task, list_tasks, register_task
from vtprune.eval.images import ImageDecodeError, decode_image, expand_to_square
from vtprune.eval.tasks.registry import _REGISTRY
from vtprune.eval.tiny_data import (
    png_bytes,
    pope_rows,
    write_pope_hub_folder,
    write_pope_jsonl_folder,
    write_pope_parquet,
    write_rows,
    write_scienceqa_hub_folder,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    write_pope_hub_folder(root / "pope_hub", n_per_split=3)
    write_pope_parquet(root / "pope.parquet", n_per_split=2)
    write_pope_jsonl_folder(root / "pope_jsonl", n=3)
    write_scienceqa_hub_folder(root / "sqa_hub", n=5)
    return root


def test_registry_lists_builtin_tasks_and_rejects_unknown() -> None:
    assert {"pope", "scienceqa_img"} <= set(list_tasks())
    with pytest.raises(EvalInputError, match=r"unknown task 'nosuchtask'.*valid tasks: .*pope.*scienceqa_img"):
        get_task("nosuchtask")


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_pope_hub_layout_selects_split_files(data: Path, split: str) -> None:
    task = get_task("pope", dataset=str(data / "pope_hub"), split=split)
    examples = task.load()
    assert len(examples) == 3
    assert {ex.fields["category"] for ex in examples} == {split}
    assert task.sources[0]["files"] == [f"Full/{split}-00000-of-00001.parquet"]
    assert examples[0].question == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert [ex.target for ex in examples] == ["yes", "no", "yes"]
    assert examples[0].uid == f"{split}/1"


def test_pope_test_split_filtered_by_category(data: Path) -> None:
    # the default-config layout: one `test` split with a category column
    task = get_task("pope", dataset=str(data / "pope_hub"), split="popular", config="default")
    examples = task.load()
    assert len(examples) == 3 and {ex.fields["category"] for ex in examples} == {"popular"}
    assert task.sources[0]["filtered_by"] == {"category": "popular", "rows": 3}


def test_pope_single_parquet_all_splits_and_limit(data: Path) -> None:
    task = get_task("pope", dataset=str(data / "pope.parquet"), split="all")
    examples = task.load()
    assert [ex.fields["split"] for ex in examples] == ["random"] * 2 + ["popular"] * 2 + ["adversarial"] * 2
    assert [ex.index for ex in examples] == list(range(6))
    assert len({ex.uid for ex in examples}) == 6
    limited = task.load(limit=1)  # the limit applies per split; indices do not depend on it
    assert [ex.index for ex in limited] == [0, 2, 4]


def test_pope_jsonl_folder_with_image_files(data: Path) -> None:
    examples = get_task("pope", dataset=str(data / "pope_jsonl"), split="adversarial").load()
    assert len(examples) == 3
    image = decode_image(examples[0].raw_image(), examples[0].base_dir)
    assert image.size == (112, 112) and image.mode == "RGB"


def test_pope_unknown_split_names_valid_choices(data: Path) -> None:
    with pytest.raises(EvalInputError, match=r"unknown split 'val'.*random, popular, adversarial, all"):
        get_task("pope", dataset=str(data / "pope_hub"), split="val")


def test_pope_category_missing_from_data(tmp_path: Path) -> None:
    write_rows(tmp_path / "pope.parquet", pope_rows("random", 2))
    with pytest.raises(DatasetError, match=r"no rows with category 'adversarial'.*\['random'\]"):
        get_task("pope", dataset=str(tmp_path / "pope.parquet"), split="adversarial").load()


def test_missing_columns_are_listed(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k not in ("answer", "image")} for r in pope_rows("random", 2)]
    write_rows(tmp_path / "bad.parquet", rows)
    with pytest.raises(DatasetError, match=r"missing required column\(s\) \['answer', 'image'\]"):
        get_task("pope", dataset=str(tmp_path / "bad.parquet"), split="random").load()


def test_unknown_parser_names_valid_choices(data: Path) -> None:
    with pytest.raises(EvalInputError, match="valid parsers: llava, exact, word"):
        get_task("pope", dataset=str(data / "pope_hub"), parser="gpt4")


def test_bad_target_becomes_a_sample_error(tmp_path: Path) -> None:
    rows = pope_rows("random", 2)
    rows[1]["answer"] = "maybe"
    write_rows(tmp_path / "pope.parquet", rows)
    examples = get_task("pope", dataset=str(tmp_path / "pope.parquet"), split="random").load()
    assert examples[0].error is None
    assert "bad target" in examples[1].error


def test_scienceqa_prompt_and_targets(data: Path) -> None:
    task = get_task("scienceqa_img", dataset=str(data / "sqa_hub"))
    examples = task.load()
    assert len(examples) == 5 and task.sources[0]["files"] == ["ScienceQA-IMG/test-00000-of-00001.parquet"]
    assert examples[0].question == (
        "Context: Look at the picture.\nWhich colour is shape 0?\nA. red\nB. green\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert examples[1].question.startswith("Which colour is shape 1?\nA. red\nB. green\nC. blue\n")
    assert [ex.target for ex in examples] == ["A", "B", "C", "B", "B"]
    assert examples[2].num_choices == 4
    assert task.parse("The answer is D.", examples[0]) is None  # D is not among 2 choices
    assert task.parse("B. green", examples[0]) == "B"
    validation = get_task("scienceqa_img", dataset=str(data / "sqa_hub"), split="validation").load()
    assert len(validation) == 2


def test_scienceqa_unknown_split_lists_available(data: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown split; splits present: test, validation"):
        get_task("scienceqa_img", dataset=str(data / "sqa_hub"), split="train").load()


def test_scienceqa_summary_groups() -> None:
    task = get_task("scienceqa_img", dataset="unused")
    rows = [
        {"correct": True, "parsed": "A", "subject": "s1", "grade": "g1", "has_image": True},
        {"correct": False, "parsed": None, "subject": "s1", "grade": "g2", "has_image": True},
        {"correct": True, "parsed": "B", "subject": "s2", "grade": "g2", "has_image": False},
    ]
    m = task.summarize(rows)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["img_accuracy"] == 0.5 and m["failed_parse"] == 1
    assert m["per_subject"]["s1"]["accuracy"] == 0.5 and m["per_grade"]["g2"]["n"] == 2


def test_pope_summary_mean_f1_over_splits() -> None:
    task = get_task("pope", dataset="unused", split="all")
    rows = [
        {"split": "random", "parsed": "yes", "target": "yes"},
        {"split": "random", "parsed": "no", "target": "no"},
        {"split": "popular", "parsed": "yes", "target": "yes"},
        {"split": "popular", "parsed": "yes", "target": "no"},
    ]
    m = task.summarize(rows)
    assert m["per_split"]["random"]["f1"] == 1.0
    assert m["per_split"]["popular"]["f1"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx((1 + 2 / 3) / 2) == m["paper_summary"]["value"]
    assert m["yes_ratio"] == 0.75
    assert "| random | 2 |" in task.summary_table(m)


def test_register_task_for_a_testbed(data: Path) -> None:
    parquet = str(data / "pope.parquet")
    register_task("shapes-pope-test", lambda **kw: PopeTask(**{"dataset": parquet, "split": "random", **kw}))
    try:
        task = get_task("shapes-pope-test")
        assert task.name == "shapes-pope-test" and task.describe()["task"] == "shapes-pope-test"
        assert len(task.load()) == 2
        with pytest.raises(ValueError, match="already registered"):
            register_task("shapes-pope-test", PopeTask)
    finally:
        _REGISTRY.pop("shapes-pope-test", None)


def test_decode_image_forms(tmp_path: Path) -> None:
    raw = png_bytes(3, 32)
    (tmp_path / "x.png").write_bytes(raw)
    pil = Image.open(io.BytesIO(raw))
    for value in (pil, raw, {"bytes": raw, "path": None}, {"bytes": None, "path": "x.png"}, "x.png"):
        assert decode_image(value, tmp_path).size == (32, 32)
    assert decode_image(None) is None
    with pytest.raises(ImageDecodeError, match="unreadable image"):
        decode_image({"bytes": b"not an image", "path": None})
    with pytest.raises(ImageDecodeError, match="not found"):
        decode_image("missing.png", tmp_path)


def test_expand_to_square_centres_on_mean_colour() -> None:
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (4, 4)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((0, 1)) == (255, 0, 0)


def test_parquet_images_round_trip_as_structs(data: Path) -> None:
    table = pq.read_table(data / "pope.parquet")
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_hub_loader_through_datasets(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `datasets.load_dataset` path (used for Hub ids), pointed at a local folder so nothing downloads."""
    datasets = pytest.importorskip("datasets")
    from vtprune.eval.data import load_hub_split

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    loaded = load_hub_split(str(data / "pope_hub" / "data"), split="test", config=None, revision=None)
    assert loaded.table.num_rows == 9 and loaded.source["kind"] == "hub"
    assert loaded.table.schema.field("image").type.num_fields == 2  # images stay encoded structs
    with pytest.raises(DatasetError, match="cannot load split 'adversarial'"):
        load_hub_split(str(data / "pope_hub" / "data"), split="adversarial", config=None, revision=None)
