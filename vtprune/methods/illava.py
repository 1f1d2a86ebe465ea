"""iLLaVA — "An Image is Worth Fewer Than 1/3 Input Tokens in Large Multimodal Models" (Hu et al.,
arXiv 2412.06263; repo hulianyuyy/iLLaVA), algorithms.md §11 — the LLM stage only.

Idea: at one LLM layer the image tokens the last prompt token attends to least (FastV's score: head-mean
last-token row of the previous layer's attention) are not simply dropped but folded into the lowest-scoring
kept token by a weighted average (weights 1, 2, …, r+1 from that survivor to the least important removed
token, as the official code computes), so their information is kept in one token. The merged hidden state
replaces the survivor entering layer `llm_layer` (`Selection.values`); kept tokens stay in raster order
with their original positions. The work is `selection.illava_weighted_merge`.

NOT SUPPORTED — the ViT stage: iLLaVA also merges tokens inside the vision encoder (layers 5–8, 92 tokens
each, by received attention). vtprune's engine never changes the vision tower's sequence length, so only
the LLM stage is implemented; results are therefore not comparable with the paper's full iLLaVA numbers.

Budget: keep = the visual tokens per image after the merge (r = N − keep are removed); default
round(0.70 · N) (``llm_r`` = 0.70, the README's keep fraction). `llm_layer` defaults to 2: the repo's
image setting (8) targets LLaVA-OneVision, its LLaVA-1.5 setting is not released, and the debiasing
paper compares it with FastV-style pruners at K=2 — a vtprune choice. keep ≥ N keeps everything.

Parameters: keep, llm_layer (2), llm_r (0.70, used only when keep is None); attention options heads,
num_heads, debias (no released patch; vtprune applies it to the score, §13), debias_strength, benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.methods.base import AttentionMethod, ModelInfo, PruneConfigError, Selection, Stage, register
from vtprune.selection import illava_weighted_merge


@register
@dataclass
class ILLaVA(AttentionMethod):
    """LLM-stage weighted merge of the least-attended image tokens into the lowest kept one."""

    llm_layer: int = 2
    llm_r: float = 0.70

    name = "illava"
    stage_kind = "llm"
    paper = "arXiv 2412.06263"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.llm_layer < 1:
            raise PruneConfigError(
                f"illava: llm_layer={self.llm_layer} must be >= 1 (scores come from the layer before)"
            )
        if not 0.0 < self.llm_r <= 1.0:
            raise PruneConfigError(
                f"illava: llm_r={self.llm_r} (fraction of image tokens kept) must be in (0, 1]"
            )

    def stages(self, info: ModelInfo) -> list[Stage]:
        keep = self.keep_count(info, max(1, round(info.visual_tokens * self.llm_r)))
        return [
            Stage(
                kind="llm",
                keep=keep,
                score_layer=self.llm_layer - 1,
                prune_layer=self.llm_layer,
                positions="original",
                queries="last",
                name="illava",
            )
        ]

    def select(self, stage_index, stage, signals) -> Selection:
        scores, info = self.attention_scores(signals, "last", budget=stage.keep)
        n = signals.num_visual
        removed = n - min(stage.keep * signals.images_per_sample, n)
        merged = illava_weighted_merge(scores, signals.visual_hidden(), removed)
        info["merged"] = removed
        return Selection(merged.indices, values=merged.hidden, scores=scores, info=info)
