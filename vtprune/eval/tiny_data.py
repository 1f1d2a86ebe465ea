"""Tiny benchmark files in the real POPE / ScienceQA schemas, for tests and examples (nothing is downloaded).

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
