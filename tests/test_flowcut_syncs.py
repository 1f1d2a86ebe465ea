"""FlowCut's vit stage syncs with the host at most once per pruning layer, and selects exactly as before.

On CPU nothing really waits, so the test counts the calls that would block on a GPU (`tolist`, `item`,
`bool()`, `int()`, `float()`, `__index__` on a tensor) while the vision tower runs and during a whole prefill.
The old `merge_vit` (three possible syncs per layer) is kept here as the reference: the kept patches, the
record, the logits, the tower's features and the generated tokens are bitwise equal.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import QUESTIONS, build_inputs

import vtprune
from vtprune.methods.base import Stage
from vtprune.methods.flowcut import FlowCut, flowcut_prune_count, flowcut_scores
from vtprune.models.llava import LlavaAdapter
from vtprune.signals.context import Captured, ViTLayerSignals


# --- reference: FlowCut.merge_vit before the sync cut ----------------------------------------------------
def old_merge_vit(self, stage, layer, hidden, signals):
    n, t, _ = hidden.shape
    dev = hidden.device
    identity = torch.arange(t, device=dev).expand(n, t)
    valid = signals.valid if signals.valid is not None else torch.ones(n, t, dtype=torch.bool, device=dev)
    patches_valid = valid[:, 1:]
    present = patches_valid.sum(dim=1)
    if bool((present <= stage.keep).all()):
        return hidden, identity, signals.valid
    cls_attention = signals.cls_attention_heads.mean(dim=1)[:, 1:]
    values = signals.values
    dots = torch.matmul(values[:, :, :1], values.transpose(-1, -2))[:, :, 0]
    dots = dots.masked_fill(~valid[:, None, :], float("-inf"))
    semantic = torch.softmax(dots, dim=-1).mean(dim=1)[:, 1:]
    score = flowcut_scores(cls_attention, semantic, values.mean(dim=1)[:, 1:], patches_valid)
    past = signals.state.get("cumulative")
    cumulative = score if past is None else self.decay * past + (1 - self.decay) * score
    signals.state["cumulative"] = cumulative
    rpl = stage.vit_layers[-1] - layer
    if rpl % self.stride:
        return hidden, identity, signals.valid
    if rpl == 0:
        target = torch.full_like(present, stage.keep)
    else:
        removed = flowcut_prune_count(cls_attention, patches_valid, stage.keep, rpl)
        target = torch.maximum(present - removed, torch.full_like(present, stage.keep))
    target = torch.minimum(target, present)
    width = int(target.max())
    ranked = cumulative.masked_fill(~patches_valid, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :width]
    slot_ok = torch.arange(width, device=dev) < target[:, None]
    key = torch.where(slot_ok, order, t + torch.arange(width, device=dev))
    raster = torch.sort(key, dim=1).indices
    kept_patches = order.gather(1, raster)
    new_valid = slot_ok.gather(1, raster)
    kept = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=dev), kept_patches + 1], dim=1)
    merged = hidden.gather(1, kept[:, :, None].expand(-1, -1, hidden.shape[-1]))
    signals.state["cumulative"] = cumulative.gather(1, kept_patches)
    if bool(new_valid.all()):
        return merged, kept
    all_valid = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=dev), new_valid], dim=1)
    return merged, kept, all_valid


# --- helpers ---------------------------------------------------------------------------------------------
SYNCS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_syncs(monkeypatch, tower):
    """Yields a list that collects (call, inside the vision tower?) for each tensor-to-host call."""
    calls: list[tuple[str, bool]] = []
    in_tower = [False]

    def counted(name, original):
        def call(tensor, *args, **kwargs):
            calls.append((name, in_tower[0]))
            return original(tensor, *args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        for name in SYNCS:
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        # Registered after the session's hooks: the tower count includes its output tagging.
        enter = tower.register_forward_pre_hook(lambda *_: in_tower.__setitem__(0, True), prepend=True)
        leave = tower.register_forward_hook(lambda *_: in_tower.__setitem__(0, False))
        try:
            yield calls
        finally:
            enter.remove()
            leave.remove()


@pytest.fixture(scope="module")
def deep():
    """A tiny LLaVA with a 10-layer CLIP tower (feature layer 8: FlowCut runs at layers 0-7 and prunes at 1, 3,
    5 and 7, i.e. rpl = 6, 4, 2, 0) whose attention is peaky enough for the images' counts to differ."""
    from vtprune.testing import make_tiny_llava

    model, processor = make_tiny_llava(seed=0, vision_layers=10)
    with torch.no_grad():
        for layer in LlavaAdapter(model).vision_layers:
            layer.self_attn.q_proj.weight.mul_(5)
            layer.self_attn.k_proj.weight.mul_(5)
    return model, processor


def prefill_syncs(model, inputs, monkeypatch, **params):
    with vtprune.pruned(model, "flowcut", **params), torch.no_grad():
        with counting_syncs(monkeypatch, LlavaAdapter(model).vision_tower) as calls:
            model(**inputs)
        counts = vtprune.last_record(model).stages[0].extra["patches_after_layer"]
    return calls, counts


def test_one_sync_per_pruning_layer_before_the_last(deep, monkeypatch):
    """Three images that keep different counts: the tower syncs once at each of its pruning layers with rpl > 0
    (the padded width and whether every image fills it, in one transfer) and never elsewhere; the old code
    synced at every layer (the budget check) and twice more at each pruning layer."""
    model, processor = deep
    inputs = build_inputs(processor, QUESTIONS, [1, 2, 3])
    calls, counts = prefill_syncs(model, inputs, monkeypatch, keep=12)
    assert len({tuple(c) for c in counts}) > 1  # the images' counts differ between pruning layers
    tower = [name for name, inside in calls if inside]
    assert tower == ["tolist"] * 3, tower
    with monkeypatch.context() as patch:
        patch.setattr(FlowCut, "merge_vit", old_merge_vit)
        old_calls, old_counts = prefill_syncs(model, inputs, monkeypatch, keep=12)
    assert old_counts == counts
    old_tower = [name for name, inside in old_calls if inside]
    print(
        f"syncs in the tower {len(old_tower)} -> {len(tower)}, whole prefill {len(old_calls)} -> {len(calls)}"
    )
    assert len(old_tower) == 8 + 2 * 4  # a budget check at each of the 8 layers, width and all-valid at 4
    # The whole prefill: the 3 above, the input layout (read from host copies of the ids and the mask, taken
    # before the tower: no wait on a GPU, which tests/test_prefill_syncs.py checks there; the LLM stages' "text"
    # rows' width among them), the records (one transfer) and the LLM's mask; 31 before the sync cut.
    assert len(calls) <= 19, calls


def test_no_sync_when_every_image_is_at_its_budget(deep, monkeypatch):
    """keep ≥ the patches: FlowCut keeps everything without looking at a device value."""
    model, processor = deep
    inputs = build_inputs(processor, QUESTIONS[:2], [1, 2])
    calls, _ = prefill_syncs(model, inputs, monkeypatch, keep=64)
    assert [name for name, inside in calls if inside] == []


# --- the same results as the old merge_vit -------------------------------------------------------------------
def results(model, inputs, params):
    """Everything FlowCut decides, bitwise: the tower's positions, counts and features, the record, the
    logits and three greedy tokens."""
    suppress = [model.config.image_token_id]
    with vtprune.pruned(model, "flowcut", **params), torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            output_hidden_states=True,
            return_dict=True,
        )
        logits = model(**inputs).logits
        record = vtprune.last_record(model)
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
    return {
        "positions": features._vtprune_vit_positions,
        "counts": features._vtprune_vit_counts,
        "hidden": features.hidden_states[-2],
        "projected": list(features.pooler_output),  # per image, zero-padded to its placeholder count
        "record": [(s.kind, s.kept, s.counts, s.extra) for s in record.stages],
        "logits": logits,
        "tokens": tokens,
    }


BATCHES = [([0], [1]), ([0, 1], [4, 5]), ([0, 1, 2], [1, 2, 3]), ([2, 0, 1, 2], [6, 7, 8, 9])]
PARAMS = [  # the synthetic test below covers the merge's settings widely; these run the whole model
    {"keep": 12},
    {"keep": 50},  # some images reach the budget before the last pruning layer
    {"keep": 20, "stride": 3, "decay": 0.25},
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_same_results_as_the_old_merge(deep, monkeypatch, params, attn):
    model, processor = deep
    if attn == "eager":
        import copy

        model = copy.deepcopy(model)
        model.set_attn_implementation("eager")
    ragged = False
    for questions, seeds in BATCHES:
        inputs = build_inputs(processor, [QUESTIONS[q] for q in questions], seeds)
        new = results(model, inputs, params)
        with monkeypatch.context() as patch:
            patch.setattr(FlowCut, "merge_vit", old_merge_vit)
            old = results(model, inputs, params)
        for key in new:
            if isinstance(new[key], torch.Tensor):
                assert torch.equal(new[key], old[key]), key
            elif key == "projected":
                assert all(torch.equal(a, b) for a, b in zip(new[key], old[key], strict=True))
            else:
                assert new[key] == old[key], key
        ragged |= len({tuple(c) for c in new["record"][0][3]["patches_after_layer"]}) > 1
    if params["keep"] < 50:
        assert ragged  # the batches exercised images with different counts between pruning layers


# --- merge_vit alone, on synthetic layers ------------------------------------------------------------------
def run_merges(merge, method, stage, layers_qkv, hidden):
    """Feed `merge` one synthetic layer after another as the engine does; returns every output (a layer that
    removed nothing, None, as the old code's identity)."""
    outputs, valid, state = [], None, {}
    for layer, (q, k, v) in zip(stage.vit_layers, layers_qkv, strict=True):
        kept_rows = hidden.shape[1]
        captured = Captured(q[:, :, :kept_rows], k[:, :, :kept_rows], 0.5, v[:, :, :kept_rows])
        out = merge(method, stage, layer, hidden, ViTLayerSignals(layer, captured, valid, state))
        if out is None:  # nothing removed: what the old merge returned at such a layer
            n, t, _ = hidden.shape
            out = (hidden, torch.arange(t).expand(n, t), valid)
        outputs.append(out)
        hidden, valid = out[0], out[2] if len(out) > 2 else None
    return outputs


SHARPNESS = {"mixed": [0.3, 1.0, 4.0, 30.0, 300.0], "peaky": [300.0] * 5, "flat": [0.0] * 5}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sharp", SHARPNESS)
@pytest.mark.parametrize(("keep", "stride"), [(3, 1), (5, 2), (12, 2), (20, 3), (24, 1), (30, 2), (32, 2)])
def test_merge_vit_equals_the_old_one_on_synthetic_layers(seed, sharp, keep, stride):
    """Five images whose [CLS] attention ranges from flat (nothing removed before the last layer) to
    one-hot (at stride 1 every image is at its budget one layer early): every output of every layer is
    bitwise the old one's, padded widths and validity included."""
    g = torch.Generator().manual_seed(seed)
    n, heads, tokens, dh, layers = 5, 2, 33, 4, 7
    method = FlowCut(keep=keep, stride=stride)
    stage = Stage(kind="vit", keep=keep, vit_layers=tuple(range(layers)), vit_remove=0, name="flowcut")
    sharpness = torch.tensor(SHARPNESS[sharp])[:, None, None, None]  # scales each image's keys
    layers_qkv = []
    for _ in range(layers):
        q = torch.randn(n, heads, tokens, dh, generator=g)
        k = torch.randn(n, heads, tokens, dh, generator=g) * sharpness.sqrt()
        v = torch.randn(n, heads, tokens, dh, generator=g)
        layers_qkv.append((q, k, v))
    hidden = torch.randn(n, tokens, 8, generator=g)
    new = run_merges(FlowCut.merge_vit, method, stage, layers_qkv, hidden)
    old = run_merges(old_merge_vit, method, stage, layers_qkv, hidden)
    for layer, (a, b) in enumerate(zip(new, old, strict=True)):
        assert len(a) == len(b), layer
        for x, y in zip(a, b, strict=True):
            assert (x is None and y is None) or torch.equal(x, y), layer
