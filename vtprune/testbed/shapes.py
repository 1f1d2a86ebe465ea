"""The `shapes` benchmark on disk: POPE-like and ScienceQA-like parquet files with PNG images.

The files use the column schema of lmms-lab/POPE and lmms-lab/ScienceQA, with images stored the way Hugging
Face `datasets` writes an `Image` feature to parquet (a struct of PNG `bytes` and `path`), so evaluation reads
them through the same code path as the real benchmarks. Everything is a pure function of `(seed, index)`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vtprune.testbed.questions import MCQ_TYPES, POPE_CATEGORIES, make_mcq, pope_negatives, pope_question
from vtprune.testbed.render import Scene, render, sample_scene
from vtprune.testbed.world import cooccurrence_stats

GENERATOR_VERSION = 1
POPE_FILENAME = "shapes-pope.parquet"
MCQ_FILENAME = "shapes-mcq.parquet"
POPE_QUESTIONS_PER_ANSWER = 3  # per image and category: up to 3 "yes" and as many "no", as POPE does
KINDS = ("pope", "mcq")

# Independent random streams per use, so that (seed, index) never collides between training and benchmarks.
STREAM_POPE, STREAM_MCQ, STREAM_TRAIN = 1, 2, 3


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


@dataclass(frozen=True)
class PopeQuestion:
    cls: int
    answer: str  # "yes" / "no"


def pope_questions_for_scene(scene: Scene, rng: np.random.Generator) -> dict[str, list[PopeQuestion]]:
    """Per category, k "yes" probes of present objects (the same for every category) and k "no" probes."""
    present = scene.classes
    k = min(POPE_QUESTIONS_PER_ANSWER, len(present))
    positives = [int(c) for c in rng.choice(present, size=k, replace=False)]
    out: dict[str, list[PopeQuestion]] = {}
    for category in POPE_CATEGORIES:
        negatives = pope_negatives(present, category, k, rng)
        items = [PopeQuestion(c, "yes") for c in positives] + [PopeQuestion(c, "no") for c in negatives]
        out[category] = [items[i] for i in rng.permutation(len(items))]
    return out


def _pope_image_rows(seed: int, index: int) -> dict[str, list[dict[str, Any]]]:
    rng = scene_rng(seed, STREAM_POPE, index)
    scene = sample_scene(rng)
    image = {"bytes": png_bytes(render(scene)[0]), "path": None}
    return {
        category: [
            {
                "question": pope_question(q.cls),
                "answer": q.answer,
                "image_source": f"shapes-{seed}-{index:06d}",
                "image": image,
                "category": category,
            }
            for q in questions
        ]
        for category, questions in pope_questions_for_scene(scene, rng).items()
    }


def map_indices(fn: Any, seed: int, n: int, workers: int) -> list[Any]:
    """`[fn(seed, i) for i in range(n)]`, in `workers` processes when more than one."""
    args = [(seed, i) for i in range(n)]
    if workers <= 1:
        return [fn(*a) for a in args]
    import multiprocessing as mp

    cooccurrence_stats()  # computed once here, inherited by the forked workers
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.starmap(fn, args, chunksize=max(1, n // (4 * workers)))


def pope_records(num_images: int, seed: int, workers: int = 1) -> list[dict[str, Any]]:
    """Rows in the lmms-lab/POPE schema, grouped by category as there: 2k questions per image and category."""
    per_image = map_indices(_pope_image_rows, seed, num_images, workers)
    rows = [row for category in POPE_CATEGORIES for image_rows in per_image for row in image_rows[category]]
    for i, row in enumerate(rows):
        row["id"] = str(i)
        row["question_id"] = str(i + 1)
    return rows


def _mcq_row(seed: int, index: int) -> dict[str, Any]:
    rng = scene_rng(seed, STREAM_MCQ, index)
    qtype = MCQ_TYPES[index % len(MCQ_TYPES)]
    while True:
        scene = sample_scene(rng)
        item = make_mcq(scene, qtype, rng)
        if item is not None:
            break
    return {
        "image": {"bytes": png_bytes(render(scene)[0]), "path": None},
        "question": item.question,
        "choices": item.choices,
        "answer": item.answer,
        "hint": "",
        "task": "closed choice",
        "grade": "grade1",
        "subject": "shapes",
        "topic": "shapes",
        "category": qtype,
        "skill": "counting" if qtype.startswith("count") else "spatial",
        "lecture": "",
        "solution": "",
    }


def mcq_records(num_questions: int, seed: int, workers: int = 1) -> list[dict[str, Any]]:
    """Rows in the lmms-lab/ScienceQA schema: one question per image, question types in turn."""
    return map_indices(_mcq_row, seed, num_questions, workers)


def _schema(kind: str, meta: dict[str, Any]):
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    string = {"dtype": "string", "_type": "Value"}
    if kind == "pope":
        fields = [(n, pa.string()) for n in ("id", "question_id", "question", "answer", "image_source")]
        fields.insert(5, ("image", image))
        fields.append(("category", pa.string()))
        features = {n: string for n, _ in fields}
    else:
        fields = [
            ("image", image),
            ("question", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("answer", pa.int8()),
            *[(n, pa.string()) for n in ("hint", "task", "grade", "subject", "topic", "category", "skill")],
            *[(n, pa.string()) for n in ("lecture", "solution")],
        ]
        features = {n: string for n, _ in fields}
        features["choices"] = {"feature": string, "_type": "Sequence"}
        features["answer"] = {"dtype": "int8", "_type": "Value"}
    features["image"] = {"_type": "Image"}
    # The "huggingface" key is how `datasets` knows the struct is an Image feature (decoded to PIL on load).
    metadata = {
        b"huggingface": json.dumps({"info": {"features": features}}).encode(),
        b"vtprune": json.dumps(meta).encode(),
    }
    return pa.schema(fields, metadata=metadata)


def _write_parquet(rows: list[dict[str, Any]], kind: str, path: Path, meta: dict[str, Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(kind, meta)
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    # POPE repeats each image in 2k rows per category; one big dictionary stores every distinct PNG once.
    pq.write_table(
        table,
        path,
        compression="zstd",
        use_dictionary=True,
        dictionary_pagesize_limit=1 << 30,
        row_group_size=len(rows) or None,
    )
    return path


def write_shapes_pope(out_dir: str | Path, num_images: int, seed: int) -> Path:
    """Write `out_dir/shapes-pope.parquet` (lmms-lab/POPE schema, three categories) and return its path."""
    _check_count("num_images", num_images)
    meta = {"kind": "pope", "num_images": num_images, "seed": seed, "generator_version": GENERATOR_VERSION}
    return _write_parquet(pope_records(num_images, seed), "pope", Path(out_dir) / POPE_FILENAME, meta)


def write_shapes_mcq(out_dir: str | Path, num_questions: int, seed: int) -> Path:
    """Write `out_dir/shapes-mcq.parquet` (lmms-lab/ScienceQA schema) and return its path."""
    _check_count("num_questions", num_questions)
    meta = {
        "kind": "mcq",
        "num_questions": num_questions,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }
    return _write_parquet(mcq_records(num_questions, seed), "mcq", Path(out_dir) / MCQ_FILENAME, meta)


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def cache_root() -> Path:
    """`$VTPRUNE_CACHE/shapes`, by default `~/.cache/vtprune/shapes`."""
    base = os.environ.get("VTPRUNE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "vtprune") / "shapes"


def ensure_shapes_data(kind: str, split_seed: int, n: int) -> Path:
    """The parquet file of `kind` ("pope": n images, "mcq": n questions) for `split_seed`, generated if missing.

    Files are written to a temporary folder then renamed, so concurrent callers never see a partial file.
    """
    kind = kind.removeprefix("shapes-")
    if kind not in KINDS:
        raise ValueError(f"unknown shapes data kind {kind!r}; expected one of {KINDS}")
    folder = cache_root() / f"v{GENERATOR_VERSION}" / f"{kind}-seed{split_seed}-n{n}"
    path = folder / (POPE_FILENAME if kind == "pope" else MCQ_FILENAME)
    if path.exists():
        return path
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        writer = write_shapes_pope if kind == "pope" else write_shapes_mcq
        written = writer(tmp, n, split_seed)
        folder.mkdir(exist_ok=True)
        try:
            os.replace(written, path)
        except OSError:
            if not path.exists():
                raise
    return path
