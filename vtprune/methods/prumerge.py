"""LLaVA-PruMerge / PruMerge+ — "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
Models" (Shang et al., arXiv 2403.15388; repo 42Shawn/LLaVA-PruMerge).

Idea: keep the patches whose [CLS] attention in the vision tower's LAST layer is an outlier (above
Q3 + 1.5·IQR; the count adapts to the image), enrich each kept patch with the attention-weighted sum of its
32 most similar tokens (key cosine), and add one token summarising every pruned patch; PruMerge+ also keeps
a spatially uniform sample of patches (docs/methods/prumerge.md). Training-free use (the released checkpoints are
LoRA fine-tunes).

Budget: PruMerge chooses its own count per image (the paper's point), so `keep` is only a cap: None =
adaptive (the paper); a number caps the tokens per image, extra token included (64 / 128 / 192 are caps,
and the adaptive count below a cap is kept). keep = all tokens is therefore NOT the unmodified model: the
image still goes through the outlier selection and the merges.

Parameters: keep (cap, see above), plus (False = PruMerge, True = PruMerge+), neighbours (32),
spatial_rule ("main" | "9d6586e", PruMerge+ only). With s = ⌊N / count⌋, PruMerge+'s spatial samples are
`range(0, N − 1, ⌊s/3⌋)` in the current official code ("main": `clip_encoder.py` of the main branch head
097c041, the rule since 1ca8b2b) and `range(⌊s/6⌋, N − 1, ⌊s/3⌋)` in the first PruMerge+ commit 9d6586e
(`spatial_rule="9d6586e"`, what vtprune followed before issue 20); for N = 576 the end is the official 575.

Signals, as the official code: the last CLIP layer's q/k projections of its input (after its
layer_norm1), one head over the full width, softmax(q·kᵀ / √width) of the [CLS] row over all tokens,
patch columns. The merged vectors are the feature-layer patches (what LLaVA projects), then projected.

Order in the LLM: attention-ranked tokens (descending), then PruMerge+'s spatial samples (ascending), then
the extra token — not raster order. Counts differ per image: the Selection pads with invalid slots.

Deviations from the official code (42Shawn/LLaVA-PruMerge `llava/model/multimodal_encoder/clip_encoder.py`
@ 097c041):
* the outlier quartiles are taken per image (the official code flattens the whole batch; they agree at
  batch size 1, the size it runs);
* the attention-ranked count is the number of outliers, at least 1 (the official `int(N·(n/N))` can lose
  one to float rounding, and 0 outliers crash PruMerge+);
* ties in attention and in key similarity go to the lower index (the official `topk` leaves them to the
  backend);
* `keep` caps the count (the official code has no budget).
* Qwen2-VL / Qwen2.5-VL (no [CLS], no official port): the outlier detection reads the attention each token
  receives in the tower's last full-attention block and its keys (`vtprune.models.qwen2_vl`); merged tokens are
  projected by the merger's MLP from merger inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, ModelInfo, Selection, Stage, bounded, register
from vtprune.selection import topk_indices


@dataclass(frozen=True)
class SpatialRule:
    """Where PruMerge+'s spatially uniform samples start and how far apart they are.

    With s = ⌊N / count⌋ (the official `int(1 / reduction_ratio)`), the samples are
    `range(start, N − 1, max(1, ⌊s / stride_div⌋))` with start = ⌊s / start_div⌋ (0 when start_div is None),
    minus the tokens already kept by attention. `commit` names the 42Shawn/LLaVA-PruMerge commit of
    `llava/model/multimodal_encoder/clip_encoder.py` (`token_prune_merge_advanced_plus`) the rule is read from.
    """

    start_div: int | None
    stride_div: int
    commit: str

    def __post_init__(self) -> None:
        if self.start_div is not None and self.start_div < 1:
            raise ValueError(f"start_div={self.start_div} must be >= 1 or None")
        if self.stride_div < 1:
            raise ValueError(f"stride_div={self.stride_div} must be >= 1")

    def samples(self, step: torch.Tensor, p: int) -> torch.Tensor:
        """(N, P) bool: the spatial sample positions of each row, for its step s = ⌊P / count⌋ (N,)."""
        pos = torch.arange(p, device=step.device)
        start = torch.zeros_like(step) if self.start_div is None else step // self.start_div
        # ⌊s/3⌋ >= 1 with the IQR count (at most a quarter of the tokens lie above Q3 + 1.5·IQR, so s >= 4);
        # the clamp only guards a count given otherwise (the official arange would raise on a 0 stride)
        stride = (step // self.stride_div).clamp(min=1)
        # the official end is 575 (exclusive) for 576 tokens: the last token is never a spatial sample
        return (pos >= start[:, None]) & (pos < p - 1) & ((pos - start[:, None]) % stride[:, None] == 0)


#: PruMerge+ spatial-sampling rules by name. "main" is the current official code (unchanged since 1ca8b2b,
#: 2024-05-02, through the main branch head 097c041); "9d6586e" is the first PruMerge+ commit (2024-04-20,
#: "Update PurMerge_plus"), whose samples start at ⌊s/6⌋ — what vtprune followed before issue 20.
SPATIAL_RULES: dict[str, SpatialRule] = {
    "main": SpatialRule(start_div=None, stride_div=3, commit="097c041"),
    "9d6586e": SpatialRule(start_div=6, stride_div=3, commit="9d6586e"),
}


def last_layer_cls_attention(signals) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, P) [CLS] attention, (N, P, D) keys) of the vision tower's last layer, single head (float32).
    Towers without [CLS] (Qwen-VL): the [CLS]-free substitute, the attention each token receives in the last
    full-attention block (head mean) and its keys (`VisionSignals.cls_attention`, `keys`)."""
    if not signals.adapter.has_cls:
        return signals.cls_attention.float(), signals.keys[:, 1:]
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
    spatial_rule: str = "main",
):
    """PruMerge(+) on a batch of images (`spatial_rule`: a key of SPATIAL_RULES, PruMerge+ only).

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
        spatial = SPATIAL_RULES[spatial_rule].samples(step, p) & ~chosen
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
    # padding slots scatter into a dump column: written to token 0, they could unmark a kept token 0
    # (PruMerge+'s first spatial sample), since scatter gives no order among duplicate indices
    kept = torch.zeros(n, p + 1, dtype=torch.bool, device=dev)
    kept = kept.scatter_(1, torch.where(valid, listed, p), True)[:, :p]
    extra = ((attn * ~kept)[:, None, :] @ x)  # Σ_{pruned} a_j x_j
    return indices, valid, merged, extra


@register
@dataclass
class PruMerge(Method):
    """Adaptive [CLS]-attention outliers of the last CLIP layer, merged with their similar tokens. PruMerge
    chooses its own count per image: keep only caps it, so keep = all tokens is not the unmodified model."""

    plus: bool = False
    neighbours: int = bounded(32, ge=1)
    spatial_rule: str = "main"

    name = "prumerge"
    stage_kind = "vision"
    paper = "arXiv 2403.15388"
    unsupported_families = {
        "llava_next": "its outlier detection and merging read the last CLIP layer of one tower input per image "
        "(an AnyRes image is several crops; the official code has no LLaVA-NeXT path)"
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spatial_rule not in SPATIAL_RULES:
            raise PruneConfigError(
                f"{self.name}: spatial_rule={self.spatial_rule!r}; valid: {', '.join(SPATIAL_RULES)} "
                "(PruMerge+ sampling of the current official code, or of commit 9d6586e)"
            )

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
        indices, valid, merged, extra = prumerge_select(
            cls_attn, signals.features, keys, self.plus, cap, self.neighbours, self.spatial_rule
        )
        projected = signals.project(torch.cat([merged, extra], dim=1))
        return Selection(
            indices=indices,
            valid=valid,
            values=projected[:, :-1],
            extra=projected[:, -1:],
            extra_index=torch.full((indices.shape[0], 1), -1, dtype=torch.long, device=indices.device),
            scores=cls_attn,
            info={"counts": valid.sum(dim=1) + 1},
        )
