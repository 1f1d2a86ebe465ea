"""Decode steps after a pruned prefill: what each step's forward and each pruned layer group receive.

The cache of a layer group holds only the tokens that group kept, so every decode step needs that group's
padding mask (its prefill part plus what `generate` appended) and, where positions were re-indexed, the next
positions and their rotary embeddings. Both are computed once per step and group.

With a preallocated (static) cache, as compiled decoding uses, each step's masks have the cache's fixed length
and its position comes from the count the cache keeps on the device (`compat.static_tokens_held`): a compiled
step then sees the same shapes and no changing Python integer, so it is traced once and replayed as one CUDA
graph, like the unpruned model's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtprune import compat
from vtprune.engine.masks import format_mask, static_step_mask
from vtprune.engine.state import Episode, Layout


def begin_step(episode: Episode, call: dict, attn_implementation: str) -> dict:
    """Record the step's new tokens and validity on `episode`; rewrite the model call's mask and positions
    when the LLM input was re-assembled at prefill (its length and positions differ from the prompt's)."""
    ref = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
    batch, q_len = ref.shape[:2]
    if static_cache(episode):
        return _begin_static_step(episode, call, q_len, attn_implementation)
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


def static_cache(episode: Episode) -> bool:
    """Whether the episode's cache is preallocated (the first layer's tells: a cache is static or not as a whole)."""
    return compat.static_key_length(episode.cache, 0) is not None


def _begin_static_step(episode: Episode, call: dict, q_len: int, attn_implementation: str) -> dict:
    episode.step = {"q_len": q_len}
    if episode.input_rebuilt:
        layout0 = episode.layouts[0]
        mask, position_ids = _static_inputs(episode, layout0, q_len, attn_implementation)
        # generate() passed its own prebuilt mask for the prompt's layout (a dict of them on models with
        # several attention types): ours replaces it, in the same container.
        prebuilt = call.get("attention_mask")
        call["attention_mask"] = {kind: mask for kind in prebuilt} if isinstance(prebuilt, dict) else mask
        call["position_ids"] = position_ids
    return call


def _static_inputs(episode: Episode, layout: Layout, q_len: int, attn_implementation: str):
    """(mask, position ids) of a decode step over a preallocated cache, for the layers of `layout`."""
    held = compat.static_tokens_held(episode.cache, layout.first_layer)
    mask = static_step_mask(
        layout.key_valid,
        held,
        q_len,
        compat.static_key_length(episode.cache, layout.first_layer),
        attn_implementation,
        episode.input_embeds.dtype,
    )
    decoded = held - layout.key_valid.shape[1]
    position_ids = layout.next_position[:, None] + decoded + torch.arange(q_len, device=held.device)
    return mask, position_ids


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
    if key not in step and static_cache(episode):
        # computed at the group's first layer, before its attention writes this step's tokens
        mask, position_ids = _static_inputs(episode, layout, step["q_len"], attn_implementation)
        rope = None if layout.model_positions else rotary(hidden, position_ids)
        step[key] = (mask, rope, None if layout.model_positions else position_ids)
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
