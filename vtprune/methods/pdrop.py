"""PyramidDrop — "Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction"
(Xing et al., CVPR 2025, arXiv 2410.17247; repo Cooperx521/PyramidDrop); docs/methods/pdrop.md.

Idea: the LLM is cut into stages; at the end of each stage the image tokens the last instruction token
attends to least are dropped, so the visual sequence shrinks like a pyramid. The score at a stage
boundary k is computed with layer k's own input RMSNorm, q/k projections and RoPE applied to the hidden
states entering layer k (the rows of the last prompt token, softmax over all keys, head mean); layer k
already runs on the kept tokens, positions are re-indexed contiguously after every stage.

Budget:
* keep=None: the paper/README default, ``layer_list`` [8, 16, 24] with ratios λ^s (λ = ``lam`` = 0.5) of
  the tokens per image: 288 / 144 / 72 on LLaVA-1.5 (``int(576 · λ^s)``).
* keep = T: T is the average number of visual tokens per LLM layer (the convention of the SparseVLM /
  debiasing tables). On LLaVA-1.5 (576 tokens, 32 layers) 64/128/192 use the debiasing repo's shape,
  layers [2, 10, 20] with ratios 64: [0.10, 0.05, 0.025], 128: [0.32, 0.16, 0.08], 192: [0.54, 0.27, 0.135]
  (kept 57/28/14, 184/92/46, 311/155/77; averages 64.25 / 128.0 / 191.06). Any other T (or another model)
  keeps that shape (layers [2, 10, 20] unless ``layer_list`` is given, ratios r·λ^s) and solves r so the
  layer average is T: ``r = (N·T − l₁·V) / (V · Σ_s (l_{s+1} − l_s)·λ^s)`` with l_{S+1} = N layers,
  V tokens per image; this reproduces the repo's ratios up to their rounding. Counts are
  ``int(V · ratio)`` clipped to [1, V]; a T below what the first l₁ full layers allow keeps one token per
  image per stage (the record's ``layer_avg_tokens`` shows the average reached). keep ≥ V keeps all.
* explicit ``ratios`` (fractions of the tokens per image, one per layer of ``layer_list``) override the
  budget.

Parameters: keep, layer_list, ratios, lam (0.5); attention options heads, num_heads, debias (first stage
only, vtprune/signals/debias.py), debias_strength, benchmark.

Debiasing as the released patch (intcomp/attention-bias `patches/PyramidDrop.patch` @ e75ebe7): first
stage only; "recency" multiplies by the per-benchmark exponential weights; "sink" zeroes every patch with
more than 1 % padding (`generate_pad_mask(threshold=0.01)`, stricter than the other patches' 0.5); the
keep count is not capped.

Deviations from the official code (Cooperx521/PyramidDrop @ 6444f30):
* scores in float32 with lower-index ties (the official code ranks fp16 scores with `topk`);
* batches are supported (per sample, left padding: the last prompt position is the same for every row);
  the official inference code handles one sample;
* the debiasing patch reads the padding geometry from the image size, vtprune from the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.errors import PruneConfigError
from vtprune.methods.base import AttentionMethod, ModelInfo, ScorerMethod, Scores, Stage, bounded, register

PAPER_LAYERS = (8, 16, 24)
BUDGET_LAYERS = (2, 10, 20)
BUDGET_RATIOS: dict[int, tuple[float, ...]] = {
    192: (0.54, 0.27, 0.135),
    128: (0.32, 0.16, 0.08),
    64: (0.10, 0.05, 0.025),
}


def pdrop_ratio_for_average(
    average: float, layers: tuple[int, ...], num_layers: int, visual: int, lam: float
) -> float:
    """r such that ratios r·λ^s (s = 0, 1, ...) give a layer-average of `average` visual tokens."""
    bounds = (*layers, num_layers)
    weight = sum((bounds[s + 1] - bounds[s]) * lam**s for s in range(len(layers)))
    if weight <= 0:
        return 0.0
    return (num_layers * average - layers[0] * visual) / (visual * weight)


@register
@dataclass
class PyramidDrop(AttentionMethod, ScorerMethod):
    """Stage-wise dropping by the last instruction token's attention, re-projected with the next layer."""

    layer_list: tuple[int, ...] | None = bounded(None, ge=1)
    ratios: tuple[float, ...] | None = bounded(None, gt=0, le=1, note="fractions of the tokens per image")
    lam: float = bounded(0.5, gt=0, le=1)

    name = "pdrop"
    stage_kind = "llm"
    paper = "arXiv 2410.17247"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_list is not None and (
            not self.layer_list or list(self.layer_list) != sorted(set(self.layer_list))
        ):
            raise PruneConfigError(f"pdrop: layer_list={self.layer_list} must be increasing layer indices >= 1")
        if self.ratios is not None:
            if len(self.ratios) != len(self.layer_list or PAPER_LAYERS):
                raise PruneConfigError(
                    f"pdrop: {len(self.ratios)} ratios for layer_list {list(self.layer_list or PAPER_LAYERS)}; "
                    "give one ratio per layer"
                )

    def plan(self, info: ModelInfo) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(layers, per-image keep count of each stage)."""
        v, n = info.visual_tokens, info.num_layers
        if self.ratios is not None:
            layers = self.layer_list or PAPER_LAYERS
            ratios = self.ratios
        elif self.keep is None:
            layers = self.layer_list or PAPER_LAYERS
            ratios = tuple(self.lam ** (s + 1) for s in range(len(layers)))
        else:
            keep = self.keep_count(info, v)
            layers = self.layer_list or BUDGET_LAYERS
            if keep >= v:
                return layers, (v,) * len(layers)
            if self.layer_list is None and (v, n) == (576, 32) and keep in BUDGET_RATIOS and self.lam == 0.5:
                ratios = BUDGET_RATIOS[keep]
            else:
                r = pdrop_ratio_for_average(keep, layers, n, v, self.lam)
                ratios = tuple(max(r, 0.0) * self.lam**s for s in range(len(layers)))
        counts = tuple(min(v, max(1, int(v * ratio))) for ratio in ratios)
        return layers, counts

    def stages(self, info: ModelInfo) -> list[Stage]:
        layers, counts = self.plan(info)
        return [
            Stage(
                kind="llm",
                keep=c,
                score_layer=layer,
                prune_layer=layer,
                positions="reindex",
                queries="last",
                name=f"pdrop@{layer}",
            )
            for layer, c in zip(layers, counts, strict=True)
        ]

    def score(self, stage_index, stage, signals) -> Scores:
        return Scores(*self.attention_scores(signals, "last", budget=stage.keep, debias=stage_index == 0))
