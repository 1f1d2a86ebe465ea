"""`vtprune show` and `vtprune analyze rank | sinks | heads | overlap` on a tiny model and tiny datasets:
valid non-blank pictures of the expected size, JSON with the documented keys, and the pieces they rest on
(un-normalised pixels, visual rows of a pruned sequence, capture clean-up)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_inputs
from typer.testing import CliRunner

import vtprune
from vtprune.analysis.common import image_as_seen, visual_rows
from vtprune.analysis.overlap import jaccard, random_jaccard
from vtprune.analysis.plots import assert_png_ok
from vtprune.analysis.rank_study import token_counts
from vtprune.eval.tiny_data import pope_rows, scienceqa_rows, write_rows
from vtprune.signals import attention as attention_capture
from vtprune.testing import random_image, save_tiny_llava

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis")
    random_image(7).save(root / "image.png")
    return {
        "root": root,
        "model": save_tiny_llava(root / "tiny-llava"),
        "sqa": write_rows(root / "sqa.parquet", scienceqa_rows(2)),
        "pope": write_rows(root / "pope.parquet", pope_rows("adversarial", 2)),
        "image": root / "image.png",
    }


def _invoke(*args: str):
    from vtprune.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _common(env, data: str) -> list[str]:
    return ["--model", env["model"], "--dataset-path", env[data], "--device", "cpu"]


def test_show_draws_one_panel_per_method_plus_cls_map(env, tmp_path):
    out = tmp_path / "kept.png"
    result = _invoke("show", "--model", env["model"], "--image", env["image"], "--prompt", "is there a red circle ?",
                     "--methods", "vispruner,fastv,random", "--keep", "16", "-o", out, "--max-new-tokens", "3",
                     "--device", "cpu")
    assert "vispruner:" in result.output
    assert_png_ok(out, size=(4 * 320, 420))
    data = _json(tmp_path / "kept.json")
    assert {"settings", "image_size_seen", "grid", "unpruned_answer", "cls_attention", "methods"} <= set(data)
    assert data["image_size_seen"] == [112, 112] and data["grid"] == [8, 8]
    assert len(data["cls_attention"]) == 64 and data["attention_map"] == "[CLS] attention"
    assert list(data["methods"]) == ["vispruner", "fastv", "random"]
    for method in data["methods"].values():
        assert {"answer", "kept_first_image", "kept", "stages"} <= set(method)
        assert len(method["kept_first_image"]) == 16 and all(0 <= j < 64 for j in method["kept_first_image"])


def test_image_as_seen_undoes_the_processor_normalisation(tiny):
    _, _, processor = tiny
    image = random_image(3)  # 112 px: the processor's resize and crop leave it as it is
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    seen = image_as_seen(pixels[0], processor.image_processor)
    assert seen.shape == (112, 112, 3) and seen.dtype == np.uint8
    assert np.abs(seen.astype(int) - np.asarray(image).astype(int)).max() <= 1


def test_rank_study_outputs(env, tmp_path):
    out = tmp_path / "rank"
    _invoke("analyze", "rank", *_common(env, "sqa"), "--start", "64", "--stop", "20", "--step", "20",
            "--max-new-tokens", "2", "-o", out)
    raw = _json(out / "raw_results.json")
    assert raw["token_counts"] == [64, 44, 24, 20]
    for key in ("accuracies", "first_layer_ranks", "last_layer_ranks"):
        assert len(raw[key]) == 4
    assert all(0.0 <= a <= 1.0 for a in raw["accuracies"])
    # The visual rows are exactly the kept tokens, so no rank can exceed the kept count.
    assert all(0 < r <= k for r, k in zip(raw["first_layer_ranks"], raw["token_counts"], strict=True))
    assert all(0 < r <= k for r, k in zip(raw["last_layer_ranks"], raw["token_counts"], strict=True))
    norm = _json(out / "normalized_results.json")
    for key in ("normalized_accuracies", "normalized_first_layer_ranks", "normalized_last_layer_ranks"):
        assert len(norm[key]) == 4 and min(norm[key]) >= 0.0 and max(norm[key]) <= 1.0
    assert norm["first_layer_ranks"] == raw["first_layer_ranks"]
    assert_png_ok(out / "pruning_experiment_results.png", size=(600, 400))
    assert (out / "pruning_experiment_results.pdf").read_bytes()[:4] == b"%PDF"
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 4
    assert all(line["first_layer_rows"] == line["keep"] == line["last_layer_rows"] for line in lines)


def test_token_counts_sweep():
    assert token_counts(576, 20, 10, 576)[:3] == [576, 566, 556]
    assert token_counts(576, 20, 10, 576)[-2:] == [26, 20]
    assert token_counts(576, 20, 10, 64)[0] == 64 and token_counts(576, 20, 10, 64).count(64) == 1


@pytest.mark.parametrize("method", ["l2norm", "fastv"])
@pytest.mark.parametrize("images", [1, 2])
def test_visual_rows_are_where_the_engine_put_the_kept_tokens(tiny, method, images):
    model, _, processor = tiny
    inputs = build_inputs(processor, ["is there a red circle ?"], [4], images_per_prompt=images)
    inputs.pop("position_ids")
    vtprune.prune(model, method, keep=12)
    try:
        with torch.no_grad():
            model(**inputs)
        record = vtprune.last_record(model)
        episode = model._vtprune_session.episode  # the engine's own layouts, read for this check only
        for layer in range(record.num_layers):
            expected = episode.layout_for(layer).visual_index[0]
            rows = visual_rows(record, layer, inputs["input_ids"], model.config.image_token_id, [64] * images)
            assert rows.tolist() == expected.tolist(), layer
    finally:
        vtprune.unprune(model)


def test_sinks_outputs(env, tmp_path):
    out = tmp_path / "sinks"
    _invoke("analyze", "sinks", *_common(env, "pope"), "--num-samples", "2", "--methods", "vispruner,random",
            "--keep", "16", "--tau", "3", "--vision-threshold", "0.015", "-o", out)
    data = _json(out / "sinks.json")
    assert {"settings", "num_images", "grid", "vision", "llm", "attention", "methods"} <= set(data)
    assert data["num_images"] == 2
    for side in ("vision", "llm"):
        assert np.asarray(data[side]["frequency_map"]).shape == (8, 8)
        assert len(data[side]["per_image_counts"]) == 2
    assert sum(data["llm"]["per_image_counts"]) > 0  # tau 3 is low enough for a random tiny model
    for stats in data["methods"].values():
        assert stats["overall_keep_rate"] == pytest.approx(16 / 64)
        assert stats["llm_sinks_total"] == sum(data["llm"]["per_image_counts"])
    assert 0.0 < data["attention"]["mean_image_mass"] <= 1.0
    assert_png_ok(out / "sinks_overlay.png", size=(1300, 380))
    assert_png_ok(out / "sinks_histogram.png", size=(1100, 750))
    assert (out / "sinks_histogram.pdf").is_file()
    assert not attention_capture._CAPTURES  # every capture removed


def test_heads_map_and_ablation(env, tmp_path):
    out = tmp_path / "heads"
    _invoke("analyze", "heads", *_common(env, "pope"), "--num-samples", "2", "--strategies", "sparsity,top_k_sum",
            "--head-counts", "2,8", "--budgets", "16,100", "--max-new-tokens", "2", "-o", out)
    head_map = _json(out / "heads_map.json")
    assert {"layers", "heads", "scores", "image_mass", "num_samples"} <= set(head_map)
    for strategy in ("sparsity", "top_k_sum"):
        assert np.asarray(head_map["scores"][strategy]).shape == (4, 4)
    ablation = _json(out / "heads_ablation.json")["results"]
    # budgets 16 and 64 (100 clipped), head counts 2 and 4 (8 clipped), plus all-head FastV per budget
    assert len(ablation) == 2 * (1 + 2 * 2)
    assert {r["keep"] for r in ablation} == {16, 64} and {r["num_heads"] for r in ablation} == {None, 2, 4}
    assert all({"strategy", "num_heads", "keep", "accuracy", "n"} <= set(r) for r in ablation)
    assert_png_ok(out / "heads_map.png", size=(840, 340))
    assert_png_ok(out / "heads_ablation.png", size=(920, 380))
    assert_png_ok(out / "heads_ablation_grid.png", size=(650, 335))
    assert not attention_capture._CAPTURES


def test_overlap_outputs(env, tmp_path):
    out = tmp_path / "overlap"
    _invoke("analyze", "overlap", *_common(env, "pope"), "--num-samples", "2", "--methods", "vispruner,fastv,random",
            "--keep", "16", "-o", out)
    data = _json(out / "overlap.json")
    assert {"methods", "num_samples", "matrix", "std", "mean_kept", "random_expectation"} <= set(data)
    matrix = np.asarray(data["matrix"])
    assert matrix.shape == (3, 3) and np.allclose(np.diag(matrix), 1.0) and np.allclose(matrix, matrix.T)
    assert ((matrix >= 0) & (matrix <= 1)).all()
    assert data["mean_kept"] == {"vispruner": 16, "fastv": 16, "random": 16}
    assert_png_ok(out / "overlap.png", size=(530, 440))


def test_jaccard_and_its_random_reference():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert jaccard(set(), set()) == 1.0
    assert random_jaccard(16, 16, 64) == pytest.approx(16 / (2 * 64 - 16))
    rng = np.random.default_rng(0)
    draws = [jaccard(set(rng.choice(64, 16, replace=False)), set(rng.choice(64, 16, replace=False))) for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(random_jaccard(16, 16, 64), abs=0.01)


def test_bad_input_is_a_one_line_error(env, tmp_path):
    from vtprune.cli import app

    result = runner.invoke(app, ["analyze", "overlap", *map(str, _common(env, "pope")), "--methods", "vispruner,nosuch",
                                 "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown method 'nosuch'" in result.output
