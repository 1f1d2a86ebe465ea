"""What the engine remembers during one generate() call: the sequence as each group of decoder layers sees it
(`Layout`) and the call's state (`Episode`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune.engine.positions import next_position
from vtprune.methods.base import Stage
from vtprune.signals.context import Captured, VisionSignals


@dataclass
class Layout:
    """The sequence as one group of consecutive decoder layers sees it (the prefill part)."""

    first_layer: int
    key_valid: torch.Tensor  # (B, L) real tokens
    position_ids: torch.Tensor  # (B, L); (3, B, L) on M-RoPE models (engine/positions.py)
    visual_index: torch.Tensor  # (B, V) sequence positions of the visual tokens
    visual_valid: torch.Tensor  # (B, V)
    original_index: torch.Tensor  # (B, V) original visual-token numbering, -1 for created tokens
    stage: Stage | None = None
    all_valid: bool = True  # no padding or holes in the prefix (decided once, at prefill)
    text_valid: bool | None = None  # every non-visual slot is a real token (no prompt padding); None: unknown
    model_positions: bool = True  # positions equal the model's own (so are its rotary embeddings)
    prefill_mask: object = None  # formatted attention mask for the prefill
    prefill_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    decode_start: torch.Tensor | None = None  # (B,) first decoded position, when not the prefix's max + 1

    @property
    def next_position(self) -> torch.Tensor:
        """(B,) position of the first decoded token."""
        if self.decode_start is not None:
            return self.decode_start
        return next_position(self.position_ids, self.key_valid)


@dataclass
class Episode:
    """State of one generate() call (or one forward with its cache)."""

    layouts: list[Layout]
    input_embeds: torch.Tensor
    captures: dict[int, Captured] = field(default_factory=dict)
    cache: object = None
    vision: VisionSignals | None = None
    images_per_sample: int = 1
    sample_tokens: list[int] = field(default_factory=list)  # visual tokens of each sample before pruning
    text_width: int | None = None  # the most real tokens any sample has after its last image token
    input_rebuilt: bool = False  # the LLM input was re-assembled (fewer or padded image slots)
    prefill_done: bool = False
    decode_len: int = 0
    step: dict = field(default_factory=dict)  # per decode step: (mask, rope) per layout

    def layout_for(self, layer: int) -> Layout:
        current = self.layouts[0]
        for layout in self.layouts:
            if layout.first_layer <= layer:
                current = layout
        return current
