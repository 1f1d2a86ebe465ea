"""The shapes benchmark generator: determinism, schemas, balance, co-occurrence structure, caching."""

from __future__ import annotations

import io
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vtprune.testbed import questions as qs
from vtprune.testbed.render import (
    BACKGROUND_LABEL,
    GRID,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    PATCH_SIZE,
    render,
    sample_scene,
)
from vtprune.testbed.shapes import (
    MCQ_FILENAME,
    POPE_FILENAME,
    ensure_shapes_data,
    write_shapes_mcq,
    write_shapes_pope,
)
from vtprune.testbed.world import NUM_CLASSES, SHAPES, cooccurrence_stats, world

POPE_COLUMNS = ["id", "question_id", "question", "answer", "image_source", "image", "category"]
MCQ_COLUMNS = ["image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category",
               "skill", "lecture", "solution"]  # fmt: skip


@pytest.fixture(scope="module")
def pope_file(tmp_path_factory):
    return write_shapes_pope(tmp_path_factory.mktemp("pope"), num_images=6, seed=11)


@pytest.fixture(scope="module")
def mcq_file(tmp_path_factory):
    return write_shapes_mcq(tmp_path_factory.mktemp("mcq"), num_questions=12, seed=11)


def test_same_seed_same_bytes(tmp_path, pope_file, mcq_file):
    assert write_shapes_pope(tmp_path / "a", 6, 11).read_bytes() == pope_file.read_bytes()
    assert write_shapes_mcq(tmp_path / "b", 12, 11).read_bytes() == mcq_file.read_bytes()
    other = pq.read_table(write_shapes_pope(tmp_path / "c", 6, 12)).column("question").to_pylist()
    assert other != pq.read_table(pope_file).column("question").to_pylist()


def test_pope_schema(pope_file):
    assert pope_file.name == POPE_FILENAME
    table = pq.read_table(pope_file)
    assert table.column_names == POPE_COLUMNS
    rows = table.to_pylist()
    assert {r["answer"] for r in rows} == {"yes", "no"}
    assert {r["category"] for r in rows} == set(qs.POPE_CATEGORIES)
    assert len({r["question_id"] for r in rows}) == len(rows)
    assert all(
        r["question"].startswith("Is there a") and r["question"].endswith(" in the image?") for r in rows
    )
    image = rows[0]["image"]
    assert image["path"] is None and image["bytes"].startswith(b"\x89PNG")
    decoded = Image.open(io.BytesIO(image["bytes"]))
    assert decoded.size == (IMAGE_SIZE, IMAGE_SIZE) and decoded.mode == "RGB"
    # POPE asks every category about the same images.
    sources = {c: {r["image_source"] for r in rows if r["category"] == c} for c in qs.POPE_CATEGORIES}
    assert sources["random"] == sources["popular"] == sources["adversarial"] and len(sources["random"]) == 6


def test_mcq_schema(mcq_file):
    assert mcq_file.name == MCQ_FILENAME
    table = pq.read_table(mcq_file)
    assert table.column_names == MCQ_COLUMNS
    rows = table.to_pylist()
    assert Counter(r["category"] for r in rows) == {t: 3 for t in qs.MCQ_TYPES}
    for r in rows:
        assert len(r["choices"]) == qs.NUM_CHOICES and len(set(r["choices"])) == qs.NUM_CHOICES
        assert 0 <= r["answer"] < len(r["choices"])
        assert r["hint"] == "" and r["image"]["bytes"].startswith(b"\x89PNG")


def test_datasets_reads_images(pope_file, mcq_file, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(mcq_file), split="train", cache_dir=str(tmp_path))
    assert type(ds.features["image"]).__name__ == "Image"
    assert ds[0]["image"].size == (IMAGE_SIZE, IMAGE_SIZE)
    assert isinstance(ds[0]["choices"], list) and isinstance(ds[0]["answer"], int)


def test_pope_balanced_per_split(pope_file):
    rows = pq.read_table(pope_file, columns=["category", "answer"]).to_pylist()
    counts = Counter((r["category"], r["answer"]) for r in rows)
    for category in qs.POPE_CATEGORIES:
        assert counts[(category, "yes")] == counts[(category, "no")] > 0


def test_negatives_follow_cooccurrence():
    """Adversarial negatives co-occur with the present objects more than random ones; popular ones are frequent."""
    stats = cooccurrence_stats()
    rng = np.random.default_rng(0)
    cooc = {c: [] for c in qs.POPE_CATEGORIES}
    freq = {c: [] for c in qs.POPE_CATEGORIES}
    for _ in range(300):
        present = world().sample_classes(rng)
        for category in qs.POPE_CATEGORIES:
            negatives = qs.pope_negatives(present, category, 3, rng)
            assert not set(negatives) & set(present) and len(set(negatives)) == 3
            cooc[category].append(stats.cooccurrence_score(present)[negatives].mean())
            freq[category].append(stats.frequency[negatives].mean())
    assert np.mean(cooc["adversarial"]) > 3 * np.mean(cooc["random"])
    assert np.mean(freq["popular"]) > 2 * np.mean(freq["random"])


def test_binding_negatives_and_attribute_probes():
    from vtprune.testbed.world import colour_of, shape_of

    rng = np.random.default_rng(4)
    for _ in range(100):
        scene = sample_scene(rng)
        present = scene.classes
        for cls in qs.binding_negatives(present):
            assert cls not in present
            assert any(colour_of(c) == colour_of(cls) for c in present)
            assert any(shape_of(c) == shape_of(cls) for c in present)
        probe = qs.attribute_probe(scene, rng)
        word = probe.text.split()[3]  # "Is there a red object ..." / "Is there a star ..."
        names = [qs.COLOURS[o.colour] for o in scene.objects] + [qs.SHAPES[o.shape] for o in scene.objects]
        assert probe.kind == "attribute" and probe.answer == ("yes" if word in names else "no")
    # the defaults draw exactly what they drew before these options existed
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(50):
        scene = sample_scene(a)
        assert sample_scene(b) == scene
        assert qs.sample_training_example(scene, a, 0.4, 0.25) == qs.sample_training_example(
            scene, b, 0.4, 0.25, binding_fraction=0.0, attribute_fraction=0.0
        )


def test_world_has_cooccurring_pairs():
    stats = cooccurrence_stats()
    theme = world().themes[0]
    inside = stats.cooccurrence[theme[0], theme[1:]].mean()
    outside = np.delete(stats.cooccurrence[theme[0]], theme).mean()
    assert inside > 2 * outside
    assert stats.frequency.max() > 3 * stats.frequency.min()
    assert stats.frequency.shape == (NUM_CLASSES,)


def test_scene_layout():
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = sample_scene(rng)
        objs = scene.objects
        assert 2 <= len(objs) <= 6 and len(set(scene.classes)) == len(objs)
        for i, a in enumerate(objs):
            assert MIN_SIZE <= a.size <= MAX_SIZE
            assert 0 <= a.x and a.x + a.size <= IMAGE_SIZE and 0 <= a.y and a.y + a.size <= IMAGE_SIZE
            for b in objs[i + 1 :]:
                separate = (
                    a.x + a.size <= b.x or b.x + b.size <= a.x or a.y + a.size <= b.y or b.y + b.size <= a.y
                )
                assert separate


def test_render_labels_and_textured_background():
    rng = np.random.default_rng(4)
    scene = sample_scene(rng)
    pixels, labels = render(scene, with_labels=True)
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, render(scene)[0])
    assert labels.shape == (GRID * GRID,)
    assert set(labels[labels != BACKGROUND_LABEL]) <= set(scene.classes)
    for obj in scene.objects:  # an object's patches lie inside its box
        rows, cols = np.divmod(np.flatnonzero(labels == obj.cls), GRID)
        assert len(rows) > 0
        assert np.all(rows * PATCH_SIZE < obj.y + obj.size) and np.all((rows + 1) * PATCH_SIZE > obj.y)
        assert np.all(cols * PATCH_SIZE < obj.x + obj.size) and np.all((cols + 1) * PATCH_SIZE > obj.x)
    patches = (
        pixels.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(GRID * GRID, -1)
    )
    background_std = patches[labels == BACKGROUND_LABEL].astype(float).std(axis=1)
    assert background_std.min() > 3.0  # no background patch is flat


def test_mcq_answers_are_right():
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = sample_scene(rng)
        for qtype in qs.MCQ_TYPES:
            item = qs.make_mcq(scene, qtype, rng)
            if item is None:
                continue
            answer = item.choices[item.answer]
            if qtype == "count_shape":
                shape = next(s for s in SHAPES if qs.SHAPE_PLURALS[s] in item.question)
                assert int(answer) == sum(SHAPES[o.shape] == shape for o in scene.objects)
            elif qtype in ("colour_at", "shape_at"):
                region = item.question.rstrip("?").split()[-1]
                target = [o for o in scene.objects if o.region() == region]
                assert len(target) == 1
                name = qs.COLOURS[target[0].colour] if qtype == "colour_at" else SHAPES[target[0].shape]
                assert answer == name


def test_prompts_use_only_known_words():
    from vtprune.testbed.evaluate import chat_prompt
    from vtprune.testbed.model import build_processor

    processor = build_processor()
    tok = processor.tokenizer
    rng = np.random.default_rng(6)
    for i in range(150):
        example = qs.sample_training_example(sample_scene(rng), rng, mcq_fraction=0.4, caption_fraction=0.3)
        system = qs.SYSTEM_PROMPT if i % 2 else None
        ids = tok(chat_prompt(processor, example.text, system) + " " + example.answer)["input_ids"]
        assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)


def test_ensure_shapes_data_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path))
    path = ensure_shapes_data("pope", split_seed=3, n=2)
    assert path.is_file() and str(path).startswith(str(tmp_path))
    stamp = path.stat().st_mtime_ns
    assert ensure_shapes_data("shapes-pope", 3, 2) == path and path.stat().st_mtime_ns == stamp
    mcq = ensure_shapes_data("mcq", 3, 4)
    assert mcq.name == MCQ_FILENAME and pq.read_table(mcq).num_rows == 4
    assert [p.name for p in path.parent.iterdir()] == [POPE_FILENAME]
    with pytest.raises(ValueError, match="unknown shapes data kind"):
        ensure_shapes_data("gqa", 3, 2)
    with pytest.raises(ValueError, match="positive"):
        write_shapes_pope(tmp_path, 0, 1)
    assert os.listdir(tmp_path) == ["shapes"]
