"""HiMAP — "Unraveling the Shift of Visual Information Flow in MLLMs: From Phased Interaction to Efficient
Inference" (repo ustc-hyin/HiMAP); docs/methods/himap.md.

Idea: in shallow layers image tokens mostly pass information to the text, in middle layers mostly to each
other. Stage 1 (before layer K_t) keeps the R_t image tokens that receive the most attention from the
text (rows = every token after the image, SUM over rows, head mean, attention of layer K_t − 1); stage 2
(before layer K_i) keeps the R_i tokens that receive the most attention from the remaining image tokens
(rows = image tokens, SUM, layer K_i − 1). Kept tokens stay in raster order with their original positions.

Budget (tokens per image):
* keep=None: the README setting R_t = 288 at K_t = 2, R_i = 72 at K_i = 8 (half and an eighth of the
  tokens per image; layer average 144 on LLaVA-1.5).
* keep=128 on LLaVA-1.5 (576 tokens, 32 layers, K_t=2, K_i=8): the debiasing repo's 115 @ 2, 90 @ 8
  (layer average 125.1).
* any other keep = T is a layer average: the README shape R_t = 4·R_i with
  ``R_i = round((N·T − K_t·V) / (4·(K_i − K_t) + (N − K_i)))`` (N layers, V tokens per image; this gives
  back 288/72 for T = 144). 192 → 416 / 104 and 64 → 76 / 19 on LLaVA-1.5 (neither is published).
  Counts are clipped to [1, V] (a T below what the first K_t full layers allow keeps 4 / 1 tokens);
  keep ≥ V keeps everything.
* explicit ``R_t`` and ``R_i`` (both) override the budget.

Parameters: keep, K_t (2), K_i (8), R_t, R_i — layers are validated against the model (1 ≤ K_t < K_i ≤
last layer), so a small model takes e.g. K_t=1, K_i=2; attention options heads, num_heads, debias (stage 1
only, vtprune/signals/debias.py), debias_strength, benchmark.

Debiasing as the released patch (intcomp/attention-bias `patches/HiMAP.patch` @ e75ebe7): stage 1 only;
"sink" zeroes the patches with more than half padding; the keep count is not capped.

Deviations from the official code (ustc-hyin/HiMAP @ 6c279e7):
* the official code runs eager attention and only handles batch size 1; here the rows come from
  SDPA-captured q/k, per sample, scores in float32 with lower-index ties;
* pruning is prefill-only (the official code keys pruning on the layer index only, not on prefill vs
  decode);
* image tokens are located by their id (the official code hard-codes the offset 35 and 576 tokens);
* the debiasing patch reads the padding geometry from the image size, vtprune from the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.errors import PruneConfigError
from vtprune.methods.base import AttentionMethod, ModelInfo, ScorerMethod, Scores, Stage, bounded, register


def himap_counts_for_average(
    average: float, k_t: int, k_i: int, num_layers: int, visual: int
) -> tuple[int, int]:
    """(R_t, R_i) of the README shape R_t = 4·R_i whose layer average is `average` (clipped to [1, V])."""
    weight = 4 * (k_i - k_t) + (num_layers - k_i)
    r_i = round((num_layers * average - k_t * visual) / weight) if weight > 0 else 1
    r_i = min(visual, max(1, r_i))
    return min(visual, 4 * r_i), r_i


@register
@dataclass
class HiMAP(AttentionMethod, ScorerMethod):
    """Text→image pruning at K_t, then image→image pruning at K_i (attention sums)."""

    K_t: int = bounded(2, ge=1)
    K_i: int = 8
    R_t: int | None = bounded(None, ge=1)
    R_i: int | None = bounded(None, ge=1)

    name = "himap"
    stage_kind = "llm"
    paper = "HiMAP (ustc-hyin/HiMAP)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.K_t < self.K_i:
            raise PruneConfigError(f"himap: need 1 <= K_t < K_i, got K_t={self.K_t}, K_i={self.K_i}")
        if (self.R_t is None) != (self.R_i is None):
            raise PruneConfigError(
                "himap: give both R_t and R_i (explicit counts) or neither (budget from keep)"
            )

    def counts(self, info: ModelInfo) -> tuple[int, int]:
        v, n = info.visual_tokens, info.num_layers
        if self.R_t is not None:
            if max(self.R_t, self.R_i) > v:
                raise PruneConfigError(
                    f"himap: R_t={self.R_t}, R_i={self.R_i} exceed the {v} tokens of an image"
                )
            return self.R_t, self.R_i
        if self.keep is None:
            return max(1, round(v * 288 / 576)), max(1, round(v * 72 / 576))
        keep = self.keep_count(info, v)
        if keep >= v:
            return v, v
        if (v, n, self.K_t, self.K_i, keep) == (576, 32, 2, 8, 128):
            return 115, 90
        return himap_counts_for_average(keep, self.K_t, self.K_i, n, v)

    def stages(self, info: ModelInfo) -> list[Stage]:
        r_t, r_i = self.counts(info)
        return [
            Stage.before_layer(self.K_t, r_t, queries="text", name="himap_img2txt"),
            Stage.before_layer(self.K_i, r_i, queries="image", name="himap_img2img"),
        ]

    def score(self, stage_index, stage, signals) -> Scores:
        scores, info = self.attention_scores(
            signals, stage.queries, budget=stage.keep, reduce="sum", debias=stage_index == 0
        )
        return Scores(scores, info)
