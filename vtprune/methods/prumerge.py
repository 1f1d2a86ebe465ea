"""LLaVA-PruMerge / PruMerge+ — "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
Models" (Shang et al., arXiv 2403.15388).

Idea: keep the patches whose [CLS] attention in the vision tower's LAST layer is an outlier (above
Q3 + 1.5·IQR; the count adapts to the image), enrich each kept patch with the attention-weighted sum of its
32 most similar tokens (key cosine), and add one token summarising every pruned patch; PruMerge+ also keeps
a spatially uniform sample of patches (algorithms.md §8). Training-free use (the released checkpoints are
LoRA fine-tunes).

Parameters: keep (None = adaptive, the paper; a number caps the tokens per image, extra token included:
PruMerge has no fixed budget, so 64 / 128 / 192 are caps, and the adaptive count below a cap is kept),
plus (False = PruMerge, True = PruMerge+), neighbours (32).

Signals, as the official code: the last CLIP layer's q/k projections of its input (after its
layer_norm1), one head over the full width, softmax(q·kᵀ / √width) of the [CLS] row over all tokens,
patch columns. The merged vectors are the feature-layer patches (what LLaVA projects), then projected.

Order in the LLM: attention-ranked tokens (descending), then PruMerge+'s spatial samples (ascending), then
the extra token — not raster order. Counts differ per image: the Selection pads with invalid slots.

Deviations from the official code: the outlier quartiles are taken per image (the official code flattens
the whole batch); the attention-ranked count is the number of outliers, at least 1 (the official
`int(N·(n/N))` can lose one to float rounding, and 0 outliers crash PruMerge+); ties in attention and
similarity go to the lower index; PruMerge+'s spatial sequence is the official `range(⌊s/6⌋, N−1, ⌊s/3⌋)`
with s = ⌊N / count⌋ (for N = 576 the official end 575).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import Method, ModelInfo, PruneConfigError, Selection, Stage, register
from vtprune.selection import topk_indices


def last_layer_cls_attention(signals) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, P) [CLS] attention, (N, P, D) keys) of the vision tower's last layer, single head (float32)."""
    out = signals.image_output
    hidden_states = getattr(out, "hidden_states", None)
    if hidden_states is None or hidden_states[-2] is None:
        raise PruneConfigError("prumerge needs the vision tower's hidden states (they were not computed)")
    layer = signals.adapter.vision_layers[-1]
    with torch.no_grad():
        h = layer.layer_norm1(hidden_states[-2])
        q = layer.self_attn.q_proj(h[:, :1]).float()
        k = layer.self_attn.k_proj(h).float()
    logits = (q @ k.transpose(1, 2)) * k.shape[-1] ** -0.5  # (N, 1, 1 + P)
    first_patch = hidden_states[-2].shape[1] - signals.features.shape[1]
    return logits.softmax(dim=-1)[:, 0, first_patch:], k[:, first_patch:]


def outlier_count(cls_attn: torch.Tensor) -> torch.Tensor:
    """(N,) number of tokens above Q3 + 1.5·IQR of each row (quartiles by linear interpolation)."""
    q = torch.quantile(cls_attn.float(), torch.tensor([0.25, 0.75], device=cls_attn.device), dim=1)
    upper = q[1] + 1.5 * (q[1] - q[0])
    return (cls_attn.float() > upper[:, None]).sum(dim=1)


def prumerge_select(
    cls_attn: torch.Tensor,
    features: torch.Tensor,
    keys: torch.Tensor,
    plus: bool = False,
    cap: int | None = None,
    neighbours: int = 32,
):
    """PruMerge(+) on a batch of images.

    Returns (indices (N, T) in output order, valid (N, T), merged (N, T, Dv) float32, extra (N, 1, Dv)
    float32): T is the largest count of the batch, invalid slots pad the shorter rows.
    """
    n, p = cls_attn.shape
    dev = cls_attn.device
    attn = cls_attn.float()
    pos = torch.arange(p, device=dev)
    order = torch.sort(attn, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, pos.expand(n, p))
    count = outlier_count(attn).clamp(min=1)
    chosen = rank < count[:, None]
    sort_key = torch.where(chosen, rank, 2 * p + pos)
    if plus:
        step = p // count  # int(1 / ratio), ratio = count / P
        start, stride = step // 6, (step // 3).clamp(min=1)
        spatial = (pos >= start[:, None]) & (pos < p - 1) & ((pos - start[:, None]) % stride[:, None] == 0)
        spatial = spatial & ~chosen
        sort_key = torch.where(spatial, p + pos, sort_key)
        count = count + spatial.sum(dim=1)
    if cap is not None:
        count = count.clamp(max=cap)
    width = int(count.max())  # one host sync per prefill: the padded width of the selection
    listed = torch.sort(sort_key, dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=dev) < count[:, None]
    indices = torch.where(valid, listed, 0)

    x = features.float()
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = kn @ kn.transpose(1, 2)  # (N, P, P)
    others = ~torch.eye(p, dtype=torch.bool, device=dev)
    m = min(neighbours, p - 1)
    near = topk_indices(sim.reshape(n * p, p), m, valid=others.repeat(n, 1)).indices.view(n, p, m)
    weights = torch.zeros(n, p, p, device=dev).scatter_(2, near, attn[:, None, :].expand(n, p, p).gather(2, near))
    merged_all = x + weights @ x  # x_i + Σ_{j ∈ 32 most similar} a_j x_j
    merged = merged_all.gather(1, indices[:, :, None].expand(-1, -1, x.shape[-1]))
    kept = torch.zeros(n, p, dtype=torch.bool, device=dev).scatter_(1, indices, valid)
    extra = ((attn * ~kept)[:, None, :] @ x)  # Σ_{pruned} a_j x_j
    return indices, valid, merged, extra


@register
@dataclass
class PruMerge(Method):
    """Adaptive [CLS]-attention outliers of the last CLIP layer, merged with their similar tokens."""

    plus: bool = False
    neighbours: int = 32

    name = "prumerge"
    stage_kind = "vision"
    paper = "arXiv 2403.15388"
    unsupported_families = {
        "llava_next": "its outlier detection and merging read the last CLIP layer of one tower input per image "
        "(an AnyRes image is several crops; the official code has no LLaVA-NeXT path)"
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.plus, bool):
            raise PruneConfigError(f"{self.name}: plus must be True (PruMerge+) or False")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise PruneConfigError(f"{self.name}: neighbours={self.neighbours!r} must be an int >= 1")

    def validate_for(self, info: ModelInfo) -> None:
        super().validate_for(info)
        if self.keep is not None and self.keep_count(info, info.visual_tokens) < 2:
            raise PruneConfigError(f"{self.name}: keep must be >= 2 (one kept token plus the extra token)")

    def stages(self, info: ModelInfo) -> list[Stage]:
        # keep is a cap (None: adaptive, at most every token plus the extra one)
        cap = self.keep_count(info, info.visual_tokens) if self.keep is not None else info.visual_tokens
        return [Stage(kind="vision", keep=cap, name=self.name)]

    def select(self, stage_index, stage, signals) -> Selection:
        cls_attn, keys = last_layer_cls_attention(signals)
        cap = stage.keep - 1 if self.keep is not None else None
        indices, valid, merged, extra = prumerge_select(cls_attn, signals.features, keys, self.plus, cap, self.neighbours)
        projected = signals.project(torch.cat([merged, extra], dim=1))
        return Selection(
            indices=indices,
            valid=valid,
            values=projected[:, :-1],
            extra=projected[:, -1:],
            extra_index=torch.full((indices.shape[0], 1), -1, dtype=torch.long, device=indices.device),
            scores=cls_attn,
            info={"counts": (valid.sum(dim=1) + 1).tolist()},
        )
