"""FlowCut — "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models"
(Tong et al., NeurIPS 2025, arXiv 2505.19536; official code github.com/TungChintao/FlowCut,
`flowcut/modeling_clip_flowcut.py`, `utils_flowcut.py`).

Idea: redundancy emerges progressively as information flows through the vision encoder, so FlowCut prunes
inside it, a little every other layer, ranking patches by a score accumulated over the layers: how much the
[CLS] token attends to a patch, how much the [CLS] *value* aligns with the patch's value, and how large that
value is. How many patches go at a layer adapts to how spread the [CLS] attention is (its entropy).

Official rule (LLaVA-1.5, T patches kept, feature layer F = 22): at every CLIP layer l < F (while more than T
patches remain), with a = the head-mean [CLS]-row attention to the patches (softmax over all tokens),
s = the head mean of softmax_j(v_CLS · v_j) (per head, unscaled value dot products) and ‖v̄_j‖₁ the L1 norm of
the head-mean value vector: score_j = (a_j / Σa + s_j / Σs) · ‖v̄_j‖₁; cumulative = score at the first layer,
then 0.5·cumulative + 0.5·score. At the layers whose remaining count rpl = F − 1 − l is even (l = 1, 3, …,
21) FlowCut keeps the max(P − r, T) patches of highest cumulative score (raster order, [CLS] kept), with
r = round((P − T)/√rpl · (1 − (H(a)/log P)²)), H the entropy of a/Σa and P the patches present; at rpl = 0
(layer F − 1) it keeps exactly T. The feature layer then runs on T + 1 tokens and LLaVA projects its T
patches. vtprune runs it as a "vit" stage (the mechanism iLLaVA uses) at layers 0..F−1: the engine hands
`merge_vit` the layer's captured q/k/v after its attention sub-block (`ViTLayerSignals`: only the [CLS]
query row and the values are used, never the full attention map). At the layers that only update the
cumulative score (odd rpl), and once every image is at its budget, `merge_vit` returns None and the layer
runs whole: it keeps its [CLS]-row and value products, and the next pruning layer (the first to read the
cumulative score; no token is removed in between) turns those of every layer since the last one into scores
with one softmax, one set of normalisations and the same arithmetic per layer. At a pruning layer the MLP
runs on the survivors only (it is token-wise, so the kept tokens equal the official prune-after-the-MLP). The host reads one device value
per pruning layer before the last (the padded width of the kept patches, a data-dependent shape, and
whether every image fills it, in one transfer); everything else it decides from the shapes.

Parameters and defaults: keep (T, default 64: the README's `target_num=64`; the released checkpoints and the
LLaVA-1.5 tables use T = 64 / 128 / 192 with the same schedule), stride = 2 (prune when rpl is a multiple;
the official `rpl % 2`), decay = 0.5 (the cumulative score's weight on the past).

Deviations from the official code (TungChintao/FlowCut `flowcut/modeling_clip_flowcut.py` @ a2ecd24):
* the official code prunes the same number of patches from every image of a batch (the largest r of the
  batch); vtprune computes r per image, so each image keeps what it would alone: images of one batch then
  hold different counts between two pruning layers, and the engine masks the padding slots in the
  attention of the following CLIP layers (sdpa and eager towers; a flash-attention tower is refused then);
* a layer's patches are dropped after its attention sub-block instead of after its MLP (token-wise: the
  kept tokens are the same), and only the [CLS] query row and the values are computed, never the eager
  attention map; the entropy uses 0·log 0 = 0; ties go to the lower index;
* LLaVA-NeXT is refused: the engine's vit stage needs one tower input per image (the repo's anyres path
  prunes in the LLM instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, ModelInfo, Stage, bounded, register

if TYPE_CHECKING:
    from vtprune.signals.context import ViTLayerSignals


def flowcut_scores(cls_attention: Tensor, semantic: Tensor, values: Tensor, valid: Tensor | None) -> Tensor:
    """(N, P) information-flow score of each patch: (a/Σa + s/Σs)·‖v̄‖₁, 0 on invalid slots (None: all
    valid). `values` are the head-mean value vectors (N, P, dh)."""
    shares = _shares(torch.stack([cls_attention.float(), semantic.float()]), valid)
    return _flow_score(shares, values.float().abs().sum(dim=-1), valid)


def flowcut_prune_count(cls_attention: Tensor, valid: Tensor, keep: int, rpl: int) -> Tensor:
    """(N,) patches to remove with `rpl` pruning layers left: round((P − T)/√rpl · (1 − (H/Hmax)²))."""
    prob = _shares(cls_attention.float()[None], valid)[0]
    return _prune_count(prob, valid.sum(dim=1), keep, rpl)


def _shares(probs: Tensor, valid: Tensor | None) -> Tensor:
    """(K, N, P) float32 rows -> each row over its sum, the invalid slots (N, P) zeroed first."""
    if valid is not None:
        probs = probs * valid
    return probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-30)


def _flow_score(shares: Tensor, value_norm: Tensor, valid: Tensor | None) -> Tensor:
    """(N, P) (a/Σa + s/Σs)·‖v̄‖₁ from the (2, N, P) shares [a/Σa, s/Σs] and the (N, P) norms ‖v̄‖₁."""
    score = shares.sum(dim=0) * value_norm  # a sum of two terms: exactly a/Σa + s/Σs
    return score if valid is None else score * valid


def _first_row_products(rows: Tensor, keys: Tensor) -> Tensor:
    """(N, H, T) float32 products of each head's first row of `rows` (N, H, L, dh) with the rows of `keys`
    (N, H, T, dh): the batched matrix product torch.matmul(rows[:, :, :1].float(), keys.float().mT) runs,
    on the same contiguous operands, with each operand's float conversion and copy done in one step."""
    n, h, t, dh = keys.shape
    row = _contiguous_float(rows[:, :, :1]).view(n * h, 1, dh)
    return torch.bmm(row, _contiguous_float(keys.mT).view(n * h, dh, t)).view(n, h, t)


def _contiguous_float(x: Tensor) -> Tensor:
    """A contiguous float32 copy of `x` in one copy (`x` itself when it already is one)."""
    # `to` converts into the requested layout but returns a float32 input as it is, strided or not.
    return x.to(torch.float32, memory_format=torch.contiguous_format).contiguous()


def _prune_count(prob: Tensor, present: Tensor, keep: int, rpl: int) -> Tensor:
    """`flowcut_prune_count` from the normalised [CLS] attention a/Σa (N, P) and the (N,) patch counts."""
    p = present.float()
    entropy = -torch.special.xlogy(prob, prob).sum(dim=1)
    ratio = entropy / torch.log(p).clamp(min=1e-30)
    return ((p - keep) / math.sqrt(rpl) * (1 - ratio**2)).round().long()


@register
@dataclass
class FlowCut(Method):
    """Progressive pruning inside the vision encoder by cumulative information-flow scores."""

    stride: int = bounded(2, ge=1)
    decay: float = bounded(0.5, ge=0, lt=1)

    name = "flowcut"
    stage_kind = "vit"
    paper = "arXiv 2505.19536 (NeurIPS 2025)"
    unsupported_families = {
        "qwen2_vl": "it prunes inside the vision tower (the engine's vit stage is LLaVA-1.5 only)",
        "qwen2_5_vl": "it prunes inside the vision tower (the engine's vit stage is LLaVA-1.5 only)",
        "llava_next": "it prunes inside the vision tower, where an AnyRes image is several crops (the "
        "engine's vit stage is LLaVA-1.5 only; the repo's NeXT path prunes in the LLM instead)",
    }

    def stages(self, info: ModelInfo) -> list[Stage]:
        keep = self.keep_count(info, 64)
        feature = info.vision_feature_layer
        if feature is None:
            feature = info.vision_layers - 2  # LLaVA's vision_feature_layer = -2
        if feature < 1:
            raise PruneConfigError(f"flowcut: no vision layer comes before the feature layer ({feature})")
        return [Stage(kind="vit", keep=keep, vit_layers=tuple(range(feature)), vit_remove=0, name=self.name)]

    def merge_vit(self, stage: Stage, layer: int, hidden: Tensor, signals: ViTLayerSignals):
        """Update the cumulative scores; at pruning layers keep the best patches of each image.

        Returns None (nothing removed: the layer runs whole) at the layers that only score, which leave
        their products in `signals.state["pending"]` for the next pruning layer, and once every image is
        down to its budget. Host syncs: one per pruning layer with rpl > 0 (the padded width and
        whether every image fills it, in one transfer), none elsewhere. Two facts make the rest host-side
        knowledge: the padded width t − 1 is the largest image's patch count (a pruning layer pads to its
        largest target), and no image ever holds fewer than `keep` patches once pruning starts (all start
        with the same P > keep; a target is at least `keep` and at most what the image has)."""
        n, t, _ = hidden.shape
        state = signals.state
        if t - 1 <= stage.keep:  # the largest image is down to its budget, so every image is
            state.pop("pending", None)  # scores nothing will read
            return None
        dev = hidden.device
        valid = signals.valid  # None: every slot holds a patch
        invalid = self._invalid(state, valid)
        captured = signals.captured
        values = signals.values  # (N, H, T, dh) float32
        # Per head, the [CLS] query row's attention logits (scaled q·k) and the unscaled value dot products
        # v_CLS · v_j of the official code, over the same keys; and the head-mean value vectors.
        attention = _first_row_products(captured.query, captured.key) * captured.scaling  # (N, H, T)
        logits = torch.stack([attention, _first_row_products(values, values)])  # (2, N, H, T)
        value_mean = values.mean(dim=1)  # (N, T, dh)
        rpl = stage.vit_layers[-1] - layer  # pruning layers left after this one: F − 1 − l
        if rpl % self.stride:
            # Only the next pruning layer reads the cumulative score: the layers in between keep their
            # products (same tokens, same padding: nothing is removed before then) and are scored with it.
            state.setdefault("pending", []).append((logits, value_mean))
            return None
        layers = [*state.pop("pending", []), (logits, value_mean)]
        k = len(layers)
        if k > 1:
            logits = torch.cat([pair for pair, _ in layers])  # (2K, N, H, T), layer after layer
            value_mean = torch.stack([mean for _, mean in layers])  # (K, N, T, dh)
        # Every softmax at once, then the head means: a and s of each layer, (2K, N, P).
        if invalid is not None:
            logits.masked_fill_(invalid[:, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(dim=2)[:, :, 1:]
        # The masked softmax already put exact zeros on the padding slots, so the scores need no mask.
        shares = _shares(probs, None)
        norms = value_mean[..., 1:, :].abs().sum(dim=-1)  # ‖v̄‖₁, (N, P) or (K, N, P)
        if k == 1:
            scores = [_flow_score(shares, norms, None)]
        else:
            scores = shares.view(k, 2, n, t - 1).sum(dim=1) * norms  # (K, N, P), as `_flow_score` per layer
            weighted = (1 - self.decay) * scores
        cumulative = state.get("cumulative")
        for i in range(k):
            if cumulative is None:
                cumulative = scores[i]
            elif k == 1:
                cumulative = self.decay * cumulative + (1 - self.decay) * scores[i]
            else:
                cumulative = self.decay * cumulative + weighted[i]
        state["cumulative"] = cumulative
        attention_share = shares[-2]  # this layer's a/Σa
        patches_valid = None if valid is None else valid[:, 1:]
        if rpl == 0:
            # Every image holds at least `keep` patches (see above) and keeps exactly `keep`: no sync.
            width, ragged = stage.keep, False
        else:
            if patches_valid is None:
                present = torch.full((n,), t - 1, dtype=torch.long, device=dev)
            else:
                present = patches_valid.sum(dim=1)
            removed = _prune_count(attention_share, present, stage.keep, rpl)
            # at least `keep`, never more patches than the image has
            target = torch.minimum((present - removed).clamp(min=stage.keep), present)
            # The one host sync of the layer: the padded width (a data-dependent shape) and whether every
            # image fills it, i.e. whether the next layers need a padding mask.
            low, width = torch.stack(torch.aminmax(target)).tolist()
            ragged = low < width
        ranked = cumulative if invalid is None else cumulative.masked_fill(invalid[:, 1:], float("-inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :width]
        if ragged:
            # Padding slots (sorted last) point at any patch; they sort after the real ones and are masked.
            slot_ok = torch.arange(width, device=dev) < target[:, None]
            key = torch.where(slot_ok, order, torch.arange(t, t + width, device=dev))
        else:
            key = order  # every slot holds one of the image's best patches
        raster = torch.sort(key, dim=1).indices  # the kept patches in raster order
        kept_patches = order.gather(1, raster)
        kept = F.pad(kept_patches + 1, (1, 0))  # the [CLS] (position 0) first
        merged = hidden.gather(1, kept[:, :, None].expand(-1, -1, hidden.shape[-1]))
        state["cumulative"] = cumulative.gather(1, kept_patches)
        if not ragged:
            return merged, kept
        return merged, kept, F.pad(slot_ok.gather(1, raster), (1, 0), value=True)

    @staticmethod
    def _invalid(state: dict, valid: Tensor | None) -> Tensor | None:
        """~valid, computed once per merge and reused by the layers that see the same `valid`."""
        if valid is None:
            return None
        cached = state.get("invalid")
        if cached is None or cached[0] is not valid:
            cached = state["invalid"] = (valid, ~valid)
        return cached[1]
