"""Decode steps after a pruned prefill: what each step's forward and each pruned layer group receive.

The cache of a layer group holds only the tokens that group kept, so every decode step needs that group's
padding mask (its prefill part plus what `generate` appended) and, where positions were re-indexed, the next
positions and their rotary embeddings. Both are computed once per step and group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtprune import compat
from vtprune.engine.masks import format_mask
from vtprune.engine.state import Episode, Layout


def begin_step(episode: Episode, call: dict) -> dict:
    """Record the step's new tokens and validity on `episode`; rewrite the model call's 2-D mask and positions
    when the LLM input was re-assembled at prefill (its length and positions differ from the prompt's)."""
    ref = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
    batch, q_len = ref.shape[:2]
    done = episode.decode_len
    mask2d = call.get("attention_mask")
    # A 2-D padding mask gives the generated tail's validity; a static cache's prebuilt 4-D masks (or a dict of
    # them) do not, and the generated tokens are all real.
    padding = mask2d if isinstance(mask2d, torch.Tensor) and mask2d.ndim == 2 else None
    if padding is not None and padding.shape[1] >= done + q_len:
        tail = padding[:, padding.shape[1] - done - q_len :].bool()
    else:
        tail = torch.ones(batch, done + q_len, dtype=torch.bool, device=ref.device)
    offsets = torch.arange(done, done + q_len, device=ref.device)
    # The one host sync of an eager decode step. Under torch.compile (generate's compiled decode with a static
    # cache) a sync would break the graph, so the masks stay explicit there: the same attention, no sync.
    tail_valid = mask2d is None or (not torch.compiler.is_compiling() and bool(tail.all()))
    episode.step = {"q_len": q_len, "tail": tail, "offsets": offsets, "tail_valid": tail_valid}
    if episode.input_rebuilt:
        layout0 = episode.layouts[0]
        full = torch.cat([layout0.key_valid, tail], dim=1)
        all_valid = mask2d is None and not torch.compiler.is_compiling() and bool(full.all())
        call["attention_mask"] = None if all_valid else full.long()
        call["position_ids"] = layout0.next_position[:, None] + offsets
    return call


def layer_inputs(
    episode: Episode,
    layout: Layout,
    layer_idx: int,
    hidden: torch.Tensor,
    rotary: Callable,
    attn_implementation: str,
) -> tuple[object, tuple | None, torch.Tensor | None]:
    """(mask, rotary embeddings or None, position ids or None) of this step for the layers of `layout`."""
    step = episode.step
    key = ("layout", layout.first_layer)
    if key not in step:
        key_valid = torch.cat([layout.key_valid, step["tail"]], dim=1)
        mask = format_mask(
            key_valid,
            step["q_len"],
            attn_implementation,
            hidden.dtype,
            layout.all_valid and step["tail_valid"],
            key_length=compat.static_key_length(episode.cache, layer_idx),
        )
        if layout.model_positions:
            # Kept tokens kept their positions: the model's own rotary embeddings are right as they are.
            step[key] = (mask, None, None)
        else:
            position_ids = layout.next_position[:, None] + step["offsets"]
            step[key] = (mask, rotary(hidden, position_ids), position_ids)
    return step[key]
