"""FastV — "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv 2403.06764).

Idea: after the first K decoder layers, image tokens that receive little attention are dropped. The score
is the head-mean attention of the last prompt token at layer K-1 (the official code; the paper's text
averages over all query rows, available as `query="all"`), taken from that layer's own q/k while it runs
under SDPA; the drop happens before layer K and kept tokens keep their original positions
(docs/methods/fastv.md).

Parameters: keep (visual tokens kept after layer K; default: round(576·(1-R))), K=2, R=0.5 (fraction
dropped, used only when keep is not given), query="last" | "all"; and the attention options of every
attention-based method: heads ("mean"), num_heads, debias, debias_strength, benchmark.

Debiasing as the released patch (intcomp/attention-bias `patches/FastV.patch` @ e75ebe7): "recency"
multiplies the score by the released cubic weights, "sink" zeroes the padding patches (more than half
padding) and caps the kept count at the number of valid patches.

Deviations from the official code (pkunlp-icler/FastV @ d165972, its llava-hf fork):
* the score comes from layer K−1's own post-RoPE q/k under SDPA, in float32 (the official code switches
  the model to eager attention and reads fp16 `output_attentions`); ties go to the lower index;
* batches with left padding are pruned per sample (the official code reads batch element 0) and image
  tokens are located by their id (the official scripts hard-code the offset and 576 tokens);
* pruning happens once per generate(), at prefill; without a cache every step is a new prefill, as in the
  original (cache-less) FastV;
* the debiasing patch reads the padding geometry from the image size, vtprune from the pixels (border
  bands of the CLIP mean colour; `VisionSignals.padding_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtprune.methods.base import AttentionMethod, ModelInfo, ScorerMethod, Scores, Stage, bounded, register


@register
@dataclass
class FastV(AttentionMethod, ScorerMethod):
    """Drop the least-attended image tokens after layer K (last-token attention of layer K-1)."""

    K: int = bounded(2, ge=1, note="K=0 is random pruning: use method 'random'")
    R: float = bounded(0.5, ge=0, lt=1, note="fraction of image tokens dropped")
    query: Literal["last", "all"] = "last"

    name = "fastv"
    stage_kind = "llm"
    paper = "arXiv 2403.06764"

    def stages(self, info: ModelInfo) -> list[Stage]:
        keep = self.keep_count(info, max(1, round(info.visual_tokens * (1 - self.R))))
        return [Stage.before_layer(self.K, keep, queries=self.query, name="fastv")]

    def score(self, stage_index, stage, signals) -> Scores:
        scores, info, suppressed = self.attention_scores_and_sinks(signals, stage.queries, budget=stage.keep)
        valid = signals.visual_valid
        if suppressed is not None:
            # FastV's debiasing patch (intcomp/attention-bias patches/FastV.patch @ e75ebe7) lowers the keep
            # count to the number of valid patches: masked padding never fills the budget
            valid = valid & ~suppressed
        return Scores(scores, info, valid)


@register
@dataclass
class FastVFinePruner(FastV):
    """FastV scored only with the heads FinePruner selects (vtprune/signals/heads.py; docs/methods/fastv_finepruner.md).

    The head strategy and count are chosen per sample from the visual-token budget (resource-aware
    `heads="auto"`, dynamic count) unless `heads`/`num_heads` fix them; the selected heads are recorded.
    """

    heads: str = "auto"

    name = "fastv_finepruner"
    paper = "FinePruner head selection on FastV"
