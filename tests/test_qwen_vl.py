"""The engine invariants on Qwen2-VL and Qwen2.5-VL (dynamic resolution, 3-D M-RoPE positions, no [CLS]),
for every registered method that runs on them (tiny random models, CPU).

The tiny towers use 8 px patches merged 2 x 2: the wide test image (64 x 48 px) is 12 LLM tokens, the tall
one (48 x 80 px) 15, so one left-padded batch holds two images of different token counts. The tiny Qwen2.5
tower has windowed attention (16 px windows) in blocks 0 and 2 and full attention in blocks 1 and 3.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hook_snapshot, last_logits, sized_image_inputs
from oracle_qwen import full_positions, kept_columns, oracle_logits
from test_engine import CASES, method_of

import vtprune
from vtprune.models import adapter_for
from vtprune.testing import make_tiny_qwen_vl, random_image

KINDS = ["qwen2_5_vl", "qwen2_vl"]
QUESTIONS = ["what colour is the shape ?", "is there a red circle in the image ?"]
SIZES = [(64, 48), (48, 80)]  # (width, height): 12 and 15 tokens
TOKENS = [12, 15]
KEEP = 6
# Methods that need a fixed patch grid, a [CLS] row per layer or merging inside the tower refuse (their
# reason is in the method's unsupported_families).
UNSUPPORTED = {"illava[vit]", "hiprune", "flowcut", "holov[grid]"}


def run_case(name):
    params, exact, keeps_all = CASES[name]
    if name in UNSUPPORTED or method_of(name) in UNSUPPORTED:
        pytest.skip(f"{name} is refused on Qwen-VL (test_unsupported_methods_refuse)")
    return params, exact, keeps_all


@pytest.fixture(scope="module", params=KINDS)
def tiny_qwen(request):
    model, processor = make_tiny_qwen_vl(request.param, seed=0)
    return model, processor


def qwen_inputs(processor, which=(0, 1)):
    return sized_image_inputs(processor, [QUESTIONS[i] for i in which], [SIZES[i] for i in which], [i + 1 for i in which], 64)


@pytest.fixture(scope="module")
def batch(tiny_qwen):
    return qwen_inputs(tiny_qwen[1])


def budget(name):
    return KEEP if name != "none" else None


def test_adapter_and_token_counts(tiny_qwen, batch):
    model, _ = tiny_qwen
    adapter = adapter_for(model)
    info = adapter.info()
    assert info.family == model.config.model_type and info.variable_tokens
    assert adapter.tokens_of(batch["image_grid_thw"]).tolist() == TOKENS
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == TOKENS


@pytest.mark.parametrize("name", sorted(CASES))
def test_keep_all_equals_unmodified(tiny_qwen, batch, name):
    params, _, keeps_all = run_case(name)
    if not keeps_all:
        pytest.skip(f"{name} excludes tokens by definition")
    model, _ = tiny_qwen
    reference = last_logits(model, batch)
    with vtprune.pruned(model, method_of(name), keep=1.0 if name != "none" else None, **params):
        logits = last_logits(model, batch)
        assert vtprune.last_record(model).tokens_after_pruning == TOKENS
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_equals_oracle(tiny_qwen, batch, name):
    params, exact, _ = run_case(name)
    if not exact:
        pytest.skip(f"{name} creates tokens; no oracle")
    model, _ = tiny_qwen
    with vtprune.pruned(model, method_of(name), keep=budget(name), **params):
        logits = last_logits(model, batch)
        record = vtprune.last_record(model)
    with torch.no_grad():
        expected = oracle_logits(model, batch, record)
    torch.testing.assert_close(logits, expected[:, -1], rtol=1e-4, atol=1e-4)
    if name != "none":
        assert max(record.tokens_after_pruning) <= KEEP


@pytest.mark.parametrize("name", sorted(CASES))
def test_batched_equals_single(tiny_qwen, batch, name):
    """Two images of different sizes (12 and 15 tokens) in one left-padded batch == each alone."""
    params, _, _ = run_case(name)
    model, processor = tiny_qwen
    suppress = [model.config.image_token_id, model.config.video_token_id]
    with vtprune.pruned(model, method_of(name), keep=0.5 if name != "none" else None, **params):
        with torch.no_grad():
            batched = model.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
        batched_last = last_logits(model, batch)
        batched_kept = [s.kept for s in vtprune.last_record(model).stages]
        for i in range(2):
            single = qwen_inputs(processor, which=(i,))
            with torch.no_grad():
                out = model.generate(**single, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
            generated = out[0, single["input_ids"].shape[1] :].tolist()
            assert generated == batched[i, batch["input_ids"].shape[1] :].tolist()[: len(generated)]
            torch.testing.assert_close(last_logits(model, single)[0], batched_last[i], rtol=1e-4, atol=1e-4)
            assert [s.kept[0] for s in vtprune.last_record(model).stages] == [k[i] for k in batched_kept]


def oracle_greedy(model, inputs, record, steps):
    """Greedy decoding recomputing the whole prefix each step, the prefill's kept set, unpruned positions."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    suppress = [model.config.image_token_id, model.config.video_token_id]
    out = []
    for _ in range(steps):
        step_inputs = {**inputs, "input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            last = oracle_logits(model, step_inputs, record)[:, -1].clone()
        last[:, suppress] = float("-inf")
        nxt = last.argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_cache_equals_recompute(tiny_qwen, batch, name):
    params, exact, _ = run_case(name)
    if not exact:
        pytest.skip(f"{name} creates tokens; no oracle")
    model, _ = tiny_qwen
    suppress = [model.config.image_token_id, model.config.video_token_id]
    with vtprune.pruned(model, method_of(name), keep=budget(name), **params):
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False, suppress_tokens=suppress)
        record = vtprune.last_record(model)
    expected = oracle_greedy(model, batch, record, 4)
    assert out[:, -4:].tolist() == expected.tolist()


class PositionSpy:
    """The position_ids the language model receives, call by call."""

    def __init__(self, model):
        self.calls, self.masks = [], []
        self.handle = model.model.language_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        positions = kwargs["position_ids"]
        if positions.ndim == 3 and positions.shape[0] == 4:  # generate()'s (text, t, h, w) rows
            positions = positions[1:]
        self.calls.append(positions if positions.ndim == 3 else positions[None].expand(3, -1, -1))
        self.masks.append(kwargs.get("attention_mask"))

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("name", ["vispruner", "random", "divprune", "fastv"])
def test_pruned_positions_are_the_unpruned_ones(tiny_qwen, batch, name):
    """Each kept token enters the LLM at the 3-D position the unpruned model gives that very token, and decoding
    continues at the unpruned model's positions (its rope_deltas)."""
    model, _ = tiny_qwen
    params = CASES[name][0]
    suppress = [model.config.image_token_id, model.config.video_token_id]
    spy = PositionSpy(model)
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
        unpruned_decode = [c[..., -1:] for c in spy.calls[1:]]
        spy.calls.clear()
        spy.masks.clear()
        with vtprune.pruned(model, name, keep=KEEP, **params), torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
            record = vtprune.last_record(model)
    finally:
        spy.remove()
    prefill, prefill_mask = spy.calls[0], spy.masks[0]
    full = full_positions(model, batch)
    for b in range(2):
        columns = kept_columns(model, batch, record, b)
        valid = batch["attention_mask"][b, columns].bool()
        expected = full[:, b, columns][:, valid]
        real = prefill_mask[b].bool() if prefill_mask is not None else torch.ones(prefill.shape[-1], dtype=torch.bool)
        assert torch.equal(prefill[:, b][:, real], expected)  # the real tokens, in order
    if record.stages[0].kind == "vision":  # the prompt is shorter, its positions are not
        assert prefill.shape[-1] < batch["input_ids"].shape[1]
    assert [torch.equal(a, b) for a, b in zip(spy.calls[1:], unpruned_decode, strict=True)] == [True, True]


def test_fraction_budget_is_per_image(tiny_qwen, batch):
    model, _ = tiny_qwen
    with vtprune.pruned(model, "random", keep=0.5):
        last_logits(model, batch)
        record = vtprune.last_record(model)
    assert record.tokens_after_pruning == [6, 8]
    assert record.sample_visual_tokens == TOKENS


@pytest.mark.parametrize("name", ["illava[vit]", "hiprune", "flowcut", "holov[grid]"])
def test_unsupported_methods_refuse(tiny_qwen, name):
    model, _ = tiny_qwen
    params = CASES[name][0]
    with pytest.raises(vtprune.PruneConfigError, match=model.config.model_type):
        vtprune.prune(model, method_of(name), keep=KEEP, **params)
    assert not vtprune.is_pruned(model)


def test_unprune_restores(tiny_qwen, batch):
    model, _ = tiny_qwen
    before = last_logits(model, batch)
    hooks = hook_snapshot(model)
    with vtprune.pruned(model, "vispruner", keep=4):
        last_logits(model, batch)
    assert hook_snapshot(model) == hooks
    assert torch.equal(last_logits(model, batch), before)


# --- video ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video(tiny_qwen):
    from vtprune.testing import random_video, tiny_qwen_video_inputs

    return tiny_qwen_video_inputs(tiny_qwen[1], [random_video(1)], [QUESTIONS[0]])  # grid (2, 6, 8): 24 tokens


@pytest.mark.parametrize("name", ["vispruner", "random", "divprune", "fastv", "cdpruner", "visionzip"])
@pytest.mark.parametrize("keep", [0.5, 8])
def test_video_is_pruned_per_video(tiny_qwen, video, name, keep):
    """A video prompt (4 frames -> 2 temporal patches of 3 x 4 merged tokens) keeps `keep` of its 24 tokens (a
    fraction or a count per video); the record names each kept token's (frame, row, column); the pruned
    logits equal the unmodified model fed the kept tokens at their original 3-D positions."""
    model, _ = tiny_qwen
    params, exact, _ = CASES[name]
    with vtprune.pruned(model, name, keep=keep, **params):
        logits = last_logits(model, video)
        record = vtprune.last_record(model)
    expected_count = 12 if keep == 0.5 else 8
    assert record.tokens_after_pruning == [expected_count]
    coordinates = record.kept_coordinates()
    kept = [c for c in coordinates if c is not None]
    assert all(image == 0 and 0 <= f < 2 and 0 <= r < 3 and 0 <= c < 4 for image, f, r, c in kept)
    assert len({tuple(c) for c in kept}) == len(kept)
    assert record.token_coordinates[0][13] == [0, 1, 0, 1]  # token 13 = frame 1 (after 12), row 0, column 1
    if exact:
        with torch.no_grad():
            torch.testing.assert_close(logits, oracle_logits(model, video, record)[:, -1], rtol=1e-4, atol=1e-4)


def test_video_generate_cache_equals_recompute(tiny_qwen, video):
    model, _ = tiny_qwen
    suppress = [model.config.image_token_id, model.config.video_token_id]
    with vtprune.pruned(model, "vispruner", keep=6):
        with torch.no_grad():
            out = model.generate(**video, max_new_tokens=4, do_sample=False, suppress_tokens=suppress)
        record = vtprune.last_record(model)
    assert out[:, -4:].tolist() == oracle_greedy(model, video, record, 4).tolist()


def test_video_keep_all_equals_unmodified(tiny_qwen, video):
    model, _ = tiny_qwen
    reference = last_logits(model, video)
    for name in ("vispruner", "fastv"):
        with vtprune.pruned(model, name, keep=1.0):
            torch.testing.assert_close(last_logits(model, video), reference, rtol=1e-4, atol=1e-4)


# --- everything above the engine (tiny Qwen2.5-VL saved to a folder, loaded with vtprune.loading) ----------


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    from vtprune.testing import save_tiny_qwen_vl

    return save_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen") / "model", kind="qwen2_5_vl")


def test_eval_runs_on_a_qwen_checkpoint(qwen_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from vtprune.eval.commands import build_app
    from vtprune.eval.tiny_data import write_pope_hub_folder

    pope = write_pope_hub_folder(tmp_path / "pope", n_per_split=2)
    out = tmp_path / "out"
    args = ["eval", "--model", str(qwen_folder), "--task", "pope", "--dataset-id", str(pope), "--split", "random",
            "--method", "vispruner", "--keep", "0.25", "--max-new-tokens", "3", "--batch-size", "2",
            "--output", str(out), "--no-progress"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    (summary_path,) = out.glob("*/*/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["counts"]["evaluated"] == 2 and summary["counts"]["errors"] == 0
    lines = [json.loads(line) for line in (summary_path.parent / "samples.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["tokens_after_pruning"] == round(0.25 * line["visual_tokens"])


def test_show_draws_the_qwen_token_grid(qwen_folder, tmp_path):
    """`vtprune show` on a 48 x 80 image: a 5 x 3 grid of merged tokens, every kept token drawn in it."""
    from PIL import Image

    from vtprune.analysis.common import load_analysis_model
    from vtprune.analysis.show import run_show

    am = load_analysis_model(str(qwen_folder), device="cpu", dtype="float32")
    image = random_image(7, 64).resize((48, 80))
    data = run_show(am, [image], QUESTIONS[1], ["vispruner", "fastv"], 6, {}, tmp_path / "kept.png",
                    max_new_tokens=2)
    assert data["grid"] == [5, 3] and data["visual_tokens_per_image"] == 15 and data["num_images"] == 1
    assert data["image_size_seen"] == [48, 80]
    assert len(data["cls_attention"]) == 15
    assert data["attention_map"] == "received attention (no [CLS])"  # the panel's title: Qwen has no [CLS]
    assert Image.open(data["figure"]).size[0] == 3 * 320
    for result in data["methods"].values():
        assert len(result["kept"]) == 6 and all(0 <= k < 15 for k in result["kept"])


def test_analyze_sinks_on_qwen(qwen_folder, tmp_path):
    from pathlib import Path

    import numpy as np

    from vtprune.analysis.common import Sample, load_analysis_model
    from vtprune.analysis.sinks import run_sinks

    am = load_analysis_model(str(qwen_folder), device="cpu", dtype="float32")
    samples = [
        Sample(type("Example", (), {"question": q, "uid": f"s{i}"})(), [random_image(i, 64).resize(SIZES[i])])
        for i, q in enumerate(QUESTIONS)
    ]
    data = run_sinks(am, samples, tmp_path, methods=["vispruner", "fastv"], keep=6, params={},
                     vision_threshold=0.07, layer=1, sink_dims="detect")
    assert np.asarray(data["vision"]["frequency_map"]).shape == (8, 8)  # a fixed map grid: token grids differ
    for stats in data["methods"].values():
        assert stats["overall_keep_rate"] == pytest.approx(12 / (12 + 15))
    assert all(Path(f).exists() for f in data["figures"])


@pytest.mark.parametrize("name", ["vispruner", "fastv"])
def test_beam_search_and_multiple_returns(tiny_qwen, batch, name):
    """generate() repeats each sample's images for beams / num_return_sequences after encoding them once: every
    copy keeps the tokens (and so the positions) its sample keeps."""
    model, _ = tiny_qwen
    with vtprune.pruned(model, name, keep=4), torch.no_grad():
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


@pytest.mark.parametrize("name", ["vispruner", "visionzip", "fastv", "pdrop", "sparsevlm"])
def test_sdpa_and_eager_select_same(tiny_qwen, batch, name):
    import copy

    model, _ = tiny_qwen
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    runs = []
    for m in (model, eager):
        with vtprune.pruned(m, name, keep=6, **CASES[name][0]), torch.no_grad():
            tokens = m.generate(**batch, max_new_tokens=3, do_sample=False).tolist()
            runs.append((tokens, [s.kept for s in vtprune.last_record(m).stages]))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_video_matrix(tiny_qwen, video, name):
    """Every method that runs on Qwen-VL on a video prompt: keep-all == unmodified, pruned == oracle."""
    params, exact, keeps_all = run_case(name)
    model, _ = tiny_qwen
    if keeps_all:
        reference = last_logits(model, video)
        with vtprune.pruned(model, method_of(name), keep=1.0 if name != "none" else None, **params):
            torch.testing.assert_close(last_logits(model, video), reference, rtol=1e-4, atol=1e-4)
    with vtprune.pruned(model, method_of(name), keep=budget(name), **params):
        logits = last_logits(model, video)
        record = vtprune.last_record(model)
    if exact:  # methods that create tokens (recycling, merging) may see more than `keep` tokens
        with torch.no_grad():
            torch.testing.assert_close(logits, oracle_logits(model, video, record)[:, -1], rtol=1e-4, atol=1e-4)
        assert name == "none" or max(record.tokens_after_pruning) <= KEEP


@pytest.mark.parametrize("name", ["none", "vispruner", "fastv", "pdrop", "sparsevlm", "visionzip"])
def test_static_cache_equals_dynamic(tiny_qwen, batch, name):
    """generate() with a preallocated cache (transformers hands Qwen-VL its masks prebuilt, as a dict per
    layer type) gives the tokens and kept sets of the dynamic cache, on a left-padded batch of two image sizes."""
    params, _, _ = run_case(name)
    model, _ = tiny_qwen
    outputs = {}
    with vtprune.pruned(model, method_of(name), keep=budget(name), **params):
        for cache in ("dynamic", "static"):
            with torch.no_grad():
                tokens = model.generate(**batch, max_new_tokens=4, do_sample=False, cache_implementation=cache)
            outputs[cache] = (tokens, [stage.kept for stage in vtprune.last_record(model).stages])
    assert torch.equal(outputs["static"][0], outputs["dynamic"][0])
    assert outputs["static"][1] == outputs["dynamic"][1]
