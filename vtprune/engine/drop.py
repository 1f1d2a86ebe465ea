"""Dropping tokens at an LLM stage: the hidden states, positions, rotary embeddings and attention mask the
later decoder layers see, as one pure function of the previous layout and the method's selection."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtprune.engine.masks import format_mask
from vtprune.engine.positions import gather_positions, keeps_positions, position_source
from vtprune.engine.state import Layout
from vtprune.methods.base import Selection, Stage

Rope = tuple[torch.Tensor, torch.Tensor]


def drop_tokens(
    hidden: torch.Tensor,
    prev: Layout,
    selection: Selection,
    stage: Stage,
    layer_idx: int,
    *,
    model_rope: Rope,
    rotary: Callable[[torch.Tensor, torch.Tensor], Rope],
    attn_implementation: str,
    key_length: int | None = None,
    mrope: bool = False,
) -> tuple[torch.Tensor, Layout]:
    """The hidden states after `stage` keeps `selection` of `prev`'s visual tokens, and the layout of the layers
    from `layer_idx` on.

    Text tokens stay, kept visual tokens keep their order, tokens the method created (`selection.extra`) come
    right after the last kept visual token. With `stage.positions == "original"` (and always on M-RoPE models,
    `mrope`) every token keeps its position and rotary embedding (gathered from `prev`'s, or `model_rope` before
    any LLM stage; a created token takes the ones of the token before it); otherwise positions are re-indexed
    contiguously over the valid tokens and `rotary(hidden, position_ids)` recomputes them. `key_length` is the
    layer's preallocated cache length (static cache), for the mask.
    """
    batch, length, d = hidden.shape
    device = hidden.device
    sel_valid = (
        selection.valid
        if selection.valid is not None
        else torch.ones_like(selection.indices, dtype=torch.bool)
    )
    sel = torch.where(sel_valid, selection.indices, 0)  # unused slots point anywhere; they are masked
    t = sel.shape[1]
    sel_valid = sel_valid & torch.gather(prev.visual_valid, 1, sel)
    kept_pos = torch.gather(prev.visual_index, 1, sel)  # (B, T) positions in the previous sequence
    is_visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
    is_visual.scatter_(1, prev.visual_index, True)
    n_text = length - prev.visual_index.shape[1]
    text_pos = torch.sort(is_visual.to(torch.int8), dim=1, stable=True).indices[
        :, :n_text
    ]  # (B, Lt) ascending
    extra = selection.extra
    c = 0 if extra is None else extra.shape[1]
    # Order: every token by its previous position; created tokens right after the last kept visual token.
    last_visual = kept_pos.masked_fill(~sel_valid, -1).max(dim=1).values.float()
    keys = torch.cat(
        [
            text_pos.float(),
            kept_pos.float() + torch.arange(t, device=device) / (2 * t + 2),
            last_visual[:, None] + 0.5 + torch.arange(c, device=device) / (2 * c + 2),
        ],
        dim=1,
    )
    source = torch.cat(
        [text_pos, kept_pos, length + torch.arange(c, device=device).expand(batch, c)], dim=1
    )
    order = torch.sort(keys, dim=1, stable=True).indices
    src = torch.gather(source, 1, order)  # (B, L') index into [hidden | extra]
    slot_of = torch.argsort(order, dim=1)  # candidate -> new position
    new_visual_index = slot_of[:, n_text:]
    padded = hidden if not c else torch.cat([hidden, extra.to(hidden.dtype)], dim=1)
    new_hidden = torch.gather(padded, 1, src[:, :, None].expand(-1, -1, d))
    if selection.values is not None:
        new_hidden = new_hidden.scatter(
            1, slot_of[:, n_text : n_text + t, None].expand(-1, -1, d), selection.values.to(hidden.dtype)
        )
    valid_src = torch.cat([prev.key_valid, torch.ones(batch, c, dtype=torch.bool, device=device)], dim=1)
    key_valid = torch.gather(valid_src, 1, src)
    visual_valid = sel_valid
    original = torch.gather(prev.original_index, 1, sel)
    if c:
        extra_valid = (
            selection.extra_valid
            if selection.extra_valid is not None
            else torch.ones(batch, c, dtype=torch.bool, device=device)
        )
        key_valid.scatter_(1, slot_of[:, n_text + t :], extra_valid)
        visual_valid = torch.cat([visual_valid, extra_valid], dim=1)
        extra_index = selection.extra_index
        extra_orig = torch.full((batch, c), -1, dtype=torch.long, device=device)
        if extra_index is not None:
            extra_orig = torch.where(
                extra_index >= 0,
                torch.gather(prev.original_index, 1, extra_index.clamp(min=0)),
                extra_orig,
            )
        original = torch.cat([original, extra_orig], dim=1)
    key_valid.scatter_(1, slot_of[:, n_text : n_text + t], sel_valid)

    keep_positions = keeps_positions(stage, mrope)
    if keep_positions:
        column = position_source(src, length)
        position_ids = gather_positions(prev.position_ids, column)
        # Gather from the rotary embeddings the previous layers used (the model's own before any LLM stage).
        cos, sin = prev.prefill_rope if prev.prefill_rope is not None else model_rope
        cos = cos.expand(batch, -1, -1)
        sin = sin.expand(batch, -1, -1)
        gather_index = column[:, :, None].expand(-1, -1, cos.shape[-1])
        rope = (torch.gather(cos, 1, gather_index), torch.gather(sin, 1, gather_index))
    else:
        position_ids = (torch.cumsum(key_valid, dim=1) - 1).clamp(min=0).masked_fill(~key_valid, 0)
        rope = rotary(new_hidden, position_ids)
    # Holes in the new sequence: text slots keep their validity, so when the method knows on the host whether
    # its slots are all real (`Selection.all_valid`) and the prompt's padding is known, nothing is read back.
    if selection.all_valid is False or prev.text_valid is False:  # holes in its slots, or prompt padding
        all_valid = False
    elif selection.all_valid and prev.text_valid:
        all_valid = True
    else:
        all_valid = bool(key_valid.all())
    layout = Layout(
        all_valid=all_valid,
        text_valid=prev.text_valid,
        model_positions=prev.model_positions and keep_positions,
        first_layer=layer_idx,
        key_valid=key_valid,
        position_ids=position_ids,
        visual_index=new_visual_index,
        visual_valid=visual_valid,
        original_index=original,
        stage=stage,
        prefill_mask=format_mask(
            key_valid,
            key_valid.shape[1],
            attn_implementation,
            hidden.dtype,
            all_valid,
            key_length=key_length,
        ),
        prefill_rope=rope,
    )
    return new_hidden, layout
