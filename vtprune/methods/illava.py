"""iLLaVA — "An Image is Worth Fewer Than 1/3 Input Tokens in Large Multimodal Models" (Hu et al.,
arXiv 2412.06263; repo hulianyuyy/iLLaVA; docs/methods/illava.md): a ViT stage and an LLM stage.

ViT stage: inside the vision encoder, at each layer of `vit_layers`, after the attention sub-block and before
the MLP, the importance of a patch is the attention it *receives* (head-mean softmax attention of that layer,
averaged over every query row, [CLS] row included); the `vit_remove` + 1 least important patches ([CLS]
excluded) are folded into the most important of them by a weighted average with weights r+1, r, …, 1 in
ascending-importance order (the least important weighs most, as the official code does), the other r are
dropped, raster order is kept. The engine runs it exactly there (a "vit" Stage, vtprune/engine/vit.py);
later CLIP layers, the feature layer and the projector see only the survivors.

LLM stage: at layer `llm_layer` the image tokens the last prompt token attends to least (FastV's score:
head-mean last-token row of the previous layer's attention) are folded into the lowest-scoring kept token by
the same weighted average (weights 1, 2, …, r+1 from that survivor to the least important removed token);
the merged hidden state replaces the survivor (`Selection.values`); kept tokens stay in raster order with
their original positions. Both merges are `illava_weighted_merge` below.

Defaults: `vit_layers` None = the official 5, 6, 7, 8 (for a CLIP tower of at least 10 layers, LLaVA-1.5's
24-layer ViT-L; a shallower tower, e.g. the tests' 3-layer one, gets no ViT stage by default); `vit_layers=()`
disables the ViT stage; explicit layers must lie before LLaVA's feature layer (checked by the engine).
`vit_remove` = 92 patches per layer (official). LLaVA-1.5 defaults: 576 → 208 patches per image after the
ViT stage. The configuration the debiasing paper used on LLaVA-1.5 is not released.

Budget: `keep` applies to the LLM stage: the visual tokens per image left after it; a fraction is of the
P' patches that leave the ViT stage, a count larger than P' keeps all of them. keep = every token of the
image (576 on LLaVA-1.5, or 1.0) is the unmodified model: the default ViT stage is skipped too (explicit
`vit_layers` still run, as they fix their own count). Default round(llm_r · P')
(``llm_r`` = 0.70, the README's keep fraction; 146 on LLaVA-1.5). `llm_layer` defaults to 2: the repo's
image setting (8) targets LLaVA-OneVision, its LLaVA-1.5 setting is not released, and the debiasing paper
compares it with FastV-style pruners at K=2 — a vtprune choice. The record has one stage per part ("vit":
patches per sample after the ViT merges; "llm": after the LLM merge).

Deviations from the official code (hulianyuyy/iLLaVA @ 4068149):
* the official code targets SigLIP/Qwen2-VL towers without [CLS]; on CLIP the [CLS] is never merged (it
  stays first) but its query row counts in the received attention;
* its LLaVA-1.5 configuration is not released: `llm_layer` = 2 and the default ViT layers 5-8 are
  vtprune's choices (see above); keep = every token skips the default ViT stage;
* attention from SDPA-captured q/k in float32 (the official code needs eager attention); ties go to the
  lower index; batches are pruned per sample;
* there is no released debiasing patch: vtprune applies FastV's rule (cubic recency weights, padding
  above half a patch) to the LLM-stage score.

Parameters: keep, llm_layer (2), llm_r (0.70, used only when keep is None), vit_layers (None = 5-8),
vit_remove (92); attention options heads, num_heads, debias (no released patch; vtprune applies it to the
LLM-stage score, vtprune/signals/debias.py; the recency correction is off after a ViT stage, as tokens are no longer a full raster),
debias_strength, benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vtprune.errors import PruneConfigError
from vtprune.methods.base import (
    AttentionMethod,
    ModelInfo,
    Selection,
    Stage,
    bounded,
    kept_per_row,
    register,
    resolve_keep,
)
from vtprune.selection import MergedSelection, check_2d, check_count, check_features, gather_rows, rank_tokens

if TYPE_CHECKING:
    from vtprune.signals.context import ViTLayerSignals

OFFICIAL_VIT_LAYERS = (5, 6, 7, 8)


def illava_weighted_merge(scores: Tensor, hidden: Tensor, num_remove: int) -> MergedSelection:
    """iLLaVA's LLM-stage rule: drop the ``r`` lowest-scoring tokens, folding them into a survivor.

    Rank tokens by score (descending, ties lower index). The last ``r + 1`` of that ranking — the lowest-
    scoring kept token followed by the ``r`` tokens to remove, in decreasing score — are averaged with
    weights ``1, 2, …, r + 1`` (the *least* important token weighs most, as the official code does),
    normalised by their sum, and the result replaces the surviving token. The ``r`` tokens are dropped;
    the ``N - r`` kept tokens are returned in raster order. ``r = round(N · (1 - keep_fraction))`` is the
    caller's job.

    Args:
        scores: ``(B, N)`` importance (last-token attention of the previous layer, head mean).
        hidden: ``(B, N, D)`` hidden states of the image tokens.
        num_remove: ``r``, ``0 <= r <= N - 1``.

    Returns:
        :class:`MergedSelection` with ``N - r`` tokens.
    """
    check_2d("scores", scores)
    b, n = scores.shape
    check_features("hidden", hidden, b, n)
    r = check_count("num_remove", num_remove, n - 1)
    h = hidden.float()
    order, _ = rank_tokens(scores)
    tail = order[:, n - r - 1 :]  # survivor first, then the removed tokens by decreasing score
    w = torch.arange(1, r + 2, device=h.device, dtype=torch.float32)
    merged = torch.einsum("t,btd->bd", w, gather_rows(h, tail)) / w.sum()
    kept = order[:, : n - r]
    hid = gather_rows(h, kept)
    hid[:, n - r - 1] = merged
    return MergedSelection.in_raster_order(kept, hid, hidden.dtype)


@register
@dataclass
class ILLaVA(AttentionMethod):
    """ViT-stage and LLM-stage weighted merges of the least-attended image tokens."""

    llm_layer: int = bounded(2, ge=1, note="scores come from the layer before")
    llm_r: float = bounded(0.70, gt=0, le=1, note="fraction of image tokens kept")
    vit_layers: tuple[int, ...] | None = None
    vit_remove: int = bounded(92, ge=1)

    name = "illava"
    stage_kind = "llm"
    paper = "arXiv 2412.06263"

    def resolved_vit_layers(self, info: ModelInfo) -> tuple[int, ...]:
        if self.vit_layers is not None:
            return self.vit_layers
        return OFFICIAL_VIT_LAYERS if info.vision_layers >= 10 else ()

    def stages(self, info: ModelInfo) -> list[Stage]:
        n = info.visual_tokens
        layers = self.resolved_vit_layers(info)
        full = self.keep is not None and resolve_keep(self.keep, n) >= n  # a count of n, or 1.0
        if full and self.vit_layers is None:
            # keep = every token of the image is the unmodified model: the default ViT stage would still
            # merge 4 × 92 patches away; explicit vit_layers fix that count, as explicit counts do elsewhere
            layers = ()
        left = n - len(layers) * self.vit_remove  # patches per image entering the LLM
        if left < 1:
            raise PruneConfigError(
                f"illava: vit_remove={self.vit_remove} at {len(layers)} vision layer(s) removes all "
                f"{n} patches of an image"
            )
        if self.keep is None:
            keep = max(1, round(left * self.llm_r))
        elif isinstance(self.keep, float) and self.keep <= 1.0:
            keep = resolve_keep(self.keep, left)
        else:
            keep = min(resolve_keep(self.keep, n), left)
        llm = Stage.before_layer(self.llm_layer, keep, queries="last", name="illava")
        if not layers:
            return [llm]
        vit = Stage(kind="vit", keep=left, name="illava_vit", vit_layers=layers, vit_remove=self.vit_remove)
        return [vit, llm]

    def merge_vit(
        self, stage: Stage, layer: int, hidden: torch.Tensor, signals: ViTLayerSignals
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, Dv) hidden states ([CLS] first) of one CLIP layer, scored with the attention each token
        receives -> (N, T - r, Dv) merged hidden states and (N, T - r) positions of the survivors."""
        merged = illava_weighted_merge(signals.received[:, 1:], hidden[:, 1:], stage.vit_remove)
        cls_pos = torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=hidden.device)
        kept = torch.cat([cls_pos, merged.indices + 1], dim=1)
        return torch.cat([hidden[:, :1], merged.hidden.to(hidden.dtype)], dim=1), kept

    def select(self, stage_index, stage, signals) -> Selection:
        scores, info = self.attention_scores(signals, "last", budget=stage.keep)
        n = signals.num_visual
        removed = n - kept_per_row(stage, signals)
        merged = illava_weighted_merge(scores, signals.visual_hidden(), removed)
        info["merged"] = removed
        return Selection(merged.indices, values=merged.hidden, scores=scores, info=info)
