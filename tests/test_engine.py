"""The engine invariants of DESIGN.md, for every registered method (tiny random LLaVA, CPU).

The matrix below must name every registered method (test_matrix_covers_every_method); a method that adds
tokens it created (merging) cannot be compared with the hand-written oracle and says so in CASES.
"""

from __future__ import annotations

from dataclasses import dataclass

import cases_llm
import cases_vision
import pytest
import torch
from conftest import QUESTIONS, build_inputs, hook_snapshot
from oracle import oracle_greedy, oracle_logits

import vtprune
from vtprune import compat
from vtprune.api import list_methods, session_of
from vtprune.methods.base import Method, ModelInfo, Selection, Stage
from vtprune.selection import topk_indices

# case id ("method" or "method[variant]") -> (params for the 4-layer tiny model, exact oracle possible,
# keeps everything at keep=all)
CASES: dict[str, tuple[dict, bool, bool]] = {
    "none": ({}, True, True),
    "random": ({"seed": 3}, True, True),
    "l2norm": ({}, True, True),
    "fastv": ({"K": 2}, True, True),
    "fastv[all-queries]": ({"K": 1, "query": "all"}, True, True),
    # "sink" masks pad-to-square padding only (the released patches); the square test images have none
    "fastv[debias]": ({"K": 2, "debias": ["recency", "sink"]}, True, True),
    "fastv[heads]": ({"K": 2, "heads": "sparsity", "num_heads": 2}, True, True),
    "fastv_finepruner": ({}, True, True),
    "vispruner": ({"important_ratio": 0.5}, True, True),
    "vispruner_nosink": ({"attention_sink_threshold": 0.03}, True, False),
}
CASES.update(cases_vision.CASES)
CASES.update(cases_llm.CASES)


def method_of(case: str) -> str:
    return case.split("[")[0]


ALL = 64  # visual tokens per image of the tiny model
BUDGETS = [16, 5]
IMPLS = ["sdpa", "eager"]


def model_for(tiny, impl):
    sdpa, eager, _ = tiny
    return sdpa if impl == "sdpa" else eager


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_matrix_covers_every_method():
    registered = {m.name for m in list_methods()}
    missing = registered - {method_of(c) for c in CASES}
    assert not missing, f"add {sorted(missing)} to the invariant matrix"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_keep_all_equals_unmodified(tiny, batch_inputs, name, impl):
    params, _, keeps_all = CASES[name]
    if not keeps_all:
        pytest.skip(f"{name} excludes tokens by definition")
    model = model_for(tiny, impl)
    reference = forward(model, batch_inputs)
    with vtprune.pruned(model, method_of(name), keep=ALL if name != "none" else None, **params):
        logits = forward(model, batch_inputs)
    valid = batch_inputs["attention_mask"].bool()
    assert logits.shape == reference.shape
    torch.testing.assert_close(logits[valid], reference[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_equals_oracle(tiny, batch_inputs, name, budget, impl):
    params, exact, _ = CASES[name]
    if not exact:
        pytest.skip(f"{name} creates tokens; covered by its own tests")
    model = model_for(tiny, impl)
    with vtprune.pruned(model, method_of(name), keep=budget if name != "none" else None, **params):
        logits = forward(model, batch_inputs)
        record = vtprune.last_record(model)
    expected, valid = oracle_logits(
        model,
        batch_inputs["input_ids"],
        batch_inputs["attention_mask"],
        batch_inputs["pixel_values"],
        record,
        position_ids=batch_inputs["position_ids"],
    )
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-4, atol=1e-4)
    if name != "none":
        assert max(record.tokens_after_pruning) <= budget


@pytest.mark.parametrize("name", sorted(CASES))
def test_all_valid_tells_the_truth(tiny, batch_inputs, name, monkeypatch):
    """`Selection.all_valid` spares the engine a device read (engine/session.py, engine/drop.py), so it must be
    right: True only when every slot holds a token, False only when some slot is empty."""
    params, _, _ = CASES[name]
    model = model_for(tiny, "sdpa")
    seen: list[Selection] = []
    with vtprune.pruned(model, method_of(name), keep=5 if name != "none" else None, **params):
        method = session_of(model).method
        select = method.select

        def spy(*args):
            seen.append(select(*args))
            return seen[-1]

        monkeypatch.setattr(method, "select", spy)
        forward(model, batch_inputs)
    for selection in seen:
        if selection.all_valid is not None:
            slots = [selection.valid, selection.extra_valid if selection.extra is not None else None]
            assert selection.all_valid == all(s is None or bool(s.all()) for s in slots)


@pytest.mark.parametrize("name", sorted(CASES))
def test_batched_equals_single(tiny, batch_inputs, name):
    params, _, _ = CASES[name]
    model, _, processor = tiny
    suppress = [model.config.image_token_id]
    with vtprune.pruned(model, method_of(name), keep=16 if name != "none" else None, **params):
        with torch.no_grad():
            batched = model.generate(
                **batch_inputs, max_new_tokens=4, do_sample=False, suppress_tokens=suppress
            )
        batched_last = forward(model, batch_inputs)[:, -1]
        batched_kept = [s.kept for s in vtprune.last_record(model).stages]
        for i, (q, seed) in enumerate(zip(QUESTIONS, [1, 2, 3], strict=False)):
            single = build_inputs(processor, [q], [seed])
            with torch.no_grad():
                out = model.generate(**single, max_new_tokens=4, do_sample=False, suppress_tokens=suppress)
            last = forward(model, single)[:, -1]
            generated = out[0, single["input_ids"].shape[1] :].tolist()  # may stop early at EOS
            assert generated == batched[i, batch_inputs["input_ids"].shape[1] :].tolist()[: len(generated)]
            torch.testing.assert_close(last[0], batched_last[i], rtol=1e-4, atol=1e-4)
            assert [s.kept[0] for s in vtprune.last_record(model).stages] == [k[i] for k in batched_kept]


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_cache_equals_recompute(tiny, batch_inputs, name):
    params, exact, _ = CASES[name]
    if not exact:
        pytest.skip(f"{name} creates tokens; covered by its own tests")
    model, _, _ = tiny
    with vtprune.pruned(model, method_of(name), keep=16 if name != "none" else None, **params):
        with torch.no_grad():
            out = model.generate(
                **batch_inputs,
                max_new_tokens=5,
                do_sample=False,
                suppress_tokens=[model.config.image_token_id],
            )
        record = vtprune.last_record(model)
    expected = oracle_greedy(
        model,
        batch_inputs["input_ids"],
        batch_inputs["attention_mask"],
        batch_inputs["pixel_values"],
        record,
        5,
    )
    assert out[:, -5:].tolist() == expected.tolist()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_static_cache_equals_dynamic(tiny, batch_inputs, name, impl):
    """generate() with a preallocated (static) KV cache gives the tokens and kept sets of the dynamic cache.

    A static layer returns its whole buffer, valid slots or not: every pruned layer must mask the slots past
    its own (shorter) length, at prefill and at each decode step."""
    params, _, _ = CASES[name]
    model = model_for(tiny, impl)
    suppress = [model.config.image_token_id]
    runs = []
    with vtprune.pruned(model, method_of(name), keep=16 if name != "none" else None, **params):
        for cache in ("dynamic", "static"):
            with torch.no_grad():
                out = model.generate(
                    **batch_inputs,
                    max_new_tokens=5,
                    do_sample=False,
                    suppress_tokens=suppress,
                    cache_implementation=cache,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            kept = [s.kept for s in vtprune.last_record(model).stages]
            layers = compat.cache_from_output(out).layers
            sizes = [layer.max_cache_len if cache == "static" else layer.keys.shape[-2] for layer in layers]
            runs.append((out.sequences.tolist(), torch.stack(out.scores), kept, sizes))
    (dyn_tokens, dyn_scores, dyn_kept, held), (static_tokens, static_scores, static_kept, slots) = runs
    # each static layer was sized for what its layer holds (the pruned prompt plus the answer), not for the
    # unpruned prompt: the same room for new tokens in every layer
    assert len({s - h for s, h in zip(slots, held, strict=True)}) == 1
    assert static_kept == dyn_kept
    assert static_tokens == dyn_tokens
    finite = torch.isfinite(dyn_scores)  # suppressed tokens score -inf in both
    torch.testing.assert_close(static_scores[finite], dyn_scores[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sdpa_and_eager_select_same(tiny, batch_inputs, name):
    params, _, _ = CASES[name]
    sdpa, eager, _ = tiny
    kept, tokens = [], []
    for model in (sdpa, eager):
        with vtprune.pruned(model, method_of(name), keep=16 if name != "none" else None, **params):
            with torch.no_grad():
                tokens.append(model.generate(**batch_inputs, max_new_tokens=3, do_sample=False).tolist())
            kept.append([s.kept for s in vtprune.last_record(model).stages])
    assert kept[0] == kept[1]
    assert tokens[0] == tokens[1]


def test_sampling_generate_runs(tiny, batch_inputs):
    model, _, _ = tiny
    with vtprune.pruned(model, "fastv", keep=8):
        torch.manual_seed(0)
        out = model.generate(**batch_inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert out.shape[1] == batch_inputs["input_ids"].shape[1] + 4


@dataclass
class TwoStageTopNorm(Method):
    """A test pipeline: a vision stage, then two LLM stages with the given position policies."""

    first: str = "original"
    second: str = "reindex"
    name = "two_stage_test"

    def stages(self, info: ModelInfo) -> list[Stage]:
        return [
            Stage(kind="vision", keep=40, name="v"),
            Stage(kind="llm", keep=20, score_layer=1, prune_layer=1, positions=self.first, queries="last", name="a"),
            Stage(kind="llm", keep=7, score_layer=2, prune_layer=3, positions=self.second, queries="text", name="b"),
        ]

    def select(self, stage_index, stage, signals) -> Selection:
        if stage.kind == "vision":
            return Selection(*topk_indices(signals.features.float().norm(dim=-1), stage.keep))
        attn, _ = signals.attention(stage.queries)
        scores = attn.mean(dim=(1, 2))
        return Selection(*topk_indices(scores, stage.keep, valid=signals.visual_valid))


@pytest.mark.parametrize("policies", [("original", "reindex"), ("original", "original"), ("reindex", "original")])
@pytest.mark.parametrize("impl", IMPLS)
def test_pipeline_schedule_equals_oracle(tiny, batch_inputs, impl, policies):
    model = model_for(tiny, impl)
    with vtprune.pruned(model, TwoStageTopNorm(first=policies[0], second=policies[1])):
        logits = forward(model, batch_inputs)
        record = vtprune.last_record(model)
        with torch.no_grad():
            out = model.generate(
                **batch_inputs,
                max_new_tokens=4,
                do_sample=False,
                suppress_tokens=[model.config.image_token_id],
            )
        record_gen = vtprune.last_record(model)
    assert [s.counts for s in record.stages] == [[40] * 3, [20] * 3, [7] * 3]
    assert record.layer_tokens(0) == [40, 20, 20, 7]
    assert record.layer_avg_tokens == [pytest.approx(87 / 4)] * 3
    expected, valid = oracle_logits(
        model,
        batch_inputs["input_ids"],
        batch_inputs["attention_mask"],
        batch_inputs["pixel_values"],
        record,
    )
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-4, atol=1e-4)
    greedy = oracle_greedy(
        model,
        batch_inputs["input_ids"],
        batch_inputs["attention_mask"],
        batch_inputs["pixel_values"],
        record_gen,
        4,
    )
    assert out[:, -4:].tolist() == greedy.tolist()


def test_unprune_restores_model(tiny, batch_inputs):
    from vtprune.compat import attention_overrides

    model, _, _ = tiny
    before = forward(model, batch_inputs)
    overrides_before = attention_overrides()
    hooks_before = hook_snapshot(model)
    vtprune.prune(model, "fastv", keep=8)
    assert hook_snapshot(model) != hooks_before
    assert vtprune.is_pruned(model)
    pruned_logits = forward(model, batch_inputs)
    assert pruned_logits.shape[1] < before.shape[1] or not torch.equal(pruned_logits, before)
    vtprune.unprune(model)
    assert not vtprune.is_pruned(model)
    assert hook_snapshot(model) == hooks_before
    assert attention_overrides() == overrides_before
    assert torch.equal(forward(model, batch_inputs), before)
    # a second model pruned at the same time is independent
    other, _ = __import__("vtprune.testing", fromlist=["make_tiny_llava"]).make_tiny_llava(seed=1)
    other_hooks = hook_snapshot(other)
    with vtprune.pruned(other, "vispruner", keep=8):
        assert torch.equal(forward(model, batch_inputs), before)
    assert hook_snapshot(other) == other_hooks


def test_record_lists_kept_tokens(tiny, batch_inputs):
    model, _, _ = tiny
    with vtprune.pruned(model, "l2norm", keep=10):
        forward(model, batch_inputs)
        record = vtprune.last_record(model)
    assert record.tokens_after_pruning == [10, 10, 10]
    assert record.layer_avg_tokens == [10.0] * 3
    for kept in record.stages[0].kept:
        assert kept == sorted(kept) and len(set(kept)) == 10 and all(0 <= k < ALL for k in kept)
    assert vtprune.last_record(model) is record  # still readable after unprune
    assert "stages" in record.to_dict()


def test_fraction_budget(tiny, batch_inputs):
    model, _, _ = tiny
    with vtprune.pruned(model, "random", keep=0.25):
        forward(model, batch_inputs)
        assert vtprune.last_record(model).tokens_after_pruning == [16, 16, 16]


def test_two_images_per_prompt(tiny):
    model, _, processor = tiny
    inputs = build_inputs(processor, QUESTIONS[:2], [4, 5], images_per_prompt=2)
    with vtprune.pruned(model, "vispruner", keep=8):
        logits = forward(model, inputs)
        record = vtprune.last_record(model)
    assert record.visual_tokens == 128
    assert record.tokens_after_pruning == [16, 16]
    expected, valid = oracle_logits(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], record
    )
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-4, atol=1e-4)


# --- hand-computed scores --------------------------------------------------------------------------------


def test_captured_attention_equals_eager_attentions(tiny, batch_inputs):
    """The SDPA-captured last-token row equals eager attention's output_attentions at layer K-1."""
    sdpa, eager, _ = tiny
    with torch.no_grad():
        attn = eager(**batch_inputs, output_attentions=True).attentions[1]  # (B, H, L, L)
    image = batch_inputs["input_ids"] == sdpa.config.image_token_id
    expected = torch.stack([attn[b, :, -1][:, image[b]].mean(0) for b in range(attn.shape[0])])
    captured = {}
    from vtprune.methods.fastv import FastV

    original = FastV.select

    def spy(self, i, stage, signals):
        out = original(self, i, stage, signals)
        captured["scores"] = out.scores
        return out

    FastV.select = spy
    try:
        with vtprune.pruned(sdpa, "fastv", keep=8, K=2):
            forward(sdpa, batch_inputs)
    finally:
        FastV.select = original
    torch.testing.assert_close(captured["scores"], expected, rtol=1e-4, atol=1e-6)


def test_vision_cls_attention_equals_eager(tiny, batch_inputs):
    sdpa, _, _ = tiny
    tower = sdpa.model.vision_tower
    import copy

    eager_tower = copy.deepcopy(tower)
    eager_tower.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager_tower(batch_inputs["pixel_values"], output_attentions=True).attentions
    expected = attentions[-2][:, :, 0, 1:].mean(1)  # feature layer = the penultimate one
    from vtprune.methods.vispruner import VisPruner

    seen = {}
    original = VisPruner.select

    def spy(self, i, stage, signals):
        seen["cls"] = signals.cls_attention
        return original(self, i, stage, signals)

    VisPruner.select = spy
    try:
        with vtprune.pruned(sdpa, "vispruner", keep=8):
            forward(sdpa, batch_inputs)
    finally:
        VisPruner.select = original
    torch.testing.assert_close(seen["cls"], expected, rtol=1e-4, atol=1e-6)


class _FakeLLMSignals:
    def __init__(self, attn):
        self._attn = attn
        b, _, _, v = attn.shape
        self.images_per_sample = 1
        self.num_visual = v
        self.visual_valid = torch.ones(b, v, dtype=torch.bool)

    def attention(self, queries):
        return self._attn, torch.ones(self._attn.shape[0], self._attn.shape[2], dtype=torch.bool)


def test_fastv_hand_computed_example():
    """Hand-computed: s = [.10,.30,.05,.25,.20,.05], keep 3 -> {1,3,4} in raster order."""
    s = torch.tensor([0.10, 0.30, 0.05, 0.25, 0.20, 0.05])
    attn = torch.stack([s + 0.02, s - 0.02])[None, :, None, :]  # two heads whose mean is s
    method = vtprune.get_method("fastv", keep=3)
    stage = method.stages(ModelInfo(4, 2, 6, (2, 3), 2, 2))[0]
    sel = method.select(0, stage, _FakeLLMSignals(attn))
    assert sel.indices.tolist() == [[1, 3, 4]]
    torch.testing.assert_close(sel.scores, s[None])


def test_l2norm_hand_computed_example():
    class Sig:
        projected = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 6.0], [2.0, 2.0]]])
        features = projected

    method = vtprune.get_method("l2norm", keep=2)
    sel = method.select(0, Stage(kind="vision", keep=2), Sig())
    torch.testing.assert_close(sel.scores, torch.tensor([[5.0, 1.0, 6.0, 8**0.5]]))
    assert sel.indices.tolist() == [[0, 2]]  # norms 5 and 6, raster order


def test_random_is_seeded_and_batch_independent():
    class Sig:
        features = torch.zeros(3, 64, 4)
        image_sample = torch.tensor([0, 1, 2])

    a = vtprune.get_method("random", keep=5, seed=1).select(0, Stage(kind="vision", keep=5), Sig())
    b = vtprune.get_method("random", keep=5, seed=1).select(0, Stage(kind="vision", keep=5), Sig())
    c = vtprune.get_method("random", keep=5, seed=2).select(0, Stage(kind="vision", keep=5), Sig())
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    assert all(row == sorted(row) for row in a.indices.tolist())


@pytest.mark.parametrize("name", ["vispruner", "fastv"])
def test_beam_search_and_multiple_returns(tiny, batch_inputs, name):
    """generate() expands each sample for beams / num_return_sequences; every copy keeps the same tokens."""
    model, _, _ = tiny
    with vtprune.pruned(model, name, keep=16):
        model.generate(**batch_inputs, max_new_tokens=2, do_sample=False)
        kept = vtprune.last_record(model).stages[0].kept
        out = model.generate(**batch_inputs, max_new_tokens=3, num_beams=2, do_sample=False)
        beams = vtprune.last_record(model).stages[0].kept
        torch.manual_seed(0)
        sampled = model.generate(**batch_inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2)
        copies = vtprune.last_record(model).stages[0].kept
    assert out.shape[0] == 3 and sampled.shape[0] == 6
    assert beams == [k for k in kept for _ in range(2)]
    assert copies == [k for k in kept for _ in range(2)]
