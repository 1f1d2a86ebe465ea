"""The engine invariants on LLaVA-NeXT (AnyRes), for every registered method (tiny random model, CPU).

The tiny NeXT tiles 56 px crops of 4 x 4 patches: the wide test image gets a base view and 1 x 2 tiles
(16 + 4 x 8 + 4 newlines = 52 tokens), the tall one 2 x 2 tiles unpadded to 8 x 6 (16 + 48 + 8 = 72 tokens),
so one left-padded batch holds two images of different token counts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import last_logits, sized_image_inputs
from oracle import image_features, oracle_greedy, oracle_logits
from test_engine import CASES, method_of

import vtprune
from vtprune.models import adapter_for
from vtprune.models.llava_next import LlavaNextAdapter
from vtprune.testing import make_tiny_llava_next, random_image

UNSUPPORTED = {
    "prumerge": "does not run on llava_next",
    "illava[vit]": "vit stage",
    "hiprune": "one patch grid per image",
    "flowcut": "vit stage",
    "holov[grid]": "one patch grid per image",
}
QUESTIONS = ["what colour is the shape ?", "is there a red circle in the image ?"]
SIZES = [(120, 60), (80, 100)]  # (width, height): 52 and 72 image tokens


@pytest.fixture(scope="module")
def tiny_next():
    model, processor = make_tiny_llava_next(seed=0)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return model, eager, processor


def next_inputs(processor, which=(0, 1)):
    return sized_image_inputs(processor, [QUESTIONS[i] for i in which], [SIZES[i] for i in which], [i + 1 for i in which], 60)


@pytest.fixture(scope="module")
def batch(tiny_next):
    return next_inputs(tiny_next[2])


# A fixed `contextual` count is per crop on NeXT; the tiny tall image's crops get shares of 2-3 tokens.
NEXT_PARAMS = {"visionzip[split]": {"crop_budget": "image"}}


def run_case(name):
    params, exact, keeps_all = CASES[name]
    if name in UNSUPPORTED or method_of(name) in UNSUPPORTED:
        pytest.skip(f"{name} is refused on LLaVA-NeXT (test_unsupported_methods_refuse)")
    return {**params, **NEXT_PARAMS.get(name, {})}, exact, keeps_all


def test_adapter_is_found_by_model_type(tiny_next):
    model, _, _ = tiny_next
    adapter = adapter_for(model)
    assert isinstance(adapter, LlavaNextAdapter)
    info = adapter.info()
    assert info.family == "llava_next" and info.variable_tokens
    assert info.visual_tokens == 16 + 8 * 8 + 8  # base view + the largest tile grid + a newline per row


def test_token_sources_rebuild_the_models_packing(tiny_next, batch):
    """Each image token's (crop, patch) source, or image_newline, reproduces HF's pack_image_features."""
    model, _, _ = tiny_next
    adapter = adapter_for(model)
    cfg = model.config
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy="default",
            output_hidden_states=True,
        )
        crops = model.model.multi_modal_projector(out.hidden_states[cfg.vision_feature_layer][:, 1:])
    flat = crops.reshape(-1, crops.shape[-1])
    sources = adapter.token_sources(batch["image_sizes"])
    assert [len(s) for s in sources] == [52, 72] == (batch["input_ids"] == cfg.image_token_id).sum(1).tolist()
    for src, packed in zip(sources, out.pooler_output, strict=True):
        rebuilt = torch.where(
            (src >= 0)[:, None], flat[src.clamp(min=0)], model.model.image_newline.expand(len(src), -1)
        )
        torch.testing.assert_close(rebuilt, packed)
    assert int((sources[0] < 0).sum()) == 4 and int((sources[1] < 0).sum()) == 8  # a newline per row


@pytest.mark.parametrize("name", sorted(CASES))
def test_keep_all_equals_unmodified(tiny_next, batch, name):
    params, _, keeps_all = run_case(name)
    if not keeps_all:
        pytest.skip(f"{name} excludes tokens by definition")
    model, _, _ = tiny_next
    reference = last_logits(model, batch)
    with vtprune.pruned(model, method_of(name), keep=1.0 if name != "none" else None, **params):
        logits = last_logits(model, batch)
        assert vtprune.last_record(model).tokens_after_pruning == [52, 72]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_equals_oracle(tiny_next, batch, name, impl):
    params, exact, _ = run_case(name)
    if not exact:
        pytest.skip(f"{name} creates tokens; covered by its own tests")
    model = tiny_next[0] if impl == "sdpa" else tiny_next[1]
    with vtprune.pruned(model, method_of(name), keep=12 if name != "none" else None, **params):
        logits = last_logits(model, batch)
        record = vtprune.last_record(model)
    expected, _ = oracle_logits(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], record,
        image_sizes=batch["image_sizes"],
    )
    torch.testing.assert_close(logits, expected[:, -1], rtol=1e-4, atol=1e-4)
    if name != "none":
        assert max(record.tokens_after_pruning) <= 12


@pytest.mark.parametrize("name", sorted(CASES))
def test_batched_equals_single(tiny_next, batch, name):
    """Two images of different aspect ratios (52 and 72 tokens) in one left-padded batch == each alone."""
    params, _, _ = run_case(name)
    model, _, processor = tiny_next
    suppress = [model.config.image_token_id]
    with vtprune.pruned(model, method_of(name), keep=0.25 if name != "none" else None, **params):
        with torch.no_grad():
            batched = model.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
        batched_last = last_logits(model, batch)
        batched_kept = [s.kept for s in vtprune.last_record(model).stages]
        for i in range(2):
            single = next_inputs(processor, which=(i,))
            with torch.no_grad():
                out = model.generate(**single, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
            generated = out[0, single["input_ids"].shape[1] :].tolist()
            assert generated == batched[i, batch["input_ids"].shape[1] :].tolist()[: len(generated)]
            torch.testing.assert_close(last_logits(model, single)[0], batched_last[i], rtol=1e-4, atol=1e-4)
            assert [s.kept[0] for s in vtprune.last_record(model).stages] == [k[i] for k in batched_kept]


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_cache_equals_recompute(tiny_next, batch, name):
    params, exact, _ = run_case(name)
    if not exact:
        pytest.skip(f"{name} creates tokens; covered by its own tests")
    model, _, _ = tiny_next
    with vtprune.pruned(model, method_of(name), keep=12 if name != "none" else None, **params):
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=4, do_sample=False, suppress_tokens=[model.config.image_token_id]
            )
        record = vtprune.last_record(model)
    expected = oracle_greedy(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], record, 4,
        image_sizes=batch["image_sizes"],
    )
    assert out[:, -4:].tolist() == expected.tolist()


@pytest.mark.parametrize("name", sorted(CASES))
def test_sdpa_and_eager_select_same(tiny_next, batch, name):
    params, _, _ = run_case(name)
    kept, tokens = [], []
    for model in tiny_next[:2]:
        with vtprune.pruned(model, method_of(name), keep=12 if name != "none" else None, **params):
            with torch.no_grad():
                tokens.append(model.generate(**batch, max_new_tokens=3, do_sample=False).tolist())
            kept.append([s.kept for s in vtprune.last_record(model).stages])
    assert kept[0] == kept[1]
    assert tokens[0] == tokens[1]


def test_fraction_budget_is_per_image(tiny_next, batch):
    model, _, _ = tiny_next
    with vtprune.pruned(model, "random", keep=0.25):
        last_logits(model, batch)
        record = vtprune.last_record(model)
    assert record.tokens_after_pruning == [13, 18]
    assert record.sample_visual_tokens == [52, 72]
    assert record.layer_avg_tokens == [13.0, 18.0]
    with vtprune.pruned(model, "fastv", keep=60, K=2):  # a count above an image's tokens keeps them all
        last_logits(model, batch)
        assert vtprune.last_record(model).tokens_after_pruning == [52, 60]


@pytest.mark.parametrize("name", ["prumerge", "illava[vit]", "hiprune", "flowcut", "holov[grid]"])
def test_unsupported_methods_refuse(tiny_next, name):
    model, _, _ = tiny_next
    params = CASES[name][0]
    with pytest.raises(vtprune.PruneConfigError, match="llava_next"):
        vtprune.prune(model, method_of(name), keep=12, **params)
    assert not vtprune.is_pruned(model)


def test_unprune_restores(tiny_next, batch):
    from conftest import hook_snapshot

    model, _, _ = tiny_next
    before = last_logits(model, batch)
    hooks = hook_snapshot(model)
    with vtprune.pruned(model, "vispruner", keep=8):
        assert "get_image_features" in model.model.__dict__  # the image-size tag, for generate()
        last_logits(model, batch)
    assert "get_image_features" not in model.model.__dict__
    assert hook_snapshot(model) == hooks
    assert torch.equal(last_logits(model, batch), before)


def test_image_features_helper_matches_processor_counts(tiny_next, batch):
    model, _, _ = tiny_next
    feats = image_features(model, batch["pixel_values"], batch["image_sizes"])
    assert [f.shape[0] for f in feats] == [52, 72]


@pytest.mark.parametrize("name", ["none", "vispruner", "fastv", "pdrop", "sparsevlm"])
def test_static_cache_equals_dynamic(tiny_next, batch, name):
    params = CASES[name][0]
    model, _, _ = tiny_next
    runs = []
    with vtprune.pruned(model, name, keep=0.25 if name != "none" else None, **params):
        for cache in ("dynamic", "static"):
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=4, do_sample=False, cache_implementation=cache,
                    suppress_tokens=[model.config.image_token_id],
                )
            runs.append((out.tolist(), [s.kept for s in vtprune.last_record(model).stages]))
    assert runs[0] == runs[1]


# --- everything above the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def next_folder(tmp_path_factory):
    from vtprune.testing import save_tiny_llava_next

    return save_tiny_llava_next(tmp_path_factory.mktemp("tiny-next") / "model")


def test_eval_runs_on_a_next_checkpoint(next_folder, tmp_path):
    """`vtprune eval` on a local LLaVA-NeXT folder: POPE-shaped data, per-sample token counts recorded."""
    import json

    from typer.testing import CliRunner

    from vtprune.eval.commands import build_app
    from vtprune.eval.tiny_data import write_pope_hub_folder

    pope = write_pope_hub_folder(tmp_path / "pope", n_per_split=2)
    out = tmp_path / "out"
    args = ["eval", "--model", str(next_folder), "--task", "pope", "--dataset-id", str(pope), "--split", "random",
            "--method", "vispruner", "--keep", "0.25", "--max-new-tokens", "3", "--batch-size", "2",
            "--output", str(out), "--no-progress", "--paper-setting"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    (summary_path,) = out.glob("*/*/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["counts"]["evaluated"] == 2 and summary["counts"]["errors"] == 0
    assert summary["config"]["preprocessing"] == "crop"  # NeXT's paper setting: AnyRes, no square padding
    assert summary["environment"]["preprocessing_impl"].startswith("processor default (AnyRes")
    lines = [json.loads(line) for line in (summary_path.parent / "samples.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["tokens_after_pruning"] == round(0.25 * line["visual_tokens"])


def test_eval_scienceqa_on_a_next_checkpoint(next_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from vtprune.eval.commands import build_app
    from vtprune.eval.tiny_data import write_scienceqa_hub_folder

    data = write_scienceqa_hub_folder(tmp_path / "sqa", n=3)
    out = tmp_path / "out"
    args = ["eval", "--model", str(next_folder), "--task", "scienceqa_img", "--dataset-id", str(data),
            "--method", "fastv", "--keep", "320/2880", "--max-new-tokens", "2", "--batch-size", "3",
            "--output", str(out), "--no-progress"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    (summary_path,) = out.glob("*/*/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["counts"]["evaluated"] == summary["counts"]["expected"] > 0
    assert summary["counts"]["errors"] == 0


def test_paper_setting_per_family():
    from vtprune.eval.commands import resolve_setting
    from vtprune.eval.errors import EvalInputError

    assert resolve_setting(None, None, True, "llava") == ("vicuna_v1", "pad")
    assert resolve_setting(None, None, True, "llava_next") == ("vicuna_v1", "crop")
    with pytest.raises(EvalInputError, match="--preprocessing crop for a llava_next model"):
        resolve_setting(None, "pad", True, "llava_next")


def test_unsupported_checkpoint_is_refused_before_its_weights(tmp_path):
    from transformers import LlamaConfig

    from vtprune.loading import load_model

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(vtprune.PruneConfigError, match="'llama' model; vtprune supports llava, llava_next"):
        load_model(str(tmp_path))


def test_analyze_sinks_on_next(next_folder, tmp_path):
    """Sink statistics over every token of an AnyRes image; the maps on its base view."""
    from vtprune.analysis.common import Sample, load_analysis_model
    from vtprune.analysis.sinks import run_sinks

    am = load_analysis_model(str(next_folder), device="cpu", dtype="float32")
    samples = [
        Sample(type("Example", (), {"question": q, "uid": f"s{i}"})(), [random_image(i, 60).resize(SIZES[i])])
        for i, q in enumerate(QUESTIONS)
    ]
    data = run_sinks(am, samples, tmp_path, methods=["vispruner", "fastv"], keep=12, params={},
                     vision_threshold=0.07, layer=1, sink_dims="detect")
    assert data["grid"] == [4, 4] and np.asarray(data["vision"]["frequency_map"]).shape == (4, 4)
    for stats in data["methods"].values():
        assert stats["overall_keep_rate"] == pytest.approx(24 / (52 + 72))  # 12 of each image's tokens
    assert all(Path(f).exists() for f in data["figures"])


def test_show_draws_tiles_and_base_view(next_folder, tmp_path):
    """`vtprune show` on a tall image (2 x 2 tiles unpadded to 8 x 6 patches + base view + 8 newlines): every
    kept token is drawn in exactly one view, newlines in none."""
    from PIL import Image

    from vtprune.analysis.common import load_analysis_model
    from vtprune.analysis.show import run_show

    am = load_analysis_model(str(next_folder), device="cpu", dtype="float32")
    image = random_image(7, 60).resize((80, 100))
    data = run_show(am, [image], QUESTIONS[1], ["vispruner", "fastv"], 12, {}, tmp_path / "kept.png",
                    max_new_tokens=2)
    assert data["visual_tokens_per_image"] == 72
    assert Image.open(data["figure"]).size[0] == 3 * 320
    for result in data["methods"].values():
        views = result["kept_views"]
        assert set(views) == {"tiles", "base view"}
        assert all(0 <= c < 8 * 8 for c in views["tiles"]) and all(0 <= c < 16 for c in views["base view"])
        sources = adapter_for(am.model).token_sources(torch.tensor([[100, 80]]))[0]
        newlines = sum(1 for k in result["kept"] if sources[k] < 0)
        assert len(views["tiles"]) + len(views["base view"]) + newlines == len(result["kept"]) == 12


def test_paper_budget_by_name():
    """`--keep 320/2880` is the share a paper's NeXT budget is of its 2,880 tokens, per image."""
    from vtprune.errors import UserInputError
    from vtprune.userinput import parse_keep

    assert parse_keep("320/2880") == pytest.approx(320 / 2880)
    assert parse_keep(" 160 / 2880 ") == pytest.approx(160 / 2880)
    with pytest.raises(UserInputError, match="paper budget like 320/2880"):
        parse_keep("3000/2880")


@pytest.mark.parametrize("name", ["vispruner", "fastv"])
def test_beam_search_and_multiple_returns(tiny_next, batch, name):
    """generate() repeats each sample's images for beams / num_return_sequences (after encoding them once, from
    transformers 5.24 on): every copy keeps the tokens its sample keeps."""
    model, _, _ = tiny_next
    with vtprune.pruned(model, name, keep=8), torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        kept = vtprune.last_record(model).stages[0].kept
        beams = model.generate(**batch, max_new_tokens=2, num_beams=2, do_sample=False)
        beam_kept = vtprune.last_record(model).stages[0].kept
        torch.manual_seed(0)
        sampled = model.generate(**batch, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        copies = vtprune.last_record(model).stages[0].kept
    assert beams.shape[0] == 2 and sampled.shape[0] == 4
    assert beam_kept == [k for k in kept for _ in range(2)]
    assert copies == [k for k in kept for _ in range(2)]


@pytest.mark.parametrize("method", ["vispruner", "fastv"])
def test_analysis_visual_rows_on_next(tiny_next, method):
    """`analyze rank` reads the visual rows from the record and the image's own token count (72 here)."""
    from vtprune.analysis.common import visual_rows

    model, _, processor = tiny_next
    inputs = next_inputs(processor, which=(1,))
    with vtprune.pruned(model, method, keep=12), torch.no_grad():
        model(**inputs)
        record = vtprune.last_record(model)
        episode = model._vtprune_session.episode  # the engine's own layouts, read for this check only
        for layer in range(record.num_layers):
            rows = visual_rows(record, layer, inputs["input_ids"], model.config.image_token_id, [72])
            assert rows.tolist() == episode.layout_for(layer).visual_index[0].tolist(), layer


def test_analyze_heads_map_on_next(next_folder):
    from vtprune.analysis.common import Sample, load_analysis_model
    from vtprune.analysis.heads_map import head_map

    am = load_analysis_model(str(next_folder), device="cpu", dtype="float32")
    samples = [
        Sample(type("Example", (), {"question": q, "uid": f"s{i}"})(), [random_image(i, 60).resize(SIZES[i])])
        for i, q in enumerate(QUESTIONS)
    ]
    result = head_map(am, samples, ["sparsity"])
    assert result["scores"]["sparsity"].shape == (4, 4) and result["num_samples"] == 2
    assert ((result["image_mass"] > 0) & (result["image_mass"] <= 1)).all()


@pytest.mark.parametrize("name, params", [("vispruner", {}), ("cdpruner", {"relevance": "none"}), ("visionzip", {})])
def test_official_rule_an_equal_share_per_crop(tiny_next, batch, name, params):
    """VisPruner / CDPruner / VisionZip on LLaVA-NeXT (official code: an equal budget per view, each view
    scored with its own [CLS]): 12 tokens over the wide image's 3 inputs are 4 + 4 + 4, over the tall
    image's 5 inputs 3 + 3 + 2 + 2 + 2; no image_newline is kept. crop_budget="image" selects over all."""
    from collections import Counter

    model, _, _ = tiny_next
    sources = adapter_for(model).token_sources(batch["image_sizes"])
    per_crop = 16
    with vtprune.pruned(model, name, keep=12, **params), torch.no_grad():
        model(**batch)
        stage = vtprune.last_record(model).stages[0]
    assert stage.extra["crop_shares"] == [[4, 4, 4], [3, 3, 2, 2, 2]]
    for i, shares in enumerate(stage.extra["crop_shares"]):
        kept = [k for k in stage.kept[i] if k >= 0]  # VisionZip's merged tokens are -1
        crops = Counter(int(sources[i][k]) // per_crop for k in kept)
        assert all(sources[i][k] >= 0 for k in kept)  # no newline
        if name != "visionzip":  # VisionZip turns part of each share into merged tokens
            assert sorted(crops.values(), reverse=True) == shares
    with vtprune.pruned(model, name, keep=12, crop_budget="image", **params), torch.no_grad():
        model(**batch)
        assert "crop_shares" not in vtprune.last_record(model).stages[0].extra


def test_equal_shares():
    from vtprune.engine import equal_shares

    assert equal_shares(12, [16, 16, 16]) == [4, 4, 4]
    assert equal_shares(12, [16, 12, 12, 12, 12]) == [3, 3, 2, 2, 2]
    assert equal_shares(10, [1, 16, 16]) == [1, 5, 4]  # what a small crop cannot take goes to the others
    assert equal_shares(40, [4, 4]) == [4, 4]
