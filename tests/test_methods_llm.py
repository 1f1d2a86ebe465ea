"""LLM-stage methods of the methods issue: SparseVLM, PyramidDrop, HiMAP, TokenCarve, iLLaVA.

Hand-computed scores on hand-made inputs (a fake LLMSignals), the budget/schedule arithmetic of
the method pages (docs/methods/sparsevlm.md, pdrop.md, himap.md), and checks on the tiny model: scores equal their definition recomputed by hand,
merged/created tokens reach the LLM, SparseVLM v1's per-sample counts are exact per sample, and the
debias/head options change selections (debias only at the first stage; strength 0 changes nothing).
The engine invariants (keep-all, oracle, batched == single, cache, sdpa == eager) are in cases_llm.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import QUESTIONS, build_inputs
from oracle import oracle_logits
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vtprune
from vtprune.methods.base import ModelInfo, PruneConfigError, Stage
from vtprune.methods.himap import HiMAP
from vtprune.methods.pdrop import PyramidDrop, pdrop_ratio_for_average
from vtprune.methods.sparsevlm import (
    recycle_counts,
    rope_prior,
    sparsevlm_schedule,
    text_raters,
)
from vtprune.models.llava import LlavaAdapter


# Budget arithmetic of the papers, used only to check vtprune's tables against them.
def pdrop_layer_average(counts: list[int], layers: tuple[int, ...], num_layers: int, visual: int) -> float:
    """Average visual tokens per layer when layer layers[s] and later see counts[s] tokens."""
    bounds = (*layers, num_layers)
    total = layers[0] * visual + sum(c * (bounds[s + 1] - bounds[s]) for s, c in enumerate(counts))
    return total / num_layers


def stage_counts(n_visual: int, kept: list[int], recycle: bool = True) -> list[int]:
    """Visual tokens after each stage (kept + recycled) for fixed per-stage keep counts — the repo's
    accounting (192 → 309 / 204 / 113, see the module docstring)."""
    out = []
    n = n_visual
    for k in kept:
        k = min(k, n)
        n = k + (recycle_counts(n - k)[1] if recycle else 0)
        out.append(n)
    return out


LLAVA15 = ModelInfo(
    num_layers=32, num_heads=32, visual_tokens=576, grid=(24, 24), vision_layers=24, vision_heads=16
)
TINY = ModelInfo(num_layers=4, num_heads=4, visual_tokens=64, grid=(8, 8), vision_layers=3, vision_heads=4)


class FakeSignals:
    """The parts of LLMSignals the methods read, from hand-made tensors (one image per sample)."""

    def __init__(
        self,
        attention=None,
        hidden=None,
        tokens_per_image=None,
        input_embeds=None,
        input_visual_index=None,
        input_valid=None,
    ):
        self._attention = attention or {}
        first = next(iter(self._attention.values()))[0] if self._attention else hidden
        b, v = first.shape[0], first.shape[-1] if self._attention else first.shape[1]
        self.images_per_sample = 1
        self.num_visual = v
        self.tokens_per_image = tokens_per_image or v
        self.visual_valid = torch.ones(b, v, dtype=torch.bool)
        self._hidden = hidden
        self.input_embeds = input_embeds
        self.input_visual_index = input_visual_index
        self.input_valid = input_valid

    def attention(self, queries):
        return self._attention[queries]

    def visual_hidden(self):
        return self._hidden

    def is_full_visual_set(self):
        return True

    def text_counts(self):
        return self._attention["text"][1].sum(dim=1)

    def set_text_width(self, width):
        assert width == self._attention["text"][0].shape[2]


def llm_stage(keep, queries, layer=1, positions="original"):
    return Stage(
        kind="llm", keep=keep, score_layer=layer - 1, prune_layer=layer, positions=positions, queries=queries
    )


# --- SparseVLM -------------------------------------------------------------------------------------------


def rater_inputs(batch=1):
    """[sys, v0..v3, t0, t1, t2]: visual embeddings (1, 0); t0 = t2 = (2, 0), t1 = (0, 0).

    Each visual row of softmax(H_v·H_qᵀ) is [e², 1, e²] / (2e² + 1), so r = that row, mean(r) = 1/3 and the
    raters are t0 and t2 (0.468 > 1/3 > 0.063)."""
    seq = torch.tensor([[5.0, 5.0], [1, 0], [1, 0], [1, 0], [1, 0], [2, 0], [0, 0], [2, 0]])
    embeds = seq[None].expand(batch, -1, -1).clone()
    visual = torch.arange(1, 5).expand(batch, -1)
    return embeds, visual, torch.ones(batch, 8, dtype=torch.bool)


def rater_signals(attn, tokens_per_image):
    """FakeSignals for SparseVLM: `attn` (B, heads, 3 text rows, 4 visual) on the inputs of `rater_inputs`."""
    embeds, visual, valid = rater_inputs(attn.shape[0])
    return FakeSignals(
        {"text": (attn, torch.ones(attn.shape[0], 3, dtype=torch.bool))},
        input_embeds=embeds,
        input_visual_index=visual,
        input_valid=valid,
        tokens_per_image=tokens_per_image,
    )


def test_sparsevlm_text_raters_hand_example():
    embeds, visual, valid = rater_inputs(2)
    # sample 1 is left-padded by one token (the pad is invalid and must not count as text or visual)
    embeds[1] = torch.cat([torch.zeros(1, 2), embeds[1, 1:]])
    valid[1, 0] = False
    sig = FakeSignals(
        hidden=torch.zeros(2, 4, 2), input_embeds=embeds, input_visual_index=visual, input_valid=valid
    )
    assert text_raters(sig).tolist() == [[True, False, True], [True, False, True]]
    # a token before the image is never a rater; a single text token (no token above the mean) rates alone
    embeds2 = torch.tensor([[[9.0, 9.0], [1, 0], [1, 0], [3, 0]]])
    sig2 = FakeSignals(
        hidden=torch.zeros(1, 2, 2),
        input_embeds=embeds2,
        input_visual_index=torch.tensor([[1, 2]]),
        input_valid=torch.ones(1, 4, dtype=torch.bool),
    )
    assert text_raters(sig2).tolist() == [[True]]


def sparsevlm_attention():
    """(1, 2 heads, 3 text rows, 4 visual): rater rows (0, 2) average to [.2, .1, .25, .1]; the non-rater row 1
    puts everything on token 3 (it would win if all text rows were averaged)."""
    head0 = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.9], [0.3, 0.0, 0.1, 0.2]])
    head1 = torch.tensor([[0.3, 0.0, 0.1, 0.2], [0.0, 0.0, 0.0, 0.9], [0.1, 0.2, 0.5, 0.0]])
    return torch.stack([head0, head1])[None]


def test_sparsevlm_scores_are_rater_mean_hand_example():
    sig = rater_signals(sparsevlm_attention(), tokens_per_image=4)
    method = vtprune.get_method("sparsevlm", recycle=False)
    sel = method.select(0, llm_stage(2, "text", positions="reindex"), sig)
    torch.testing.assert_close(sel.scores, torch.tensor([[0.2, 0.1, 0.25, 0.1]]))
    assert sel.indices.tolist() == [[0, 2]]
    assert sel.info["raters"].tolist() == [2] and sel.info["kept"] == [2]  # raters: read with the record


def test_sparsevlm_v1_rank_adaptive_counts_per_sample():
    """v1: keep = min(int(rank·λ + bias), n − 1). Sample 0's two rater rows are equal (rank 1 → 1 token),
    sample 1's differ (rank 2 → min(3, 3) = 3 tokens): one batch, two counts, `valid` marks the slots."""
    rows0 = torch.tensor([[0.2, 0.1, 0.25, 0.1], [0.0, 0.0, 0.0, 0.9], [0.2, 0.1, 0.25, 0.1]])
    rows1 = torch.tensor([[0.2, 0.1, 0.2, 0.1], [0.0, 0.0, 0.0, 0.9], [0.2, 0.1, 0.3, 0.1]])
    sig = rater_signals(torch.stack([rows0, rows1])[:, None], tokens_per_image=64)
    method = vtprune.get_method("sparsevlm", version="1", scale=1.5, bias=0.0, recycle=False)
    sel = method.select(0, llm_stage(16, "text", positions="reindex"), sig)
    assert sel.info["rank"] == [1, 2] and sel.info["kept"] == [1, 3]
    assert sel.valid.tolist() == [[True, False, False], [True, True, True]]
    assert sel.indices[0, :1].tolist() == [2] and sel.indices[1].tolist() == [0, 1, 2]  # 1 vs 3: lower index


def test_sparsevlm_v2_prior_and_priority_heads(tiny):
    """v2.0: probabilities ÷ RoPE prior of all-ones q/k (= Σ_i 2cos(Δ·θ_i)/√d), then the mean of the
    `priority_heads` heads with the most rater→visual mass."""
    model = tiny[0]
    adapter = LlavaAdapter(model)
    attn = sparsevlm_attention()
    sig = rater_signals(attn, tokens_per_image=4)
    sig.adapter = adapter
    sig.hidden = torch.zeros(1, 8, 64)
    sig.position_ids = torch.arange(8)[None]
    sig.visual_index = sig.input_visual_index
    sig.query_index = lambda q: (torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool))
    d = model.config.text_config.head_dim
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    delta = (
        torch.tensor([5, 6, 7], dtype=torch.float64)[:, None] - torch.arange(1, 5, dtype=torch.float64)[None]
    )
    prior = (2 * torch.cos(delta[:, :, None] * theta).sum(-1) / math.sqrt(d)).float()
    torch.testing.assert_close(rope_prior(sig, torch.tensor([[5, 6, 7]]))[0], prior, rtol=1e-5, atol=1e-5)
    corrected = attn[0] / prior  # (heads, rows, visual)
    best = int(corrected[:, [0, 2]].sum(dim=(1, 2)).argmax())  # raters are rows 0 and 2
    method = vtprune.get_method("sparsevlm", version="2.0", priority_heads=1)
    sel = method.select(0, llm_stage(2, "text"), sig)
    torch.testing.assert_close(sel.scores, corrected[best, [0, 2]].mean(0)[None], rtol=1e-5, atol=1e-6)
    assert sel.extra is None


def test_sparsevlm_schedules_and_budget_arithmetic():
    assert sparsevlm_schedule("1.5", 192, 576) == (300, 200, 110)
    assert sparsevlm_schedule("1.5", 128, 576) == (303, 110, 36)
    assert sparsevlm_schedule("1.5", 96, 576) == (238, 48, 26)
    assert sparsevlm_schedule("1.5", 64, 576) == (66, 30, 17)
    assert sparsevlm_schedule("2.0", 192, 576) == (300, 200, 118)
    assert sparsevlm_schedule("2.0", 128, 576) == (238, 108, 60)
    assert sparsevlm_schedule("2.0", 64, 576) == (66, 34, 20)
    assert sparsevlm_schedule("1.5", 100, 576) == (156, 104, 57)  # other budgets: 192 schedule × keep/192
    assert sparsevlm_schedule("1.5", 16, 64) == (25, 17, 9)
    assert sparsevlm_schedule("1.5", 576, 576) == (576, 576, 576)
    # docs/methods/sparsevlm.md: 192 → 309 / 204 / 113 incl. 9 / 4 / 3 recycled; repo accounting (tokens after each layer's
    # pruning, 32 layers) averages 192.0
    assert [recycle_counts(n)[1] for n in (276, 109, 94)] == [9, 4, 3]
    after = stage_counts(576, [300, 200, 110])
    assert after == [309, 204, 113]
    per_layer = [576] * 2 + [after[0]] * 4 + [after[1]] * 9 + [after[2]] * 17
    assert sum(per_layer) / 32 == pytest.approx(192.0, abs=0.05)
    assert stage_counts(576, [303, 110, 36]) == [312, 117, 39]
    assert stage_counts(576, [66, 30, 17]) == [82, 32, 18]
    stages = vtprune.get_method("sparsevlm", keep=128).stages(LLAVA15)
    assert [(s.score_layer, s.prune_layer, s.keep, s.positions, s.queries) for s in stages] == [
        (2, 3, 303, "reindex", "text"),
        (6, 7, 110, "reindex", "text"),
        (15, 16, 36, "reindex", "text"),
    ]
    v2 = vtprune.get_method("sparsevlm", keep=64, version="2.0").stages(LLAVA15)
    assert [(s.keep, s.positions) for s in v2] == [(66, "original"), (34, "original"), (20, "original")]
    assert [s.prune_layer for s in vtprune.get_method("sparsevlm", version="1").stages(LLAVA15)] == [
        3,
        7,
        16,
        20,
    ]
    assert vtprune.get_method("sparsevlm", version="1", keep=128).scale_bias(128, 576) == (9.0, 6.0)
    assert vtprune.get_method("sparsevlm", version="1").scale_bias(192, 576) == (13.5, 0.0)
    assert [s.keep for s in vtprune.get_method("sparsevlm").stages(LLAVA15)] == [300, 200, 110]  # default 192


def test_sparsevlm_config_errors(tiny):
    model = tiny[0]
    with pytest.raises(PruneConfigError, match="valid: 0..2"):
        vtprune.prune(model, "sparsevlm")  # default layers [2, 6, 15] on a 4-layer model
    assert not vtprune.is_pruned(model)
    with pytest.raises(PruneConfigError, match="version"):
        vtprune.get_method("sparsevlm", version="3")
    with pytest.raises(PruneConfigError, match="recycle"):
        vtprune.get_method("sparsevlm", version="2.0", recycle=True)
    with pytest.raises(PruneConfigError, match="schedule"):
        vtprune.get_method("sparsevlm", layers=(0, 1)).stages(TINY)


# --- PyramidDrop -----------------------------------------------------------------------------------------


def test_pdrop_budget_arithmetic():
    """docs/methods/pdrop.md: layers [2, 10, 20], ratios [0.32, 0.16, 0.08] → 184 / 92 / 46, layer average 128.0."""
    layers, counts = vtprune.get_method("pdrop", keep=128).plan(LLAVA15)
    assert layers == (2, 10, 20) and counts == (184, 92, 46)
    assert pdrop_layer_average(list(counts), layers, 32, 576) == 128.0
    assert vtprune.get_method("pdrop", keep=192).plan(LLAVA15) == ((2, 10, 20), (311, 155, 77))
    assert vtprune.get_method("pdrop", keep=64).plan(LLAVA15) == ((2, 10, 20), (57, 28, 14))
    assert pdrop_layer_average([311, 155, 77], (2, 10, 20), 32, 576) == pytest.approx(191.06, abs=0.01)
    assert pdrop_layer_average([57, 28, 14], (2, 10, 20), 32, 576) == 64.25
    # the closed form gives back the repo's ratios (which it rounded) and honours other budgets
    assert pdrop_ratio_for_average(128, (2, 10, 20), 32, 576, 0.5) == pytest.approx(0.32, abs=0.005)
    layers, counts = vtprune.get_method("pdrop", keep=100).plan(LLAVA15)
    assert counts == (128, 64, 32) and pdrop_layer_average(list(counts), layers, 32, 576) == 100.0
    # paper default and explicit overrides
    assert vtprune.get_method("pdrop").plan(LLAVA15) == ((8, 16, 24), (288, 144, 72))
    assert vtprune.get_method("pdrop", keep=64, layer_list=(4, 8), ratios=(0.5, 0.1)).plan(LLAVA15) == (
        (4, 8),
        (288, 57),
    )
    stage = vtprune.get_method("pdrop", keep=128).stages(LLAVA15)[0]
    assert (stage.score_layer, stage.prune_layer, stage.positions, stage.queries) == (2, 2, "reindex", "last")
    with pytest.raises(PruneConfigError, match="one ratio per layer"):
        vtprune.get_method("pdrop", ratios=(0.5,))


def test_pdrop_hand_example():
    s = torch.tensor([0.10, 0.30, 0.05, 0.25, 0.20, 0.05])
    attn = torch.stack([s + 0.02, s - 0.02])[None, :, None, :]  # two heads whose mean is s
    sig = FakeSignals({"last": (attn, torch.ones(1, 1, dtype=torch.bool))})
    sel = PyramidDrop(keep=3).select(
        0, Stage(kind="llm", keep=3, score_layer=1, prune_layer=1, queries="last"), sig
    )
    assert sel.indices.tolist() == [[1, 3, 4]]
    torch.testing.assert_close(sel.scores, s[None])


def test_pdrop_scores_use_layer_k_projections_of_its_input(tiny, batch_inputs, monkeypatch):
    """The score at stage boundary k is the last prompt token's softmax row computed from layer k's
    input RMSNorm, q/k projections and RoPE applied to the hidden states entering layer k (head mean)."""
    model = tiny[0]
    lm = model.model.language_model
    k = 2
    seen = {}
    original = PyramidDrop.select

    def spy(self, i, stage, signals):
        out = original(self, i, stage, signals)
        seen["scores"] = out.scores
        return out

    monkeypatch.setattr(PyramidDrop, "select", spy)
    handle = lm.layers[k - 1].register_forward_hook(
        lambda m, a, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with vtprune.pruned(model, "pdrop", layer_list=(k,), ratios=(0.25,)):
            with torch.no_grad():
                model(**batch_inputs)
    finally:
        handle.remove()
    hidden, layer = seen["h"], lm.layers[k]
    b, length, _ = hidden.shape
    with torch.no_grad():
        normed = layer.input_layernorm(hidden)
        dh = layer.self_attn.head_dim
        q = layer.self_attn.q_proj(normed).view(b, length, -1, dh).transpose(1, 2)
        key = layer.self_attn.k_proj(normed).view(b, length, -1, dh).transpose(1, 2)
        cos, sin = lm.rotary_emb(hidden, position_ids=batch_inputs["position_ids"])
        q, key = apply_rotary_pos_emb(q, key, cos, sin)
    logits = (q[:, :, -1:].float() @ key.float().transpose(2, 3)) * dh**-0.5
    logits = logits.masked_fill(~batch_inputs["attention_mask"].bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]
    image = batch_inputs["input_ids"] == model.config.image_token_id
    expected = torch.stack([probs[i][image[i]] for i in range(b)])
    torch.testing.assert_close(seen["scores"], expected, rtol=1e-4, atol=1e-6)


# --- HiMAP -----------------------------------------------------------------------------------------------


def test_himap_hand_example():
    """Stage 1 sums the head-mean text→image rows, stage 2 the image→image rows."""
    text = torch.tensor(
        [[0.1, 0.0, 0.3, 0.0], [0.1, 0.0, 0.0, 0.35], [0.1, 0.1, 0.0, 0.0]]
    )  # sums .3 .1 .3 .35
    attn = torch.stack([text + 0.05, text - 0.05])[None]
    sig = FakeSignals({"text": (attn, torch.ones(1, 3, dtype=torch.bool))})
    method = HiMAP(K_t=1, K_i=2, R_t=2, R_i=1)
    sel = method.select(0, llm_stage(2, "text"), sig)
    torch.testing.assert_close(sel.scores, torch.tensor([[0.3, 0.1, 0.3, 0.35]]))
    assert sel.indices.tolist() == [[0, 3]]  # .35, then the .3 tie goes to the lower index
    image = torch.tensor([[[[1.0, 0.0], [0.4, 0.6]]]])  # token 1 receives 0.6, token 0 receives 1.4
    sel2 = method.select(
        1, llm_stage(1, "image", layer=2), FakeSignals({"image": (image, torch.ones(1, 2, dtype=torch.bool))})
    )
    torch.testing.assert_close(sel2.scores, torch.tensor([[1.4, 0.6]]))
    assert sel2.indices.tolist() == [[0]]


def test_himap_stage1_equals_eager_text_rows(tiny, batch_inputs, monkeypatch):
    sdpa, eager, _ = tiny
    with torch.no_grad():
        attn = eager(**batch_inputs, output_attentions=True).attentions[0].float()  # layer K_t - 1 = 0
    image = batch_inputs["input_ids"] == sdpa.config.image_token_id
    expected = []
    for i in range(attn.shape[0]):
        cols = image[i].nonzero().squeeze(1)
        expected.append(attn[i, :, cols.max() + 1 :][:, :, cols].mean(0).sum(0))
    seen = []
    original = HiMAP.select

    def spy(self, i, stage, signals):
        out = original(self, i, stage, signals)
        seen.append(out.scores)
        return out

    monkeypatch.setattr(HiMAP, "select", spy)
    with vtprune.pruned(sdpa, "himap", K_t=1, K_i=2, R_t=12, R_i=4):
        with torch.no_grad():
            sdpa(**batch_inputs)
    torch.testing.assert_close(seen[0], torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_himap_budget_mapping():
    assert HiMAP().counts(LLAVA15) == (288, 72)
    assert HiMAP(keep=128).counts(LLAVA15) == (115, 90)
    assert HiMAP(keep=192).counts(LLAVA15) == (416, 104)
    assert HiMAP(keep=64).counts(LLAVA15) == (76, 19)
    assert HiMAP(keep=144).counts(LLAVA15) == (288, 72)  # the README setting is this shape's 144
    assert HiMAP(keep=64, K_t=1, K_i=2).counts(TINY) == (64, 64)
    stages = HiMAP().stages(LLAVA15)
    assert [(s.score_layer, s.prune_layer, s.queries, s.positions) for s in stages] == [
        (1, 2, "text", "original"),
        (7, 8, "image", "original"),
    ]
    with pytest.raises(PruneConfigError, match="outside"):
        vtprune.get_method("himap", K_t=2, K_i=4).validate_for(TINY)
    with pytest.raises(PruneConfigError, match="both"):
        vtprune.get_method("himap", R_t=10)


# --- TokenCarve and iLLaVA -------------------------------------------------------------------------------


def test_tokencarve_hand_example():
    """H rows along the axes, so U·S = H up to signs: SV = L1 norms [3, 2, 1, .5]; AV = [.1, .4, .3, .2].
    Borda (w=.5): [2.5, 3.5, 2.5, 1.5] → N1 = 3 of keep 2: order 1, 0, 2; A = {1}, B = {0, 2}; both B cosines
    to A are 0 → the earlier B token (0) merges into 1: h1 ← (h0 + h1) / 2; token 2 is kept."""
    hidden = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 0.5]]])
    av = torch.tensor([0.1, 0.4, 0.3, 0.2])
    attn = av[None, None, None, :].expand(1, 2, 1, 4)
    sig = FakeSignals({"last": (attn, torch.ones(1, 1, dtype=torch.bool))}, hidden=hidden)
    sel = vtprune.get_method("tokencarve", keep=2).select(0, llm_stage(2, "last", layer=2), sig)
    assert sel.indices.tolist() == [[1, 2]]
    torch.testing.assert_close(sel.values, torch.tensor([[[1.5, 1.0], [1.0, 0.0]]]))
    assert vtprune.get_method("tokencarve").stages(LLAVA15)[0].keep == 128


def test_illava_hand_example():
    """scores [.4, .1, .3, .2], keep 2 → r = 2 removed (3, 1); the survivor 2 becomes (1·h2 + 2·h3 + 3·h1) / 6."""
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 6.0], [6.0, 0.0], [0.0, 3.0]]])
    s = torch.tensor([0.4, 0.1, 0.3, 0.2])
    sig = FakeSignals(
        {"last": (s[None, None, None, :].expand(1, 2, 1, 4), torch.ones(1, 1, dtype=torch.bool))},
        hidden=hidden,
    )
    sel = vtprune.get_method("illava", keep=2).select(0, llm_stage(2, "last", layer=2), sig)
    assert sel.indices.tolist() == [[0, 2]]
    torch.testing.assert_close(sel.values, torch.tensor([[[1.0, 0.0], [1.0, 4.0]]]))
    vit, stage = vtprune.get_method("illava").stages(LLAVA15)  # defaults: ViT stage 576 -> 208, then 0.70
    assert (vit.kind, vit.vit_layers, vit.vit_remove, vit.keep) == ("vit", (5, 6, 7, 8), 92, 208)
    assert (stage.keep, stage.score_layer, stage.prune_layer, stage.positions) == (146, 1, 2, "original")
    (stage,) = vtprune.get_method("illava", vit_layers=()).stages(LLAVA15)
    assert stage.keep == 403


# --- on the tiny model -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params",
    [("tokencarve", {"K": 2}), ("illava", {"llm_layer": 2}), ("sparsevlm", {"layers": (0, 1, 2)})],
)
def test_created_and_merged_tokens_reach_the_llm(tiny, batch_inputs, monkeypatch, name, params):
    """The hidden states entering the prune layer hold Selection.values at the kept visual slots and
    Selection.extra (SparseVLM's recycled clusters) right after them."""
    model = tiny[0]
    method = vtprune.get_method(name, keep=16, **params)
    selections = []
    original = type(method).select

    def spy(self, i, stage, signals):
        out = original(self, i, stage, signals)
        selections.append((out, signals.visual_hidden()))
        return out

    monkeypatch.setattr(type(method), "select", spy)
    seen = {}
    with vtprune.pruned(model, method):
        session = model._vtprune_session
        layer = session.llm_stages[0].prune_layer

        def pre(module, args, kwargs):
            seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

        handle = model.model.language_model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**batch_inputs)
        finally:
            handle.remove()
        layout = session.episode.layouts[1]
    sel, before = selections[0]
    d = seen["h"].shape[-1]
    rows = torch.gather(seen["h"], 1, layout.visual_index[:, :, None].expand(-1, -1, d))
    t = sel.indices.shape[1]
    plain = torch.gather(before, 1, sel.indices[:, :, None].expand(-1, -1, d))
    if sel.values is not None:
        torch.testing.assert_close(rows[:, :t], sel.values.to(rows.dtype))
        assert not torch.allclose(sel.values, plain)  # something was merged
    else:
        torch.testing.assert_close(rows[:, :t], plain)
    if name == "sparsevlm":
        assert sel.extra is not None and bool(sel.extra_valid.all())
        torch.testing.assert_close(rows[:, t:], sel.extra.to(rows.dtype))
        assert layout.original_index[:, t:].eq(-1).all()


def test_sparsevlm_v1_variable_counts_exact_per_sample(tiny):
    """v1 keeps a different number of tokens per sample; each sample alone equals the hand-written oracle
    (the batched run equals the single runs: tests/test_engine.py)."""
    model, _, processor = tiny
    params = {"version": "1", "layers": (0, 1, 2), "scale": 0.5, "recycle": False}
    batch = build_inputs(processor, QUESTIONS, [1, 2, 3])
    with vtprune.pruned(model, "sparsevlm", keep=16, **params):
        with torch.no_grad():
            model(**batch)
        counts = vtprune.last_record(model).stages[0].counts
        assert len(set(counts)) > 1
        for i, seed in enumerate([1, 2, 3]):
            single = build_inputs(processor, [QUESTIONS[i]], [seed])
            with torch.no_grad():
                logits = model(**single).logits
            record = vtprune.last_record(model)
            assert record.stages[0].counts == [counts[i]]
            expected, valid = oracle_logits(
                model, single["input_ids"], single["attention_mask"], single["pixel_values"], record
            )
            torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-4, atol=1e-4)


OPTION_CASES = {
    "sparsevlm": {"layers": (0, 1, 2), "recycle": False},
    "pdrop": {"layer_list": (1, 2, 3), "ratios": (0.5, 0.25, 0.125)},
    "himap": {"K_t": 1, "K_i": 2, "R_t": 24, "R_i": 8},
    "tokencarve": {"K": 2},
    "illava": {"llm_layer": 2},
}


def kept_sets(model, inputs, name, keep, **params):
    with vtprune.pruned(model, name, keep=keep, **params):
        with torch.no_grad():
            model(**inputs)
        return [s.kept for s in vtprune.last_record(model).stages]


@pytest.mark.parametrize("name", sorted(OPTION_CASES))
def test_debias_and_head_options_change_selection(tiny, batch_inputs, name):
    model = tiny[0]
    params = OPTION_CASES[name]
    plain = kept_sets(model, batch_inputs, name, 16, **params)
    assert (
        kept_sets(model, batch_inputs, name, 16, debias=["recency"], debias_strength=0.0, **params) == plain
    )
    assert kept_sets(model, batch_inputs, name, 16, heads="mean", num_heads=None, **params) == plain
    assert (
        kept_sets(model, batch_inputs, name, 16, debias=["recency"], debias_strength=3.0, **params)[0]
        != plain[0]
    )
    assert kept_sets(model, batch_inputs, name, 16, heads="sparsity", num_heads=1, **params) != plain


@pytest.mark.parametrize("name", ["sparsevlm", "pdrop", "himap"])
def test_debias_only_at_the_first_stage(tiny, batch_inputs, monkeypatch, name):
    """The released debiasing patches: the multi-stage pruners debias their first pruning stage only (SparseVLM also computes the
    plain score, which ranks the recycled tokens)."""
    model = tiny[0]
    method = vtprune.get_method(name, keep=16, debias=["recency"], **OPTION_CASES[name])
    calls = []
    original = type(method).attention_scores

    def spy(self, signals, queries, budget, reduce="mean", debias=True):
        calls.append((signals.num_visual, debias))
        return original(self, signals, queries, budget, reduce=reduce, debias=debias)

    monkeypatch.setattr(type(method), "attention_scores", spy)
    with vtprune.pruned(model, method):
        with torch.no_grad():
            model(**batch_inputs)
    debiased = [n for n, flag in calls if flag]
    assert debiased == [64]  # once, on the full set of 64 tokens


class PaddedSignals(FakeSignals):
    """FakeSignals with a measured padding fraction per visual token (what `LLMSignals.debias_context`
    reads from the pixels)."""

    def __init__(self, attention, padding_fraction):
        super().__init__(attention)
        self._fraction = padding_fraction

    def debias_context(self):
        from vtprune.signals.debias import DebiasContext

        return DebiasContext(padding_fraction=self._fraction, grid=(2, 3))


def test_padding_sink_hand_example_fastv_cap_and_pdrop_threshold():
    """Issue 20 point 3 on hand-made scores; intcomp/attention-bias @ e75ebe7. patches/FastV.patch (against
    pkunlp-icler/FastV d165972): `score *= generate_pad_mask(w, h, threshold=0.5)`, then `ATTENTION_RANK =
    (mask == 1).sum()` when that is smaller. patches/PyramidDrop.patch (against Cooperx521/PyramidDrop
    6444f30): the same with threshold=0.01 and no cap.

    Last-token scores s = [0.30, 0.05, 0.20, 0.10, 0.25, 0.15], padding fractions [0.75, 0, 0, 0, 0.6, 0.3]:
    FastV's padding is {0, 4}: keep 5 → capped at the 4 valid {1, 2, 3, 5}; keep 2 → {2, 5} (raw: {0, 4}).
    PDrop's padding is {0, 4, 5}: keep 2 → {2, 3}.
    """
    scores = torch.tensor([[0.30, 0.05, 0.20, 0.10, 0.25, 0.15]])
    attention = {"last": (scores[:, None, None, :], torch.ones(1, 1, dtype=torch.bool))}
    fraction = torch.tensor([[0.75, 0.0, 0.0, 0.0, 0.6, 0.3]])

    def kept(name, keep, **params):
        method = vtprune.get_method(name, keep=keep, **params)
        sel = method.select(0, llm_stage(keep, "last", layer=2), PaddedSignals(attention, fraction))
        valid = sel.valid if sel.valid is not None else torch.ones_like(sel.indices, dtype=torch.bool)
        return sel.indices[valid].tolist()

    assert kept("fastv", 5, debias=["sink"]) == [1, 2, 3, 5]
    assert kept("fastv", 2, debias=["sink"]) == [2, 5]
    assert kept("fastv", 2) == [0, 4]
    assert kept("fastv", 5) == [0, 2, 3, 4, 5]  # without the option nothing is capped
    assert kept("pdrop", 2, debias=["sink"], layer_list=(2,), ratios=(0.5,)) == [2, 3]


def _padded_inputs(processor):
    """One 7:5 picture padded to a square with LLaVA's `expand2square` (CLIP mean colour), on the tiny
    model's 112-px, 8×8-patch grid: the valid band covers pixel rows 16..95, so patch rows 0 and 7 are all
    padding and rows 1 and 6 are 1/14 to 2/14 padding."""
    from vtprune.eval.images import expand_to_square, mean_colour
    from vtprune.testing import random_image

    picture = random_image(1).resize((140, 100))
    square = expand_to_square(picture, mean_colour(processor.image_processor.image_mean))
    content = [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=[square], text=[prompt], return_tensors="pt")


def test_padding_sink_per_released_patch(tiny):
    """Issue 20 point 3, intcomp/attention-bias @ e75ebe7. `debias=["sink"]` masks the padding patches with
    each patch's threshold: 0.5 in patches/FastV.patch (rows 0 and 7 are padding), 0.01 in
    patches/PyramidDrop.patch (rows 1 and 6 too). FastV's patch caps the kept count at the valid patches
    (`ATTENTION_RANK = (attention_score_pad_mask == 1).sum()` when smaller): keep=60 keeps the 48 valid ones.
    PDrop's patch does not cap; its first stage keeps 32 = exactly the 32 patches of rows 2..5."""
    model, _, processor = tiny
    inputs = _padded_inputs(processor)
    rows_1_to_6 = list(range(8, 56))
    rows_2_to_5 = list(range(16, 48))

    with vtprune.pruned(model, "fastv", keep=60, K=2, debias=["sink"]):
        with torch.no_grad():
            model(**inputs)
        stage = vtprune.last_record(model).stages[0]
    assert stage.kept[0] == rows_1_to_6 and stage.counts == [48]
    assert stage.extra["suppressed"] == [16]
    with vtprune.pruned(model, "fastv", keep=60, K=2):  # without the option nothing is capped
        with torch.no_grad():
            model(**inputs)
        assert vtprune.last_record(model).stages[0].counts == [60]
    with vtprune.pruned(model, "fastv", keep=20, K=2, debias=["sink"]):  # a budget below the valid count
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_record(model).stages[0].kept[0]
    assert len(kept) == 20 and set(kept) <= set(rows_1_to_6)

    ratios = {"layer_list": (1, 2, 3), "ratios": (0.5, 0.25, 0.125)}
    with vtprune.pruned(model, "pdrop", debias=["sink"], **ratios):
        with torch.no_grad():
            model(**inputs)
        first = vtprune.last_record(model).stages[0]
    assert first.kept[0] == rows_2_to_5 and first.extra["suppressed"] == [32]


def test_sink_detectors_beyond_padding_are_opt_in(tiny, batch_inputs, monkeypatch):
    """`"sink"` runs the padding detector only (the released patches); the massive-activation, [CLS]
    attention and norm detectors run only when named."""
    import vtprune.signals.debias as debias

    model = tiny[0]
    called = []
    for name in ("massive_activation_sinks", "attention_mass_sinks"):
        original = getattr(debias, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            called.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(debias, name, spy)
    kept_sets(model, batch_inputs, "fastv", 16, K=2, debias=["recency", "sink"])
    assert called == []
    kept_sets(model, batch_inputs, "fastv", 16, K=2, debias=["sink", "massive", "attention"])
    assert sorted(set(called)) == ["attention_mass_sinks", "massive_activation_sinks"]


# --- iLLaVA ViT stage ------------------------------------------------------------------------------------


def reference_vit_tower(model, pixel_values, layers, remove):
    """The CLIP tower run by hand up to LLaVA's feature layer, merging after the attention sub-block of each
    layer in `layers` (docs/methods/illava.md): importance = head-mean attention received, mean over all query rows; the r + 1
    least important patches ([CLS] excluded) are averaged with weights r+1, r, ..., 1 (least important
    first) into the most important of them, the other r dropped, raster order kept.
    Returns the feature layer's output (N, 1 + P', Dv) and the original patch index of each survivor."""
    vm = model.model.vision_tower  # CLIPVisionModel (transformers 5: no inner vision_model)
    vm = getattr(vm, "vision_model", vm)
    feature = LlavaAdapter(model).feature_layer
    x = vm.pre_layrnorm(vm.embeddings(pixel_values))
    n = x.shape[0]
    pos = torch.arange(x.shape[1]).expand(n, -1)
    for i, layer in enumerate(vm.encoder.layers[: feature + 1]):
        if i not in layers:
            x = layer(x, None)
            continue
        attn = layer.self_attn
        hn = layer.layer_norm1(x)
        q = attn.q_proj(hn).view(n, hn.shape[1], -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hn).view(n, hn.shape[1], -1, attn.head_dim).transpose(1, 2)
        received = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1).mean(dim=1)
        h = x + attn(hidden_states=hn, attention_mask=None)[0]
        rows, new_pos = [], []
        for b in range(n):
            low = (torch.argsort(received[b, 1:]) + 1)[: remove + 1].tolist()  # ascending importance
            w = torch.arange(remove + 1, 0, -1, dtype=torch.float32)  # least important weighs most
            merged = (w[:, None] * h[b, low]).sum(dim=0) / w.sum()
            keep = [j for j in range(h.shape[1]) if j not in low[:-1]]
            row = h[b, keep].clone()
            row[keep.index(low[-1])] = merged
            rows.append(row)
            new_pos.append(pos[b, keep])
        h = torch.stack(rows)
        pos = torch.stack(new_pos)
        x = h + layer.mlp(layer.layer_norm2(h))
    return x, pos


def test_illava_vit_merge_equals_hand_reference(tiny, batch_inputs):
    model = tiny[0]
    pixels = batch_inputs["pixel_values"]
    with torch.no_grad():
        expected, positions = reference_vit_tower(model, pixels, (0,), 8)
        with vtprune.pruned(model, "illava", keep=16, llm_layer=2, vit_layers=(0,), vit_remove=8):
            out = model.model.get_image_features(
                pixel_values=pixels,
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
                output_hidden_states=True,
                return_dict=True,
            )
            model(**batch_inputs)
            record = vtprune.last_record(model)
            layout0 = model._vtprune_session.episode.layouts[0]
            input_embeds = model._vtprune_session.episode.input_embeds
    assert positions.shape == (3, 57) and positions[:, 0].eq(0).all()
    torch.testing.assert_close(out.hidden_states[2], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out._vtprune_vit_positions, positions)
    # The LLM receives exactly the projected survivors, numbered by their original patch index.
    vit = record.stages[0]
    assert vit.kind == "vit" and vit.counts == [56, 56, 56]
    assert vit.kept == (positions[:, 1:] - 1).tolist()
    assert vit.extra == {"layers": [0], "removed_per_layer": 8}
    projected = model.model.multi_modal_projector(expected[:, 1:])
    d = input_embeds.shape[-1]
    rows = torch.gather(input_embeds, 1, layout0.visual_index[:, :, None].expand(-1, -1, d))
    torch.testing.assert_close(rows, projected, rtol=1e-5, atol=1e-5)
    assert layout0.original_index.tolist() == vit.kept
    # Counts per stage, and what each LLM layer sees (the ViT stage acts before the LLM like a vision stage).
    assert [s.kind for s in record.stages] == ["vit", "llm"]
    assert record.stages[1].counts == [16, 16, 16]
    assert set(record.stages[1].kept[0]) <= set(vit.kept[0])
    assert record.layer_tokens(0) == [56, 56, 16, 16]


def test_illava_vit_config_errors(tiny, batch_inputs):
    model = tiny[0]
    for params, match in [
        ({"vit_layers": (1,)}, r"vision layer\(s\) \[1\] cannot merge tokens: valid layers are 0\.\.0"),
        ({"vit_layers": (7,)}, r"valid layers are 0\.\.0"),
        ({"vit_layers": (0,), "vit_remove": 64}, "removes all 64 patches"),
        ({"vit_layers": (0,), "vit_remove": 0}, "vit_remove=0 must be an int >= 1"),
        ({"vit_layers": 0}, "must be a sequence of ints"),
    ]:
        with pytest.raises(PruneConfigError, match=match):
            with vtprune.pruned(model, "illava", keep=16, vit_remove=params.pop("vit_remove", 8), **params):
                pass
    assert not hasattr(model, "_vtprune_session") or model._vtprune_session is None
    # a fraction keep applies to the patches leaving the ViT stage; a larger count keeps all of them
    (_, llm) = vtprune.get_method("illava", keep=0.5, vit_layers=(0,), vit_remove=8).stages(TINY)
    assert llm.keep == 28
    (_, llm) = vtprune.get_method("illava", keep=60, vit_layers=(0,), vit_remove=8).stages(TINY)
    assert llm.keep == 56


# --- DART ------------------------------------------------------------------------------------------------


def _unit2(degrees):
    rad = torch.tensor([math.radians(a) for a in degrees])
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


class DartSignals:
    """What DART reads from LLMSignals, hand-made: sequence [sys, v0..v5, t0, t1] (one image of 6 tokens).

    Key L1 norms: v0 = 5 (the image pivot), others 1; t1 = 3 > t0 = 2 (the text pivot is t1). Normed hidden
    states are unit vectors at angles v: 0°, 10°, 90°, 100°, 180°, 45°; t0: 170°, t1: 90°."""

    images_per_sample = 1
    num_visual = 6

    def __init__(self):
        norms = torch.tensor([9.0, 5, 1, 1, 1, 1, 1, 2, 3])  # sys has the largest norm: it is not a candidate
        self._keys = torch.zeros(1, 9, 4)
        self._keys[0, :, 0] = -norms / 2  # L1 norm = norms (two entries of |norm/2|)
        self._keys[0, :, 3] = norms / 2
        self._hidden = _unit2([33, 0, 10, 90, 100, 180, 45, 170, 90])[None]
        self.visual_index = torch.arange(1, 7)[None]
        self.visual_valid = torch.ones(1, 6, dtype=torch.bool)

    def keys(self):
        return self._keys

    def normed_hidden(self):
        return self._hidden

    def query_index(self, queries):
        assert queries == "text"
        return torch.tensor([[7, 8]]), torch.ones(1, 2, dtype=torch.bool)


def _dart_stage(keep):
    return Stage(kind="llm", keep=keep, score_layer=1, prune_layer=2, positions="original", name="dart")


def test_dart_hand_example():
    """Image pivot v0 (norm 5), text pivot t1 (norm 3 > 2). keep 4: 3 slots for 2 pivots → v0 takes 2, t1
    takes 1. v0 (0°) takes the least similar: v4 (180°, cos −1), v3 (100°, −.17); t1 (90°) then takes v1
    (10°, cos .17 < v5 .71 < v2 1). Kept {v0, v1, v3, v4}."""
    method = vtprune.get_method("dart", pivot_image_token=1, pivot_text_token=1)
    sel = method.select(0, _dart_stage(4), DartSignals())
    assert sel.indices.tolist() == [[0, 1, 3, 4]]
    torch.testing.assert_close(sel.scores, torch.tensor([[5.0, 1, 1, 1, 1, 1]]))
    assert sel.info["pivots"].tolist() == [[0, -1]]  # read with the records, at the end
    # the official budget: 4 // 2 = 2 per pivot, so t1 also takes v5 (.71): 1 + 2·2 = 5 tokens
    official = vtprune.get_method("dart", pivot_image_token=1, pivot_text_token=1, budget="official")
    assert official.select(0, _dart_stage(4), DartSignals()).indices.tolist() == [[0, 1, 3, 4, 5]]
    # no text pivot: v0 takes all 3 slots (v4, v3, v2 at cos 0)
    no_text = vtprune.get_method("dart", pivot_image_token=1, pivot_text_token=0)
    assert no_text.select(0, _dart_stage(4), DartSignals()).indices.tolist() == [[0, 2, 3, 4]]
    # L2 norms rank the same here; keep below the pivot count keeps the best pivots only
    two = vtprune.get_method("dart", pivot_image_token=2)
    assert two.select(0, _dart_stage(1), DartSignals()).indices.tolist() == [[0]]


def _dart_reference(x, scores, k, pivots, text_x, text_scores, text_pivots):
    """The official loop on one sample, written plainly (visit order: image then text pivots, by norm)."""
    n = x.shape[0]
    by_norm = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    image_pivots = by_norm[: min(pivots, k)]
    text_order = sorted(range(text_x.shape[0]), key=lambda i: (-float(text_scores[i]), i))[:text_pivots]
    visit = [x[i] for i in image_pivots] + [text_x[i] for i in text_order]
    pool, m = k - len(image_pivots), len(visit)
    quotas = [pool // m + (1 if j < pool % m else 0) for j in range(m)]
    kept = set(image_pivots)
    for vec, quota in zip(visit, quotas, strict=True):
        candidates = [i for i in range(n) if i not in kept]
        cos = {i: float(F.cosine_similarity(vec, x[i], dim=0)) for i in candidates}
        kept.update(sorted(candidates, key=lambda i: (cos[i], i))[:quota])
    return sorted(kept)


@pytest.mark.parametrize("seed", range(4))
def test_dart_matches_plain_reference_on_random_inputs(seed):
    from vtprune.methods.dart import dart_select

    g = torch.Generator().manual_seed(seed)
    b, n, m, d = 3, 40, 7, 5
    x, scores = torch.randn(b, n, d, generator=g), torch.rand(b, n, generator=g)
    tx, ts = torch.randn(b, m, d, generator=g), torch.rand(b, m, generator=g)
    for k, pivots, text_pivots in [(12, 4, 4), (13, 2, 3), (3, 4, 4), (40, 4, 4)]:
        picked, _ = dart_select(
            x, scores, k, pivots, text_features=tx, text_scores=ts, num_text_pivots=text_pivots
        )
        for row in range(b):
            expected = _dart_reference(x[row], scores[row], k, pivots, tx[row], ts[row], text_pivots)
            assert picked.indices[row].tolist() == expected
            assert bool(picked.valid[row].all())



def test_dart_scores_are_key_norms_of_layer_k_minus_1_under_sdpa(tiny, batch_inputs, monkeypatch):
    """DART's pivot scores are the L1 norms of layer K−1's post-RoPE keys at the image positions, read on the
    SDPA model (attention probabilities are never formed), and its duplication metric is the output-RMSNorm
    of the hidden states entering layer K."""
    from vtprune.methods.dart import DART, dart_select
    from vtprune.signals.context import LLMSignals

    model = tiny[0]
    assert model.config.text_config._attn_implementation == "sdpa"
    lm = model.model.language_model
    seen = {}
    original = DART.select

    def spy(self, i, stage, signals):
        out = original(self, i, stage, signals)
        seen["scores"], seen["indices"] = out.scores, out.indices
        return out

    def no_attention(self, queries="last"):
        raise AssertionError("DART must not ask for attention probabilities")

    monkeypatch.setattr(DART, "select", spy)
    monkeypatch.setattr(LLMSignals, "attention", no_attention)
    with torch.no_grad():
        hidden = model(**batch_inputs, output_hidden_states=True).hidden_states
        with vtprune.pruned(model, "dart", keep=16, K=2):
            model(**batch_inputs)
    layer = lm.layers[1]
    h = hidden[1]  # entering layer 1 = K - 1
    b, length, _ = h.shape
    with torch.no_grad():
        normed = layer.input_layernorm(h)
        key = layer.self_attn.k_proj(normed).view(b, length, -1, layer.self_attn.head_dim).transpose(1, 2)
        q = key.clone()
        cos, sin = lm.rotary_emb(h, position_ids=batch_inputs["position_ids"])
        _, key = apply_rotary_pos_emb(q, key, cos, sin)
        out_norm = lm.norm(hidden[2]).float()
    keys = key.transpose(1, 2).flatten(2).float()
    image = batch_inputs["input_ids"] == model.config.image_token_id
    expected = torch.stack([keys[i][image[i]].abs().sum(-1) for i in range(b)])
    torch.testing.assert_close(seen["scores"], expected, rtol=1e-4, atol=1e-5)
    mask = batch_inputs["attention_mask"].bool()
    for i in range(b):
        last_image = int(torch.nonzero(image[i]).max())
        text = [p for p in range(last_image + 1, length) if mask[i, p]]
        picked, _ = dart_select(
            out_norm[i][image[i]][None], expected[i][None], 16, 4,
            text_features=out_norm[i, text][None], text_scores=keys[i, text].abs().sum(-1)[None],
            num_text_pivots=4,
        )
        assert seen["indices"][i].tolist() == picked.indices[0].tolist()


def test_dart_config_errors_and_stages():
    assert vtprune.get_method("dart").stages(LLAVA15)[0].keep == 128
    stage = vtprune.get_method("dart", keep=64).stages(LLAVA15)[0]
    assert (stage.kind, stage.score_layer, stage.prune_layer, stage.positions, stage.queries) == (
        "llm", 1, 2, "original", None
    )
    assert vtprune.get_method("dart", K=0, keep=192).stages(LLAVA15)[0].kind == "vision"
    bad_values = (
        {"K": -1}, {"pivot_image_token": 0}, {"pivot_text_token": -2}, {"norm": "l3"}, {"budget": "x"}
    )
    for bad in bad_values:
        with pytest.raises(PruneConfigError, match=next(iter(bad))):
            vtprune.get_method("dart", **bad)
    with pytest.raises(PruneConfigError, match="K=4"):
        vtprune.get_method("dart", K=4).validate_for(TINY)


# --- FlowCut ---------------------------------------------------------------------------------------------


def test_flowcut_scores_and_prune_count_hand_example():
    """score = (a/Σa + s/Σs)·‖v̄‖₁: a = [.4, .2, .2, .2], s = [.1, .1, .1, .7], ‖v̄‖₁ = [1, 2, 1, 1] →
    [.5, .6, .3, .9]. Count at rpl = 4, P = 4, T = 1: a = [.85, .05, .05, .05] has entropy .5875 of
    log 4 = 1.3863 (ratio .4238) → r = 3/√4 · (1 − .4238²) = 1.23 → 1; uniform attention (ratio 1) → 0."""
    from vtprune.methods.flowcut import flowcut_prune_count, flowcut_scores

    a = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    s = torch.tensor([[0.1, 0.1, 0.1, 0.7]])
    v = torch.tensor([[[1.0, 0.0], [1.0, -1.0], [0.5, 0.5], [0.0, 1.0]]])
    ok = torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(flowcut_scores(a, s, v, ok), torch.tensor([[0.5, 0.6, 0.3, 0.9]]))
    # an invalid slot takes no part in either normalisation and scores 0
    part = torch.tensor([[True, True, True, False]])
    expected = torch.tensor([[0.4 / 0.8 + 1 / 3, 0.5 + 2 / 3, 0.25 + 1 / 3, 0.0]])
    torch.testing.assert_close(flowcut_scores(a, s, v, part), expected)
    peaky = torch.tensor([[0.85, 0.05, 0.05, 0.05]])
    assert flowcut_prune_count(peaky, ok, 1, 4).tolist() == [1]
    assert flowcut_prune_count(torch.full((1, 4), 0.25), ok, 1, 4).tolist() == [0]
    assert flowcut_prune_count(peaky, ok, 1, 1).tolist() == [2]  # 3 · .8204 = 2.46


@pytest.fixture(scope="module")
def deep_tower():
    """A tiny LLaVA with an 8-layer CLIP tower (feature layer 6) whose attention is peaky enough for FlowCut's
    adaptive counts to differ between images (q/k weights ×5)."""
    from vtprune.testing import make_tiny_llava

    model, processor = make_tiny_llava(seed=0, vision_layers=8)
    with torch.no_grad():
        for layer in LlavaAdapter(model).vision_layers:
            layer.self_attn.q_proj.weight.mul_(5)
            layer.self_attn.k_proj.weight.mul_(5)
    return model, processor


def flowcut_reference_tower(model, pixels, keep):
    """The official FlowCut loop on ONE image: every layer runs whole (eager attention by hand), then, while
    more than `keep` patches remain, the cumulative score is updated and at even rpl = F − 1 − l the best
    max(P − r, keep) patches are kept (rpl = 0: keep). Returns the feature layer's output and positions."""
    vm = model.model.vision_tower
    vm = getattr(vm, "vision_model", vm)
    feature = LlavaAdapter(model).feature_layer
    x = vm.pre_layrnorm(vm.embeddings(pixels))
    pos = list(range(x.shape[1]))
    cumulative = None
    for idx, layer in enumerate(vm.encoder.layers[: feature + 1]):
        attn = layer.self_attn
        hn = layer.layer_norm1(x)
        shape = (1, hn.shape[1], -1, attn.head_dim)
        q, k, v = (proj(hn).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        h = x + attn(hidden_states=hn, attention_mask=None)[0]
        x = h + layer.mlp(layer.layer_norm2(h))
        if x.shape[1] <= keep + 1:
            continue
        cls = probs[0, :, 0, 1:].mean(0)
        semantic = torch.softmax(v[0, :, :1] @ v[0].transpose(-1, -2), dim=-1).mean(0)[0, 1:]
        score = (cls / cls.sum() + semantic / semantic.sum()) * v[0].mean(0)[1:].abs().sum(-1)
        cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
        rpl = feature - idx - 1
        if rpl % 2:
            continue
        p = x.shape[1] - 1
        if rpl:
            prob = cls / cls.sum()
            ratio = float(-(prob * prob.log()).sum()) / math.log(p)
            n_keep = max(p - round((p - keep) / math.sqrt(rpl) * (1 - ratio**2)), keep)
        else:
            n_keep = keep
        top = sorted(sorted(range(p), key=lambda j: (-float(cumulative[j]), j))[:n_keep])
        x = x[:, [0] + [j + 1 for j in top]]
        pos = [pos[0]] + [pos[j + 1] for j in top]
        cumulative = cumulative[top]
    return x, pos


def test_flowcut_equals_official_loop_per_image_in_a_batch(deep_tower):
    """Three images in one batch, each with its own adaptive counts, equal the official loop run on each image
    alone: same survivors, same feature-layer output; the LLM receives exactly those patches."""
    model, processor = deep_tower
    inputs = build_inputs(processor, QUESTIONS, [1, 2, 3])
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        with vtprune.pruned(model, "flowcut", keep=12):
            out = model.model.get_image_features(
                pixel_values=pixels,
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
                output_hidden_states=True,
                return_dict=True,
            )
            model(**inputs)
            record = vtprune.last_record(model)
        references = [flowcut_reference_tower(model, pixels[i : i + 1], 12) for i in range(3)]
    counts = record.stages[0].extra["patches_after_layer"]
    assert len({tuple(c) for c in counts}) == 3  # each image has its own schedule
    assert all(c[-1] == 12 for c in counts)
    for i, (features, positions) in enumerate(references):
        assert out._vtprune_vit_positions[i].tolist() == positions
        torch.testing.assert_close(out.hidden_states[7][i], features[0], rtol=1e-4, atol=1e-5)
        assert record.stages[0].kept[i] == [p - 1 for p in positions[1:]]
    assert record.stages[0].counts == [12, 12, 12] and record.layer_tokens(0) == [12] * 4


def test_flowcut_batched_equals_single_and_sdpa_equals_eager_on_a_deep_tower(deep_tower):
    model, processor = deep_tower
    batch = build_inputs(processor, QUESTIONS, [1, 2, 3])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    suppress = [model.config.image_token_id]
    runs = []
    for m in (model, eager):
        with vtprune.pruned(m, "flowcut", keep=10), torch.no_grad():
            tokens = m.generate(**batch, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
            runs.append((tokens.tolist(), vtprune.last_record(m).stages[0].kept))
    assert runs[0] == runs[1]
    for i in range(3):
        single = build_inputs(processor, [QUESTIONS[i]], [i + 1])
        with vtprune.pruned(model, "flowcut", keep=10), torch.no_grad():
            out = model.generate(**single, max_new_tokens=3, do_sample=False, suppress_tokens=suppress)
            assert vtprune.last_record(model).stages[0].kept[0] == runs[0][1][i]
        assert out[0, single["input_ids"].shape[1] :].tolist() == runs[0][0][i][batch["input_ids"].shape[1] :]


def test_flowcut_stages_and_config_errors():
    (stage,) = vtprune.get_method("flowcut").stages(dataclasses.replace(LLAVA15, vision_feature_layer=22))
    assert (stage.kind, stage.keep, stage.vit_layers, stage.vit_remove) == ("vit", 64, tuple(range(22)), 0)
    assert vtprune.get_method("flowcut", keep=192).stages(LLAVA15)[0].vit_layers == tuple(range(22))
    for bad in ({"stride": 0}, {"decay": 1.0}, {"decay": -0.1}):
        with pytest.raises(PruneConfigError, match=next(iter(bad))):
            vtprune.get_method("flowcut", **bad)
