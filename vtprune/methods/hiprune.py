"""HiPrune — "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language
Models" (Liu et al., AAAI 2026, arXiv 2508.00553; official code github.com/Danielement321/HiPrune,
`LLaVA/llava/model/llava_arch.py`).

Idea: a ViT's middle layers attend to objects and its deep layers to global context. HiPrune keeps *anchor*
tokens (most attended in a middle "object" layer), their spatial neighbours as *buffer* tokens, and fills the
rest of the budget with *register* tokens (most attended in the deep feature layer); before the LLM, kept
tokens in raster order.

Official rule (LLaVA-1.5): "global attention" of a CLIP layer = softmax attention probabilities averaged
over heads and over every query row ([CLS] row included), patch columns. Anchors: the round(T·α/5) patches
with the highest global attention of layer `object_layer` (1-indexed, the repo's HIPRUNE_OBJECT_LAYER: CLIP
encoder layer object_layer − 1). Buffers: each anchor's index ±1 and ±24 in the flattened 24×24 raster,
clipped to [0, 575] (±1 wraps to the neighbouring row at the image edges). Registers: the T − |anchors ∪
buffers| remaining patches with the highest global attention of the feature layer (`attentions[-2]`, layer
22, the layer LLaVA takes its features from). Both attention maps come from the layers' own q/k
(`VisionSignals.received_attention`, a few heads at a time), never from eager attention. `select` makes no
host sync: the per-image anchor / buffer / register counts in `info` are tensors, read with the stage's
record.

Parameters and defaults: keep (T, default 64; the LLaVA-1.5 tables use T = 64 / 128 / 192: 1 / 3 / 4
anchors), alpha = 0.1, object_layer = 9 (None: 9 on a 24-layer tower, 9/24 of a shallower one),
buffer = "flat" (the official raster ±1 / ±width, clipped; "grid": the 4-neighbourhood inside the image,
no wrap, as the paper describes "spatially adjacent" tokens).

Deviations from the official code (Danielement321/HiPrune `LLaVA/llava/model/llava_arch.py` @ 6e83a12):
* the two attention maps come from the layers' own q/k (captured under SDPA) instead of an eager tower's
  `output_attentions` of every layer; ties go to the lower index (the official `topk` leaves them open);
* when anchors and buffers alone exceed T (large α, small T) the official code fails; vtprune keeps the
  anchors first, then the buffers in the official concatenation order (all −1, all +1, all −width, all
  +width neighbours, each in anchor order); the anchor count is Python's round(), as there;
* `buffer="grid"` (no wrap across rows) is a vtprune option; LLaVA-NeXT is refused (the official NeXT path
  splits the budget over the crops; vtprune assumes one patch grid per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, ModelInfo, Selection, bounded, register
from vtprune.selection import Picked, topk_indices

OFFICIAL_OBJECT_LAYER = 9  # of LLaVA-1.5's 24-layer CLIP ViT-L/14


def anchor_count(keep: int, alpha: float) -> int:
    """round(T·α/5) as the official code computes it (Python round: half to even)."""
    return round(keep * alpha / 5)


def hiprune_select(
    object_attention: Tensor,
    deep_attention: Tensor,
    keep: int,
    num_anchors: int,
    grid: tuple[int, int],
    buffer: str = "flat",
) -> tuple[Picked, Tensor]:
    """Anchors, buffers and registers per row (rows independent): (Picked in raster order, (B, N) role of
    each patch: 0 dropped, 1 anchor, 2 buffer, 3 register)."""
    b, n = object_attention.shape
    dev = object_attention.device
    height, width = grid
    order = torch.sort(object_attention.float(), dim=1, descending=True, stable=True).indices
    anchors = order[:, : min(num_anchors, n)]  # (B, a), by decreasing object-layer attention
    a = anchors.shape[1]
    # (B, 5, a): anchors, then each neighbour block (built on the device: a host-made step tensor would be
    # a blocking host-to-device copy)
    candidates = torch.stack([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width], dim=1)
    ok = torch.ones_like(candidates, dtype=torch.bool)
    if buffer == "flat":
        candidates = candidates.clamp(0, n - 1)
    else:
        row, col = anchors // width, anchors % width
        ok[:, 1] = col > 0
        ok[:, 2] = col < width - 1
        ok[:, 3] = row > 0
        ok[:, 4] = row < height - 1
        candidates = torch.where(ok, candidates, 0)
    candidates, ok = candidates.flatten(1), ok.flatten(1)
    # Each patch's priority is its first place in that list (anchors first); others are never listed.
    listed = torch.arange(5 * a, device=dev).expand(b, -1)
    unlisted = 5 * a
    priority = torch.full((b, n), unlisted, dtype=torch.long, device=dev)
    priority = priority.scatter_reduce(1, candidates, torch.where(ok, listed, unlisted), reduce="amin")
    structural = priority < unlisted
    # Listed patches rank above every register candidate (attention probabilities are <= 1).
    rank_score = torch.where(structural, 2.0 + (unlisted - priority).float(), deep_attention.float())
    picked = topk_indices(rank_score, keep)
    kept = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter(1, picked.indices, True)
    role = torch.where(kept & structural, torch.where(priority < a, 1, 2), torch.where(kept, 3, 0))
    return picked, role


@register
@dataclass
class HiPrune(Method):
    """Anchors (object-layer attention), their neighbours, and registers (feature-layer attention)."""

    alpha: float = bounded(0.1, ge=0, le=1)
    object_layer: int | None = bounded(None, ge=1, note="1-indexed")
    buffer: Literal["flat", "grid"] = "flat"

    name = "hiprune"
    stage_kind = "vision"
    paper = "arXiv 2508.00553 (AAAI 2026)"
    unsupported_families = {
        "qwen2_vl": "anchors, buffers and registers need a [CLS] row and one square patch grid per image; Qwen-VL's tower has neither",
        "qwen2_5_vl": "anchors, buffers and registers need a [CLS] row and one square patch grid per image; Qwen-VL's tower has neither",
        "llava_next": "anchors, buffers and registers are placed on one patch grid per image (the official "
        "LLaVA-NeXT path splits the budget over the crops; not implemented)"
    }

    def resolved_object_layer(self, info: ModelInfo) -> int:
        """1-indexed CLIP layer of the anchors."""
        if self.object_layer is not None:
            return self.object_layer
        return max(1, round(OFFICIAL_OBJECT_LAYER * info.vision_layers / 24))

    def validate_for(self, info: ModelInfo) -> None:
        super().validate_for(info)
        layer = self.resolved_object_layer(info)
        if layer > info.vision_layers:
            raise PruneConfigError(
                f"hiprune: object_layer={layer} is outside the vision tower (valid: 1..{info.vision_layers})"
            )

    def vision_attention_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return (self.resolved_object_layer(info) - 1,)

    def select(self, stage_index, stage, signals) -> Selection:
        patches = signals.features.shape[1]
        object_index = self.resolved_object_layer(signals.adapter.info()) - 1
        shallow = signals.received_attention(object_index)[:, -patches:]
        deep = signals.received_attention(signals.adapter.feature_layer)[:, -patches:]
        anchors = anchor_count(stage.keep, self.alpha)
        picked, role = hiprune_select(shallow, deep, stage.keep, anchors, signals.grid, self.buffer)
        # per-image counts as tensors: the engine reads them with the stage's record (no host sync here)
        counts = (role[:, None, :] == torch.arange(1, 4, device=role.device)[None, :, None]).sum(dim=2)
        info = {"anchors": counts[:, 0], "buffers": counts[:, 1], "registers": counts[:, 2]}
        # keep <= patches and nothing is masked: every slot holds a real patch
        return Selection(*picked, scores=deep, info=info, all_valid=True)
