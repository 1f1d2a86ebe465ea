"""FlowCut's vit stage does no merge work at the layers that only score, and decides exactly as before.

FlowCut scores at every CLIP layer before the feature layer but removes patches only at every other one. The
per-layer path it replaced (kept below as the reference: the engine's hooks and `merge_vit` as they were)
ran the merge machinery at every layer: an identity gather of the positions, a one-token stub through the
layer's MLP and the MLP again on the "merged" states, a count per layer and a fresh padding mask at every
later layer. These tests check that the tower's outputs (kept positions, counts, every layer's hidden states,
the projection), the record, the logits and the generated tokens are bitwise those of the reference; that
a layer that removes nothing runs whole; that the padding mask is built once per merge; and that the tower
dispatches far fewer torch operations per prefill.
"""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import QUESTIONS, build_inputs
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import vtprune
import vtprune.engine.session as session_module
from vtprune import compat
from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, ModelInfo, Stage
from vtprune.methods.flowcut import FlowCut
from vtprune.models.llava import LlavaAdapter
from vtprune.signals.context import Captured, ViTLayerSignals

AddCapture = object


# --- reference: the per-layer path before the scoring layers were cut short -----------------------------
def reference_scores(cls_attention: Tensor, semantic: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """(N, P) information-flow score of each patch: (a/Σa + s/Σs)·‖v̄‖₁, 0 on invalid slots."""
    a = cls_attention.float() * valid
    s = semantic.float() * valid
    relation = a / a.sum(dim=1, keepdim=True).clamp(min=1e-30)
    semantic_score = s / s.sum(dim=1, keepdim=True).clamp(min=1e-30)
    return (relation + semantic_score) * values.float().abs().sum(dim=-1) * valid


def reference_prune_count(cls_attention: Tensor, valid: Tensor, keep: int, rpl: int) -> Tensor:
    """(N,) patches to remove with `rpl` pruning layers left: round((P − T)/√rpl · (1 − (H/Hmax)²))."""
    p = valid.sum(dim=1).float()
    a = cls_attention.float() * valid
    prob = a / a.sum(dim=1, keepdim=True).clamp(min=1e-30)
    entropy = -torch.special.xlogy(prob, prob).sum(dim=1)
    ratio = entropy / torch.log(p).clamp(min=1e-30)
    return ((p - keep) / math.sqrt(rpl) * (1 - ratio**2)).round().long()


def per_layer_merge_vit(self, stage, layer, hidden, signals):
    n, t, _ = hidden.shape
    dev = hidden.device
    identity = torch.arange(t, device=dev).expand(n, t)
    if t - 1 <= stage.keep:  # the largest image is down to its budget, so every image is
        return hidden, identity, signals.valid
    valid = signals.valid if signals.valid is not None else torch.ones(n, t, dtype=torch.bool, device=dev)
    patches_valid = valid[:, 1:]
    present = patches_valid.sum(dim=1)
    cls_attention = signals.cls_attention_heads.mean(dim=1)[:, 1:]
    values = signals.values  # (N, H, T, dh)
    # Per head, softmax over the tokens of v_CLS · v_j (unscaled, as the official code), then head mean.
    dots = torch.matmul(values[:, :, :1], values.transpose(-1, -2))[:, :, 0]  # (N, H, T)
    dots = dots.masked_fill(~valid[:, None, :], float("-inf"))
    semantic = torch.softmax(dots, dim=-1).mean(dim=1)[:, 1:]
    score = reference_scores(cls_attention, semantic, values.mean(dim=1)[:, 1:], patches_valid)
    past = signals.state.get("cumulative")
    cumulative = score if past is None else self.decay * past + (1 - self.decay) * score
    signals.state["cumulative"] = cumulative
    rpl = stage.vit_layers[-1] - layer  # pruning layers left after this one: F − 1 − l
    if rpl % self.stride:
        return hidden, identity, signals.valid
    if rpl == 0:
        # Every image holds at least `keep` patches (see above) and keeps exactly `keep`: no sync.
        target = torch.full_like(present, stage.keep)
        width, ragged = stage.keep, False
    else:
        removed = reference_prune_count(cls_attention, patches_valid, stage.keep, rpl)
        target = torch.maximum(present - removed, torch.full_like(present, stage.keep))
        target = torch.minimum(target, present)  # never more patches than the image has
        # The one host sync of the layer: the padded width (a data-dependent shape) and whether every
        # image fills it, i.e. whether the next layers need a padding mask.
        low, width = torch.stack(torch.aminmax(target)).tolist()
        ragged = low < width
    ranked = cumulative.masked_fill(~patches_valid, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :width]
    slot_ok = torch.arange(width, device=dev) < target[:, None]
    # Raster order of the kept patches; padding slots (sorted last) point at any patch and are masked.
    key = torch.where(slot_ok, order, t + torch.arange(width, device=dev))
    raster = torch.sort(key, dim=1).indices
    kept_patches = order.gather(1, raster)
    kept = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=dev), kept_patches + 1], dim=1)
    merged = hidden.gather(1, kept[:, :, None].expand(-1, -1, hidden.shape[-1]))
    signals.state["cumulative"] = cumulative.gather(1, kept_patches)
    if not ragged:
        return merged, kept
    new_valid = slot_ok.gather(1, raster)
    all_valid = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=dev), new_valid], dim=1)
    return merged, kept, all_valid


class PerLayerVitMerging:
    def __init__(self, method: Method, stage: Stage, adapter, info: ModelInfo):
        self.method, self.stage, self.adapter, self.info = method, stage, adapter, info
        self.qk: dict[int, Captured] = {}
        self.merged: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None  # (N, T) tower positions of the surviving patches
        self.valid: torch.Tensor | None = None  # (N, T) after a merge that kept different counts
        self.state: dict = {}
        self.counts: list[torch.Tensor] = []
        self.pad_projection = False

    def attach(self, add_capture: AddCapture) -> list:
        handles = [
            self.adapter.vision_tower.register_forward_pre_hook(self._reset),
            self.adapter.projector.register_forward_hook(self._pad_hook),
        ]
        for layer in self.stage.vit_layers:
            module = self.adapter.vision_layers[layer]
            add_capture(module.self_attn, self._capture_for(layer), with_value=True)
            handles.append(module.layer_norm2.register_forward_pre_hook(self._merge_hook(layer)))
            handles.append(module.register_forward_hook(self._finish_hook(layer), prepend=True))
        # Later layers mask the padding slots of images that kept fewer patches (adaptive merges only).
        for module in self.adapter.vision_layers[self.stage.vit_layers[0] + 1 :]:
            handles.append(module.register_forward_pre_hook(self._mask_hook, with_kwargs=True))
        return handles

    def tag_output(self, output) -> None:
        output._vtprune_vit_positions = self.positions
        if self.valid is not None and not bool(self.valid.all()):
            raise PruneConfigError(
                f"{self.method.name}: the vit stage left the images of a batch with different patch counts"
            )
        output._vtprune_vit_counts = torch.stack(self.counts, dim=1) if self.counts else None
        self.pad_projection = self.positions is not None
        self.positions = None

    def original_index(self, image_out, expanded_from: torch.Tensor | None) -> torch.Tensor:
        positions = getattr(image_out, "_vtprune_vit_positions", None)
        if positions is None:
            raise PruneConfigError(
                f"{self.method.name}: the image features were computed without vtprune's vit-stage hooks "
                "(before vtprune.prune() was applied); pass pixel_values instead"
            )
        if expanded_from is not None:
            positions = positions[expanded_from]
        # Tower positions count the [CLS] (always kept, first); LLaVA's "default" features drop it.
        return positions[:, 1:] - 1 if self.adapter.select_strategy == "default" else positions

    # --- hooks --------------------------------------------------------------------------------------------
    def _capture_for(self, layer: int):
        def capture(_module, query, key, scaling, value=None):
            self.qk[layer] = Captured(query, key, float(scaling), value)  # read by this layer's merge

        return capture

    def _reset(self, module, args):
        self.qk.clear()
        self.merged.clear()
        self.positions = None
        self.valid = None
        self.state = {}
        self.counts = []
        self.pad_projection = False

    def _mask_hook(self, module, args, kwargs):
        valid = self.valid
        if valid is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if compat.attention_implementation(self.adapter.config.vision_config).startswith("flash"):
            raise PruneConfigError(
                f"{self.method.name}: per-image patch counts inside the vision tower need an sdpa or eager "
                "vision tower"
            )
        mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        if len(args) > 1:
            given = args[1]
            return (args[0], mask if given is None else given + mask, *args[2:]), kwargs
        kwargs = dict(kwargs)
        given = kwargs.get("attention_mask")
        kwargs["attention_mask"] = mask if given is None else given + mask
        return args, kwargs

    def _pad_hook(self, module, args, output):
        if not self.pad_projection:
            return None
        self.pad_projection = False  # only the projection that directly follows the tower
        missing = self.info.visual_tokens - output.shape[1]
        return F.pad(output, (0, 0, 0, missing)) if missing > 0 else None

    def _merge_hook(self, layer: int):
        def hook(module, args):
            hidden = args[0]  # (N, T, Dv): the residual stream after layer `layer`'s attention sub-block
            captured = self.qk.pop(layer)
            n, t, _ = hidden.shape
            signals = ViTLayerSignals(layer, captured, self.valid, self.state)
            out = self.method.merge_vit(self.stage, layer, hidden, signals)
            # (merged, kept positions) or, when images keep different counts, (merged, kept, valid)
            merged, kept = out[0], out[1]
            valid = out[2] if len(out) > 2 else None
            if self.positions is None:
                self.positions = torch.arange(t, device=hidden.device).expand(n, t)
            self.positions = torch.gather(self.positions, 1, kept)
            self.valid = valid
            if self.stage.vit_remove == 0:  # adaptive: record the patches each image keeps ([CLS] first)
                width = kept.shape[1] - 1
                count = valid[:, 1:].sum(dim=1) if valid is not None else kept.new_full((n,), width)
                self.counts.append(count)
            self.merged[layer] = merged.to(hidden.dtype)
            return (hidden[:, :1],)  # the stub: the layer's own ln2/MLP output is replaced below

        return hook

    def _finish_hook(self, layer: int):
        def hook(module, args, output):
            merged = self.merged.pop(layer)
            ln = module.layer_norm2
            normed = F.layer_norm(merged, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            out = merged + module.mlp(normed)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook


def use_reference(patch) -> None:
    """Run the per-layer path: its engine hooks and its merge_vit."""
    patch.setattr(session_module, "VitMerging", PerLayerVitMerging)
    patch.setattr(FlowCut, "merge_vit", per_layer_merge_vit)


# --- fixtures and helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep():
    """A tiny LLaVA with a 10-layer CLIP tower (feature layer 8: FlowCut scores at layers 0-7 and prunes at
    1, 3, 5 and 7) whose attention is peaky enough for the images' counts to differ between pruning layers."""
    from vtprune.testing import make_tiny_llava

    model, processor = make_tiny_llava(seed=0, vision_layers=10)
    with torch.no_grad():
        for layer in LlavaAdapter(model).vision_layers:
            layer.self_attn.q_proj.weight.mul_(5)
            layer.self_attn.k_proj.weight.mul_(5)
    return model, processor


def tower_features(model, inputs):
    return model.model.get_image_features(
        pixel_values=inputs["pixel_values"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        output_hidden_states=True,
        return_dict=True,
    )


def results(model, inputs, params):
    """Everything FlowCut decides, bitwise: the tower's positions, counts, hidden states of every layer and
    projection, the record, the logits and three greedy tokens."""
    suppress = [model.config.image_token_id]
    with vtprune.pruned(model, "flowcut", **params), torch.no_grad():
        features = tower_features(model, inputs)
        logits = model(**inputs).logits
        record = vtprune.last_record(model)
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
    return {
        "positions": features._vtprune_vit_positions,
        "counts": features._vtprune_vit_counts,
        "hidden": list(features.hidden_states),
        "projected": list(features.pooler_output),
        "record": [(s.kind, s.kept, s.counts, s.extra) for s in record.stages],
        "logits": logits,
        "tokens": tokens,
    }


def assert_same(new, old):
    for key in new:
        if isinstance(new[key], torch.Tensor):
            assert torch.equal(new[key], old[key]), key
        elif key in ("hidden", "projected"):
            assert len(new[key]) == len(old[key]), key
            assert all(torch.equal(a, b) for a, b in zip(new[key], old[key], strict=True)), key
        else:
            assert new[key] == old[key], key


BATCHES = [([0], [1]), ([0, 1, 2], [1, 2, 3]), ([2, 0, 1, 2], [6, 7, 8, 9])]
PARAMS = [
    {"keep": 12},
    {"keep": 50},  # some images reach the budget before the last pruning layer
    {"keep": 20, "stride": 3, "decay": 0.25},
    {"keep": 64},  # every image is at its budget: nothing is ever removed
]


# --- the same results as the per-layer path ------------------------------------------------------------------
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_same_tower_output_and_decisions_as_the_per_layer_path(deep, monkeypatch, params, attn):
    model, processor = deep
    if attn == "eager":
        model = copy.deepcopy(model)
        model.set_attn_implementation("eager")
    ragged = False
    for questions, seeds in BATCHES:
        inputs = build_inputs(processor, [QUESTIONS[q] for q in questions], seeds)
        new = results(model, inputs, params)
        with monkeypatch.context() as patch:
            use_reference(patch)
            old = results(model, inputs, params)
        assert_same(new, old)
        ragged |= len({tuple(c) for c in new["record"][0][3]["patches_after_layer"]}) > 1
    if params["keep"] < 50:
        assert ragged  # the batches exercised images with different counts between pruning layers


# --- what runs at each layer ----------------------------------------------------------------------------------
def mlp_widths(model, inputs, keep):
    """{CLIP layer: the token widths its MLP ran on} during one tower forward."""
    widths = collections.defaultdict(list)
    layers = LlavaAdapter(model).vision_layers
    handles = [
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: widths[i].append(args[0].shape[1]))
        for i, layer in enumerate(layers)
    ]
    try:
        with vtprune.pruned(model, "flowcut", keep=keep), torch.no_grad():
            tower_features(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return dict(widths)


def test_scoring_layers_run_whole(deep, monkeypatch):
    """Layers 0, 2, 4, 6 only score: their MLP runs once, on every token. The pruning layers 1, 3, 5, 7 hand
    their MLP a one-token stub and run it again on the survivors. The per-layer path did that everywhere."""
    model, processor = deep
    inputs = build_inputs(processor, QUESTIONS, [1, 2, 3])
    widths = mlp_widths(model, inputs, keep=12)
    for layer in (0, 2, 4, 6, 8, 9):
        assert len(widths[layer]) == 1, (layer, widths)
    assert widths[0] == [65]
    for layer in (1, 3, 5, 7):
        assert widths[layer][0] == 1 and len(widths[layer]) == 2, (layer, widths)
    assert widths[7][1] == 13 and widths[8] == [13]  # [CLS] + keep
    with monkeypatch.context() as patch:
        use_reference(patch)
        old = mlp_widths(model, inputs, keep=12)
    assert all(old[layer][0] == 1 and len(old[layer]) == 2 for layer in range(8)), old
    # at its budget FlowCut removes nothing: no layer takes the merge path
    assert all(len(w) == 1 for w in mlp_widths(model, inputs, keep=64).values())


def test_padding_mask_is_built_once_per_merge(deep):
    """Images that keep different counts: the layers between two merges get the same additive key mask."""
    model, processor = deep
    inputs = build_inputs(processor, QUESTIONS, [1, 2, 3])
    masks = {}
    layers = LlavaAdapter(model).vision_layers

    def record(i):
        def hook(_module, args, kwargs):
            masks[i] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

        return hook

    with vtprune.pruned(model, "flowcut", keep=12), torch.no_grad():
        # registered after the session's hooks: sees the mask they hand the layer
        handles = [
            layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        try:
            features = tower_features(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
    counts = features._vtprune_vit_counts
    assert len({tuple(c) for c in counts.tolist()}) > 1
    assert masks[0] is None and masks[1] is None
    for first, second in ((2, 3), (4, 5), (6, 7)):  # after the merges at layers 1, 3 and 5
        assert masks[first] is not None and masks[first] is masks[second], first
    assert masks[2] is not masks[4] is not masks[6]
    assert masks[8] is None  # the last pruning layer leaves every image with `keep` patches


# --- host work: torch operations dispatched per prefill ------------------------------------------------------
class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def tower_ops(model, inputs, method=None, **params):
    """aten operations the vision tower dispatches in one forward (hooks included), pruned or not."""
    context = vtprune.pruned(model, method, **params) if method else torch.no_grad()
    with context, torch.no_grad():
        tower_features(model, inputs)  # warm-up: one-time work stays out of the count
        with OpCounter() as counter:
            tower_features(model, inputs)
    return counter.count


def test_fewer_torch_ops_per_prefill(deep, monkeypatch):
    """Batch 4, a 10-layer tower, FlowCut scoring at 8 layers and pruning at 4: the operations FlowCut adds
    to the tower fell from 784 (the per-layer path) to 461 (CPU, torch 2.x)."""
    model, processor = deep
    inputs = build_inputs(processor, [QUESTIONS[i % 3] for i in range(4)], [1, 2, 3, 4])
    plain = tower_ops(model, inputs)
    new = tower_ops(model, inputs, "flowcut", keep=12) - plain
    with monkeypatch.context() as patch:
        use_reference(patch)
        old = tower_ops(model, inputs, "flowcut", keep=12) - plain
    print(f"aten ops FlowCut adds to the tower: {old} -> {new} (the tower alone: {plain})")
    assert new <= 0.65 * old, (old, new)
    assert new <= 510, new  # the per-layer path: 784
