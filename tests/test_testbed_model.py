"""The shipped testbed model: offline `from_pretrained`, llava-1.5 layout, recorded accuracy, needs the image."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtprune import testbed as tb
from vtprune.testbed import evaluate as ev


@pytest.fixture(scope="module")
def testbed():
    return tb.load_testbed()


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((tb.testbed_path() / "eval.json").read_text())


@pytest.fixture(scope="module")
def sample():
    return ev.sample_rows()


def test_checkpoint_layout_and_size():
    path = tb.testbed_path()
    weights = path / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    assert (path / "README.md").is_file()
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    config = model.config
    assert model.dtype == torch.float32  # fp16 on disk, fp32 by default
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.image_seq_length == 576
    assert processor.image_processor.crop_size == {"height": 336, "width": 336}
    prompt = ev.chat_prompt(processor, "Is there a red circle in the image?")
    assert prompt == "USER: <image>\nIs there a red circle in the image? ASSISTANT:"
    image = ev.row_image({"image": {"bytes": _png(), "path": None}})
    ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0]
    assert int((ids == config.image_token_id).sum()) == 576


def _png() -> bytes:
    from vtprune.testbed.render import blank_image
    from vtprune.testbed.shapes import png_bytes

    return png_bytes(blank_image())


@pytest.mark.slow
def test_recorded_accuracy_on_fixed_sample(testbed, record, sample):
    """Batched greedy `generate` (left padding) reproduces the accuracy recorded when the model was trained."""
    model, processor = testbed
    result = ev.evaluate(model, processor, *sample, batch_size=16)
    expected = record["sample"]
    for category, scores in expected["pope"].items():
        assert result["pope"][category]["accuracy"] == pytest.approx(scores["accuracy"], abs=0.04), category
    assert result["mcq"]["all"]["accuracy"] == pytest.approx(expected["mcq"]["all"]["accuracy"], abs=0.05)
    assert result["pope"]["all"]["accuracy"] >= 0.85  # it reads the image: chance is 0.5


@pytest.mark.slow
def test_blank_image_is_chance(testbed, sample):
    model, processor = testbed
    pope_rows = sample[0][::3]
    result = ev.evaluate(model, processor, pope_rows, [], batch_size=16, blank=True)
    assert 0.35 <= result["pope"]["all"]["accuracy"] <= 0.65


def test_batched_equals_single(testbed, sample):
    model, processor = testbed
    rows = [sample[0][0], sample[1][0], sample[0][1], sample[1][1]]  # prompts of different lengths
    batched = ev.generate_answers(model, processor, rows, batch_size=4)
    single = [ev.generate_answers(model, processor, [r], batch_size=1)[0] for r in rows]
    assert batched == single


def test_recorded_pope_accuracy_meets_the_bar(record):
    pope = record["heldout"]["pope"]
    assert all(pope[c]["accuracy"] >= 0.95 for c in ("random", "popular", "adversarial"))
    assert record["blank_image"]["pope"]["all"]["accuracy"] <= 0.6


def test_recorded_mcq_accuracy_meets_the_bar(record):
    assert record["heldout"]["mcq"]["all"]["accuracy"] >= 0.85
