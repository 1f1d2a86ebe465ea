"""Feature-norm (L2) pruning — the vtprune study "visual token pruning and numerical rank".

Idea: the importance of an image token is the L2 norm of its feature; keep the top-k and restore spatial
(raster) order, before the LLM (docs/methods/l2norm.md). By default the norm is taken after the projector, as
the LLM sees the token (`feature="projected"`); `feature="vision"` uses the CLIP feature-layer output.

Parameters: keep (default 64), feature ("projected" | "vision").

Deviations from the official code: none known. The study's definition (no released code) is the only
one; ties go to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtprune.methods.base import ScorerMethod, register


@register
@dataclass
class L2NormPruning(ScorerMethod):
    """Top-k visual tokens by feature L2 norm."""

    feature: Literal["projected", "vision"] = "projected"

    name = "l2norm"
    stage_kind = "vision"
    paper = "feature-norm proxy (docs/methods/l2norm.md)"

    def score(self, stage_index, stage, signals):
        x = signals.projected if self.feature == "projected" else signals.features
        return x.float().norm(dim=-1)
