"""Rotary positions of M-RoPE models (Qwen2-VL, Qwen2.5-VL) next to the usual 1-D ones.

Their positions are (3, B, L): (temporal, height, width) per token. The engine keeps them in that shape in
`Layout.position_ids`; these functions are the only places that care about the leading axis. On such models
every token the LLM still sees keeps the unpruned model's position of that very token (a contiguous
re-indexing of a 3-D layout has no one meaning), and decoding continues where the unpruned prompt would.
"""

from __future__ import annotations

import torch

from vtprune.methods.base import Stage


def next_position(position_ids: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """(B,) one past the largest position of a real token ((B, L) or (3, B, L) positions)."""
    positions = position_ids.masked_fill(~key_valid, -1)
    if positions.ndim == 3:
        positions = positions.max(dim=0).values
    return positions.max(dim=1).values + 1


def gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions of the tokens at sequence index (B, L') ((B, L) or (3, B, L) positions)."""
    if position_ids.ndim == 3:
        return torch.gather(position_ids, 2, index[None].expand(position_ids.shape[0], -1, -1))
    return torch.gather(position_ids, 1, index)


def layer_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The `position_ids` a decoder layer receives: Qwen-VL layers get the text positions only when a packed
    batch needs them (never here), so 3-D positions are not passed."""
    return None if position_ids.ndim == 3 else position_ids


def keeps_positions(stage: Stage, mrope: bool) -> bool:
    """Whether the tokens a stage keeps keep their positions. On M-RoPE models always, so an LLM stage asking
    for "reindex" (PyramidDrop) keeps them too, and the record says "original"."""
    if mrope:
        return True
    return stage.kind == "llm" and stage.positions == "original"


def position_source(src: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L') the previous column whose position each token of a gathered sequence takes: its own; a token
    created at this stage (src >= length, M-RoPE models only) takes the one of the token before it."""
    own = torch.where(src < length, src, -1)
    return torch.cummax(own, dim=1).values.clamp(min=0)


def kept_prompt_positions(
    full_positions: torch.Tensor, source_column: torch.Tensor, key_valid: torch.Tensor
) -> torch.Tensor:
    """(3, B, L') positions of a rebuilt prompt whose column j holds the token of original column
    `source_column[b, j]` (-1: padding, an unused image slot or a created token): each kept token gets the
    unpruned model's position of that very token; a created token (VisionZip's contextual tokens) gets the
    position of the kept token before it; padding gets 0. Original columns increase along the rebuilt row,
    so a running maximum finds "the kept token before"."""
    column = torch.cummax(source_column, dim=1).values
    positions = gather_positions(full_positions, column.clamp(min=0))
    return positions.masked_fill(~key_valid[None] | (column < 0)[None], 0)


def visual_source_columns(
    is_image: torch.Tensor, orig: torch.Tensor, valid: torch.Tensor, kept_width: int
) -> torch.Tensor:
    """(B, n * W) the prompt column of the token in each image slot: the sample's visual token number `orig`
    (image after image) -> its column; -1 for unused slots and created tokens (slot >= kept_width).
    `is_image` may be a host copy: the columns are then found on the host, with no read from the device."""
    batch = is_image.shape[0]
    most = int(is_image.sum(dim=1).max())
    visual_columns = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :most]
    visual_columns = visual_columns.to(orig.device, non_blocking=True)
    width = orig.shape[1]
    kept = valid & (orig >= 0) & (torch.arange(width, device=orig.device) < kept_width)
    columns = torch.gather(visual_columns, 1, orig.clamp(min=0).reshape(batch, -1)).view(orig.shape)
    return torch.where(kept, columns, -1).reshape(batch, -1)
