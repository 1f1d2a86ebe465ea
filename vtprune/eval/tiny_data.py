"""Tiny benchmark files in the real schemas (POPE, ScienceQA and the lmms-lab copies of GQA, TextVQA, VQAv2,
VizWiz, MME, MMBench, MM-Vet), for tests and examples (nothing is downloaded).

The layouts mirror the Hub datasets so the loaders are exercised on the same paths real data takes:
`write_pope_hub_folder` is a snapshot of `lmms-lab/POPE` (config `Full` with one parquet per category, plus
`data/test-*.parquet` holding every row with a `category` column); images are PNG bytes inside parquet
`{"bytes", "path"}` structs, exactly what `datasets` writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vtprune.eval.tasks.pope import POPE_SPLITS

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
OBJECTS = ("dog", "cat", "chair")


def png_bytes(seed: int, size: int = 112) -> bytes:
    from vtprune.testing import random_image

    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def pope_rows(split: str, n: int, *, offset: int = 0, image_size: int = 112) -> list[dict[str, Any]]:
    """`n` POPE rows of one category: alternating yes/no answers, ids unique across categories."""
    base = {"random": 0, "popular": 1000, "adversarial": 2000}.get(split, 3000) + offset
    rows = []
    for i in range(n):
        obj = OBJECTS[i % len(OBJECTS)]
        rows.append({
            "id": str(base + i),
            "question_id": str(i + 1),
            "question": f"Is there a {obj} in the image?",
            "answer": "yes" if i % 2 == 0 else "no",
            "image_source": f"COCO_val2014_{i:012d}",
            "image": {"bytes": png_bytes(base + i, image_size), "path": None},
            "category": split,
        })
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as parquet; an `image` column becomes the Hub's struct<bytes, path> image type."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = []
    for name, value in rows[0].items():
        if name == "image":
            fields.append(pa.field(name, IMAGE_TYPE))
        elif name == "choices":
            fields.append(pa.field(name, pa.list_(pa.string())))
        elif name == "answer" and isinstance(value, int):
            fields.append(pa.field(name, pa.int8()))
        else:
            fields.append(pa.field(name, pa.string()))
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return path


def write_pope_hub_folder(root: Path, n_per_split: int = 4) -> Path:
    """A local snapshot in the `lmms-lab/POPE` layout (config folder `Full/` and the `data/test` split)."""
    all_rows = []
    for split in POPE_SPLITS:
        rows = pope_rows(split, n_per_split)
        write_rows(root / "Full" / f"{split}-00000-of-00001.parquet", rows)
        all_rows += rows
    write_rows(root / "data" / "test-00000-of-00001.parquet", all_rows)
    return root


def write_pope_parquet(path: Path, n_per_split: int = 4, splits: tuple[str, ...] = POPE_SPLITS) -> Path:
    """One parquet file holding several categories (filtered by the `category` column)."""
    rows = [row for split in splits for row in pope_rows(split, n_per_split)]
    return write_rows(path, rows)


def write_pope_jsonl_folder(root: Path, split: str = "adversarial", n: int = 4) -> Path:
    """A folder with `metadata.jsonl` and image files referenced by relative `file_name`."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in pope_rows(split, n):
        name = f"images/{row['id']}.png"
        (root / "images").mkdir(exist_ok=True)
        (root / name).write_bytes(row.pop("image")["bytes"])
        lines.append(json.dumps({**row, "file_name": name}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def scienceqa_rows(n: int, *, image_size: int = 112) -> list[dict[str, Any]]:
    """ScienceQA-IMG rows: 2-4 choices, integer answers, hints on every other row, two subjects/grades."""
    rows = []
    for i in range(n):
        k = 2 + i % 3
        rows.append({
            "image": {"bytes": png_bytes(5000 + i, image_size), "path": None},
            "question": f"Which colour is shape {i}?",
            "choices": ["red", "green", "blue", "yellow"][:k],
            "answer": i % k,
            "hint": "Look at the picture." if i % 2 == 0 else "",
            "task": "closed choice",
            "grade": f"grade{1 + i % 2}",
            "subject": "natural science" if i % 3 else "language science",
            "topic": "colours",
            "category": "Colours",
            "skill": "identify colours",
            "lecture": "",
            "solution": "",
        })
    return rows


def write_scienceqa_hub_folder(root: Path, n: int = 6) -> Path:
    """A local snapshot in the `lmms-lab/ScienceQA` layout (`ScienceQA-IMG/test-*.parquet`, `validation`)."""
    write_rows(root / "ScienceQA-IMG" / "test-00000-of-00001.parquet", scienceqa_rows(n))
    write_rows(root / "ScienceQA-IMG" / "validation-00000-of-00001.parquet", scienceqa_rows(2))
    return root


# ---------------------------------------------------------------------- the lmms-lab benchmark layouts
# Each writer makes a local snapshot in the layout and column types of the lmms-lab dataset of that name, with
# a handful of rows whose answers are chosen so that the metrics have hand-computable values.

STR = pa.string()
STR_LIST = pa.list_(pa.string())


def write_table(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
    """Write rows as parquet with an explicit schema (nested answer lists and structs included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _image(seed: int, size: int) -> dict[str, Any]:
    return {"bytes": png_bytes(seed, size), "path": None}


GQA_TYPES = pa.struct([("detailed", STR), ("semantic", STR), ("structural", STR)])


def write_gqa_hub_folder(root: Path, n: int = 4, image_size: int = 32) -> Path:
    """`lmms-lab/GQA` layout: testdev_balanced_instructions/ and testdev_balanced_images/ (split testdev);
    two questions per image, joined by imageId; structural types alternate verify (binary) / query (open)."""
    questions, images = [], []
    for i in range(n):
        image_id = f"n{100 + i // 2}"
        binary = i % 2 == 0
        questions.append({
            "id": str(20000 + i), "imageId": image_id,
            "question": f"Is the shape {i} red?" if binary else f"What colour is shape {i}?",
            "answer": "yes" if binary else "red", "fullAnswer": "Yes, it is." if binary else "It is red.",
            "isBalanced": True,
            "types": {"detailed": "verifyAttr" if binary else "queryAttr", "semantic": "attr",
                      "structural": "verify" if binary else "query"},
        })
        if i % 2 == 0:
            images.append({"id": image_id, "image": _image(7000 + i, image_size)})
    q_schema = pa.schema([("id", STR), ("imageId", STR), ("question", STR), ("answer", STR), ("fullAnswer", STR),
                          ("isBalanced", pa.bool_()), ("types", GQA_TYPES)])
    write_table(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", questions, q_schema)
    write_table(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", images,
                pa.schema([("id", STR), ("image", IMAGE_TYPE)]))
    return root


def write_textvqa_hub_folder(root: Path, n: int = 3, image_size: int = 32) -> Path:
    """`lmms-lab/textvqa` layout (data/validation-*, data/test-*): ten answers and OCR tokens per question;
    the last validation row has no OCR tokens; test rows have no answers."""
    schema = pa.schema([("image_id", STR), ("question_id", pa.int32()), ("question", STR),
                        ("question_tokens", STR_LIST), ("image", IMAGE_TYPE), ("image_width", pa.int32()),
                        ("image_height", pa.int32()), ("answers", STR_LIST), ("ocr_tokens", STR_LIST),
                        ("set_name", STR)])

    def rows(split: str, count: int, base: int) -> list[dict[str, Any]]:
        out = []
        for i in range(count):
            out.append({
                "image_id": f"img{base + i}", "question_id": base + i, "question": f"what does sign {i} say?",
                "question_tokens": ["what", "does", "sign", str(i), "say"], "image": _image(base + i, image_size),
                "image_width": image_size, "image_height": image_size,
                "answers": None if split == "test" else ["stop"] * (i + 1) + ["go"] * (9 - i),
                "ocr_tokens": [] if i == count - 1 else ["stop", "sign"], "set_name": split,
            })
        return out

    write_table(root / "data" / "validation-00000-of-00001.parquet", rows("validation", n, 34602), schema)
    write_table(root / "data" / "test-00000-of-00001.parquet", rows("test", 2, 39602), schema)
    return root


VQAV2_ANSWER = pa.struct([("answer", STR), ("answer_confidence", STR), ("answer_id", pa.int64())])


def write_vqav2_hub_folder(root: Path, n: int = 4, image_size: int = 32) -> Path:
    """`lmms-lab/VQAv2` layout (data/validation-*, data/testdev-*): answers as {answer, answer_confidence,
    answer_id} structs, answer types yes/no, number, other; testdev rows without answers."""
    schema = pa.schema([("question_type", STR), ("multiple_choice_answer", STR), ("answers", pa.list_(VQAV2_ANSWER)),
                        ("image_id", pa.int64()), ("answer_type", STR), ("question_id", pa.int64()),
                        ("question", STR), ("image", IMAGE_TYPE)])
    kinds = [("is this a dog?", "yes/no", ["yes"] * 10), ("how many dogs are there?", "number", ["2"] * 2 + ["3"] * 8),
             ("what is on the table?", "other", ["a cup"] * 4 + ["mug"] * 6),
             ("what colour is it?", "other", ["red"] * 10)]
    val = []
    for i in range(n):
        question, kind, answers = kinds[i % len(kinds)]
        val.append({"question_type": question.split()[0], "multiple_choice_answer": answers[-1],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)],
                    "image_id": 9000 + i, "answer_type": kind, "question_id": 9000000 + i, "question": question,
                    "image": _image(9000 + i, image_size)})
    testdev = [{"question_type": None, "multiple_choice_answer": None, "answers": None, "image_id": 8000 + i,
                "answer_type": None, "question_id": 8000000 + i, "question": "what is this?",
                "image": _image(8000 + i, image_size)} for i in range(2)]
    write_table(root / "data" / "validation-00000-of-00001.parquet", val, schema)
    write_table(root / "data" / "testdev-00000-of-00001.parquet", testdev, schema)
    return root


def write_vizwiz_hub_folder(root: Path, n: int = 3, image_size: int = 32) -> Path:
    """`lmms-lab/VizWiz-VQA` layout (data/val-*, data/test-*): ten answers per question, one unanswerable."""
    schema = pa.schema([("question_id", STR), ("image", IMAGE_TYPE), ("question", STR), ("answers", STR_LIST),
                        ("category", STR)])
    answer_sets = [(["unanswerable"] * 7 + ["blue"] * 3, "unanswerable"), (["soup"] * 10, "other"),
                   (["yes"] * 6 + ["no"] * 4, "yes/no")]
    val = [{"question_id": f"VizWiz_val_{i:08d}", "image": _image(6000 + i, image_size),
            "question": f"What is this {i}?", "answers": answer_sets[i % 3][0], "category": answer_sets[i % 3][1]}
           for i in range(n)]
    test = [{"question_id": f"VizWiz_test_{i:08d}", "image": _image(6500 + i, image_size), "question": "What is this?",
             "answers": None, "category": None} for i in range(2)]
    write_table(root / "data" / "val-00000-of-00001.parquet", val, schema)
    write_table(root / "data" / "test-00000-of-00001.parquet", test, schema)
    return root


def write_mme_hub_folder(root: Path, image_size: int = 32) -> Path:
    """`lmms-lab/MME` layout (data/test-*): two questions (Yes, No) per image; two perception images
    (existence) and one cognition image (code_reasoning)."""
    schema = pa.schema([("question_id", STR), ("image", IMAGE_TYPE), ("question", STR), ("answer", STR),
                        ("category", STR)])
    rows = []
    for k, (category, stem) in enumerate([("existence", "000000006040.jpg"), ("existence", "000000018150.jpg"),
                                          ("code_reasoning", "0020.png")]):
        for answer, obj in (("Yes", "dog"), ("No", "cat")):
            rows.append({"question_id": stem, "image": _image(4000 + k, image_size),
                         "question": f"Is there a {obj} in this image? Please answer yes or no.",
                         "answer": answer, "category": category})
    return write_table(root / "data" / "test-00000-of-00001.parquet", rows, schema)


def mmbench_rows(n: int, *, copies: bool, with_answers: bool = True, image_size: int = 32,
                 l2_column: str = "L2-category") -> list[dict[str, Any]]:
    """MMBench rows (index, question, hint, A-D, answer, category, image, source, L2-category, comment, split):
    questions with 4, 3, 2, ... options; `copies` adds MMBench's rotated copies (index + k * 1,000,000)."""
    rows = []
    for i in range(n):
        options = ["red", "green", "blue", "yellow"][: 4 - i % 3]
        answer = i % len(options)
        for k in range(len(options) if copies else 1):
            rotated = options[k:] + options[:k]
            letters = dict(zip("ABCD", rotated + [None] * (4 - len(rotated)), strict=True))
            rows.append({
                "index": i + k * 1_000_000, "question": f"Which colour is shape {i}?",
                "hint": "Look closely." if i % 2 == 0 else None, **letters,
                "answer": "ABCD"[(answer - k) % len(options)] if with_answers else None,
                "category": "attribute_recognition" if i % 2 == 0 else "object_localization",
                "image": _image(3000 + i, image_size), "source": "tiny", l2_column: "attribute" if i % 2 == 0 else "spatial",
                "comment": None, "split": "dev" if with_answers else "test",
            })
    return rows


def mmbench_schema(l2_column: str = "L2-category") -> pa.Schema:
    return pa.schema([("index", pa.int64()), ("question", STR), ("hint", STR), ("A", STR), ("B", STR), ("C", STR),
                      ("D", STR), ("answer", STR), ("category", STR), ("image", IMAGE_TYPE), ("source", STR),
                      (l2_column, STR), ("comment", STR), ("split", STR)])


def write_mmbench_hub_folder(root: Path, n: int = 3, image_size: int = 32) -> Path:
    """`lmms-lab/MMBench` layout: configs en/ and cn/, splits dev (with rotated copies) and test (no answers)."""
    for config in ("en", "cn"):
        write_table(root / config / "dev-00000-of-00001.parquet",
                    mmbench_rows(n, copies=True, image_size=image_size), mmbench_schema())
        write_table(root / config / "test-00000-of-00001.parquet",
                    mmbench_rows(2, copies=True, with_answers=False, image_size=image_size), mmbench_schema())
    return root


def write_mmvet_hub_folder(root: Path, n: int = 3, image_size: int = 32) -> Path:
    """`lmms-lab/MMVet` layout (data/test-*): question_id v1_N, reference answers with <AND>/<OR>, capabilities."""
    schema = pa.schema([("question_id", STR), ("image", IMAGE_TYPE), ("question", STR), ("answer", STR),
                        ("image_source", STR), ("capability", STR)])
    answers = ["-1<AND>-5", "red<OR>crimson", "A dog sitting on a sofa."]
    caps = ["math,ocr", "rec", "rec,gen"]
    rows = [{"question_id": f"v1_{i}", "image": _image(2000 + i, image_size), "question": f"What is shown {i}?",
             "answer": answers[i % 3], "image_source": "tiny", "capability": caps[i % 3]} for i in range(n)]
    return write_table(root / "data" / "test-00000-of-00001.parquet", rows, schema)
