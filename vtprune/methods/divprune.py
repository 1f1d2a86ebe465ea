"""DivPrune — "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar et al., CVPR 2025, arXiv 2503.02175).

Idea: treat pruning as a Max–Min Diversity Problem on the projected visual tokens: greedily keep the token
farthest (cosine distance 1 − cos) from everything kept so far, starting with the token farthest from its
nearest neighbour; the kept tokens enter the LLM in raster order (docs/methods/divprune.md).

Parameters: keep (T, default 64; the repo's default ratio 0.098 of 576 is 56 — pass keep=56 to match it),
feature ("projected" = what the LLM receives, the official choice; "vision" = the CLIP feature-layer patches,
an ablation).

Budgets 64 / 128 / 192 are plain counts (DivPrune has no other hyper-parameter).

Deviations from the official code (vbdi/divprune @ 799e2d9; both in `vtprune.selection.maxmin_diversity`):
* selected tokens are excluded explicitly (the official code relies on their ~0 self-distance and can
  re-pick a token once only duplicates are left);
* distances within 1e-6 of 0 are snapped to 0 so duplicates tie exactly, and every tie goes to the lower
  index (the official `argmax`/`topk` leave ties to the backend);
* batches are pruned per image (the official code runs one sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtprune.methods.base import Method, Selection, register
from vtprune.selection import maxmin_diversity


@register
@dataclass
class DivPrune(Method):
    """Greedy max–min cosine diversity on the projected visual tokens."""

    feature: Literal["projected", "vision"] = "projected"

    name = "divprune"
    stage_kind = "vision"
    paper = "arXiv 2503.02175"

    def select(self, stage_index, stage, signals) -> Selection:
        x = signals.projected if self.feature == "projected" else signals.features
        picked = maxmin_diversity(x, stage.keep)
        return Selection(*picked, all_valid=True)  # every token a candidate: each slot holds one
