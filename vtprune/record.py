"""What a pruned forward kept: per stage, per sample, in original visual-token numbering."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StageRecord:
    """One stage of one prefill.

    `kept[b]` lists the visual tokens sample b still has after this stage, as indices into the sample's
    ORIGINAL visual tokens (image i's token j is `i * tokens_per_image + j`); -1 marks a token the method
    created (a merged cluster, VisionZip's contextual tokens, a [CLS] token).
    """

    name: str
    kind: str  # "vit" | "vision" | "llm"
    score_layer: int | None
    prune_layer: int | None
    positions: str  # "original" | "reindex"
    kept: list[list[int]]
    counts: list[int]
    extra: dict = field(default_factory=dict)  # method-specific facts (selected heads, sinks, ...)


@dataclass
class PruneRecord:
    """Everything vtprune knows about the last prefill of a pruned model."""

    method: str
    params: dict
    visual_tokens: int  # per sample, before pruning
    num_layers: int
    stages: list[StageRecord] = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)
    # per sample, when images differ in token count (LLaVA-NeXT); `visual_tokens` is then the largest
    sample_visual_tokens: list[int] | None = None
    # per sample, per original visual token: (image, frame, row, column) where the model has such a layout
    # (Qwen-VL: frame = temporal patch, row / column = merged-token grid); None elsewhere
    token_coordinates: list[list[list[int]]] | None = None

    def kept_coordinates(self, stage: int = -1, sample: int = 0) -> list[list[int] | None]:
        """(image, frame, row, column) of each token a stage kept, None for tokens it created."""
        if self.token_coordinates is None:
            raise ValueError("this model's record has no token coordinates (Qwen-VL models have them)")
        table = self.token_coordinates[sample]
        return [table[k] if k >= 0 else None for k in self.stages[stage].kept[sample]]

    def sample_tokens(self, sample: int = 0) -> int:
        """Visual tokens of one sample before pruning."""
        return self.sample_visual_tokens[sample] if self.sample_visual_tokens else self.visual_tokens

    def layer_tokens(self, sample: int = 0) -> list[int]:
        """Visual tokens entering each LLM layer for one sample."""
        per_layer = [self.sample_tokens(sample)] * self.num_layers
        for stage in self.stages:
            start = 0 if stage.kind in ("vit", "vision") else stage.prune_layer
            for layer in range(start, self.num_layers):
                per_layer[layer] = stage.counts[sample]
        return per_layer

    @property
    def batch_size(self) -> int:
        return len(self.stages[0].counts) if self.stages else 0

    @property
    def tokens_after_pruning(self) -> list[int]:
        """Visual tokens the last LLM layer sees, per sample (the "keep T" of vision-stage papers)."""
        if not self.stages:
            return []
        return list(self.stages[-1].counts)

    @property
    def layer_avg_tokens(self) -> list[float]:
        """Visual tokens entering each LLM layer, averaged over layers (the "keep T" of SparseVLM/PDrop tables)."""
        return [sum(self.layer_tokens(b)) / self.num_layers for b in range(self.batch_size)]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tokens_after_pruning"] = self.tokens_after_pruning
        out["layer_avg_tokens"] = self.layer_avg_tokens
        return out

    def summary(self) -> dict:
        """Compact per-sample facts for result files (no index lists)."""
        return {
            "stages": [
                {"name": s.name, "kind": s.kind, "prune_layer": s.prune_layer, "counts": s.counts}
                for s in self.stages
            ],
            "tokens_after_pruning": self.tokens_after_pruning,
            "layer_avg_tokens": self.layer_avg_tokens,
        }
