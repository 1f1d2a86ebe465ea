"""Feature-norm (L2) pruning — the seed study "visual token pruning and numerical rank" (seeds/001).

Idea: the importance of an image token is the L2 norm of its feature; keep the top-k and restore spatial
(raster) order, before the LLM (algorithms.md §15). By default the norm is taken after the projector, as
the LLM sees the token (`feature="projected"`); `feature="vision"` uses the CLIP feature-layer output.

Parameters: keep (default 64), feature ("projected" | "vision").

Deviations from the official code: none known. The seed (seeds/001, a README without released code) is
the only definition; ties go to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtprune.methods.base import Method, ModelInfo, Selection, Stage, register
from vtprune.selection import topk_indices


@register
@dataclass
class L2NormPruning(Method):
    """Top-k visual tokens by feature L2 norm."""

    feature: Literal["projected", "vision"] = "projected"

    name = "l2norm"
    stage_kind = "vision"
    paper = "feature-norm proxy (algorithms.md §15; seed 001)"

    def stages(self, info: ModelInfo) -> list[Stage]:
        return [Stage(kind="vision", keep=self.keep_count(info, 64), name="l2norm")]

    def select(self, stage_index, stage, signals) -> Selection:
        x = signals.projected if self.feature == "projected" else signals.features
        scores = x.float().norm(dim=-1)
        return Selection(*topk_indices(scores, stage.keep), scores=scores)
