"""No pruning: the unmodified model, run through the same engine path (the reference of every comparison).

Deviations from the official code: none known (no official code: this is the unpruned LLaVA).
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.methods.base import Method, ModelInfo, Stage, register


@register
@dataclass
class NoPruning(Method):
    """Keeps every visual token."""

    name = "none"
    stage_kind = "-"
    paper = "-"

    def stages(self, info: ModelInfo) -> list[Stage]:
        return []
