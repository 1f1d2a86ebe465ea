"""HoloV — "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention"
(Zou et al., NeurIPS 2025, arXiv 2510.02912; official code github.com/obananas/HoloV,
`llava/model/utils.py::HoloV`).

Idea: attention-only pruning keeps clusters of similar, highly attended tokens and loses the rest of the
scene. HoloV cuts the image into crops, gives every crop a share of the budget from a crop score that mixes
[CLS] attention with the variance of the crop's token similarities, and keeps the most attended tokens of
each crop, so the kept set spans the whole image; before the LLM, kept tokens in raster order.

Official rule (LLaVA-1.5): a = the feature layer's head-mean [CLS] attention; x = the projected tokens. The
576 tokens are split into `crops` = 16 consecutive runs of the raster order (36 tokens, 1.5 image rows
each). In a crop of n tokens: S = cosine similarity of its tokens with the diagonal zeroed; mean_i = Σ_j S_ij
/ (n−1); var_i = Σ_j (S_ij − mean_i)² / (n−1) (the zeroed diagonal counts as an entry, as in the code);
a' = 1000·a; token score = a'_i + α·var_i·mean(|a'|)/(mean(|var|) + 1e-6); crop score = the mean token score
(a crop of one token: its raw attention). Quotas: ⌊T·w_c⌋ with w = scores / (Σ scores + 1e-6), the
remaining tokens one each to the crops of largest w; each crop keeps its quota of tokens with the highest
[CLS] attention.

Note: with the per-crop rescaling the variance term adds α·mean(a') to every crop whose tokens are not
mutually orthogonal, so the quotas are in effect proportional to each crop's mean [CLS] attention (×1.09);
vtprune computes the formula as written.

Parameters and defaults: keep (T, default 64: the repo hard-codes 64; its tables at 64 / 128 / 192 use the
same 16 crops and α), crops = 16, alpha = 0.09, partition = "raster" (official consecutive runs; "grid":
square 2-D blocks, √crops × √crops, the paper's picture of spatial crops).

On LLaVA-NeXT (AnyRes) the raster runs split each image's token sequence (base view, then the tiles with
their newline tokens) as the official code splits the packed features; `partition="grid"` is refused there.

Deviations from the official code (obananas/HoloV `llava/model/utils.py` @ 1d2e65e):
* a quota larger than its crop spills over: the official code then keeps fewer than T tokens and pads the
  image with zero vectors; vtprune gives the spare slots to the crops of largest weight that still have
  tokens, so exactly T real tokens remain;
* kept tokens are in raster order (the official order is crop by crop, by decreasing attention inside a
  crop); ties go to the lower index;
* the [CLS] attention comes from the feature layer's q/k under SDPA, not an eager tower's
  `output_attentions`; `partition="grid"` is a vtprune option (refused on LLaVA-NeXT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, ModelInfo, Selection, bounded, register
from vtprune.selection import Picked, mask_indices

EPS = 1e-6


def _bands(length: int, parts: int, device=None) -> Tensor:
    """(length,) band of each position when `length` is cut into `parts` consecutive bands, the first
    `length mod parts` one longer (the official uneven split)."""
    base, extra = divmod(length, parts)
    sizes = torch.tensor([base + (1 if p < extra else 0) for p in range(parts)], device=device)
    return torch.repeat_interleave(torch.arange(parts, device=device), sizes)


def crop_ids(grid: tuple[int, int], crops: int, partition: str, device=None) -> Tensor:
    """(H·W,) crop of each patch: consecutive raster runs, or √crops × √crops spatial blocks."""
    height, width = grid
    if partition == "raster":
        return _bands(height * width, crops, device)
    side = math.isqrt(crops)
    rows = _bands(height, side, device)
    cols = _bands(width, side, device)
    return (rows[:, None] * side + cols[None, :]).flatten()


def holov_quotas(weights: Tensor, sizes: Tensor, keep: int) -> Tensor:
    """(B, C) tokens per crop: ⌊keep·w⌋, the remainder one each to the largest weights (ties: lower crop),
    then any quota above its crop's size spills to the crops of largest weight with room."""
    b, c = weights.shape
    alloc = torch.floor(weights * keep).long()
    remaining = keep - alloc.sum(dim=1, keepdim=True)
    order = torch.sort(weights, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=weights.device).expand(b, c))
    alloc = alloc + (rank < remaining.clamp(max=c)).long()
    sizes = sizes.expand(b, c)
    alloc = torch.minimum(alloc, sizes)
    spill = keep - alloc.sum(dim=1, keepdim=True)
    room = (sizes - alloc).gather(1, order)  # spare capacity, crops by decreasing weight
    before = torch.cumsum(room, dim=1) - room
    extra_sorted = torch.minimum(room, (spill - before).clamp(min=0))
    return alloc + torch.zeros_like(alloc).scatter(1, order, extra_sorted)


def holov_select(
    features: Tensor, attention: Tensor, keep: int, crop: Tensor, alpha: float = 0.09
) -> tuple[Picked, Tensor, Tensor]:
    """HoloV on a batch (rows independent): (Picked in raster order, (B, C) crop scores, (B, C) quotas).

    features (B, N, D): the vectors compared inside a crop; attention (B, N): [CLS] attention; crop (N,):
    crop id of each token (0..C−1, every crop non-empty), best on the host: the crop count and sizes are then
    counted there, and the selection reads nothing back from the device (on a GPU a read would stall the host
    until the vision tower is done, before it could queue the LLM)."""
    b, n, _ = features.shape
    dev = features.device
    sizes = torch.bincount(crop)
    c = len(sizes)
    sizes = sizes.float().to(dev, non_blocking=True)
    crop = crop.to(dev, non_blocking=True)
    x = features.float()
    x = x / (x.norm(dim=-1, keepdim=True) + EPS)
    same = (crop[:, None] == crop[None, :]).float()  # (N, N)
    off_diag = same * (1.0 - torch.eye(n, device=dev))
    sim = (x @ x.transpose(1, 2)) * off_diag  # S with the diagonal and other crops zeroed
    denom = (sizes[crop] - 1).clamp(min=1)  # n − 1 of each token's crop
    mean = sim.sum(dim=2) / denom
    var = (((sim - mean[:, :, None]) ** 2) * same).sum(dim=2) / denom  # j = i counts (its zeroed S)
    a = attention.float() * 1e3
    index = crop.expand(b, n)

    def crop_mean(values: Tensor) -> Tensor:
        return torch.zeros(b, c, device=dev).scatter_add(1, index, values) / sizes

    scale = crop_mean(a.abs()) / (crop_mean(var.abs()) + EPS)
    score = crop_mean(a + alpha * var * scale.gather(1, index))
    score = torch.where(sizes > 1, score, crop_mean(attention.float()))  # a one-token crop: raw attention
    weights = score / (score.sum(dim=1, keepdim=True) + EPS)
    quotas = holov_quotas(weights, sizes.long()[None], keep)
    # Rank the tokens of each crop by attention (descending, lower index first) and keep the first quota.
    by_attention = torch.sort(attention.float(), dim=1, descending=True, stable=True).indices
    by_crop = torch.sort(crop[by_attention], dim=1, stable=True).indices
    order = by_attention.gather(1, by_crop)  # crop by crop, attention order inside
    starts = torch.cumsum(sizes.long(), dim=0) - sizes.long()
    rank_in_crop = torch.arange(n, device=dev) - starts[crop[order]]
    take = rank_in_crop < quotas.gather(1, crop[order])
    kept = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter(1, order, take)
    return mask_indices(kept, keep), score, quotas


@register
@dataclass
class HoloV(Method):
    """Per-crop quotas from [CLS] attention and similarity variance, then top attention in each crop."""

    crops: int = bounded(16, ge=1)
    alpha: float = bounded(0.09, ge=0)
    partition: Literal["raster", "grid"] = "raster"

    name = "holov"
    stage_kind = "vision"
    paper = "arXiv 2510.02912 (NeurIPS 2025)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.partition == "grid" and math.isqrt(self.crops) ** 2 != self.crops:
            raise PruneConfigError(f"holov: crops={self.crops} must be a square number for partition='grid'")

    def validate_for(self, info: ModelInfo) -> None:
        super().validate_for(info)
        if self.partition == "grid" and info.variable_tokens:
            raise PruneConfigError(
                f"holov: partition='grid' needs one patch grid per image; {info.family} images are several "
                "crops with newline tokens (use partition='raster', the official split)"
            )
        side = math.isqrt(self.crops)
        if self.partition == "raster" and self.crops > info.visual_tokens:
            raise PruneConfigError(
                f"holov: crops={self.crops} is more than the {info.visual_tokens} tokens of an image"
            )
        if self.partition == "grid" and side > min(info.grid):
            raise PruneConfigError(
                f"holov: crops={self.crops} ({side}×{side} blocks) does not fit the {info.grid} patch grid"
            )

    def select(self, stage_index, stage, signals) -> Selection:
        attention = signals.cls_attention
        tokens = attention.shape[1]
        # crop ids built on the host (holov_select counts the crops there)
        if self.partition == "raster":  # consecutive runs of the image's tokens, whatever their layout
            crop = _bands(tokens, min(self.crops, tokens))
        else:
            crop = crop_ids(signals.grid, self.crops, self.partition)
        picked, scores, quotas = holov_select(signals.projected, attention, stage.keep, crop, self.alpha)
        # the quotas always add up to the budget (spill-over included): every slot holds a token
        return Selection(*picked, scores=attention, info={"quotas": quotas}, all_valid=stage.keep <= tokens)
