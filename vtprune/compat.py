"""Every place where vtprune depends on how a transformers release names or arranges things.

vtprune supports transformers 5.17 (the GPU image) through the newest 5.x that CI has passed (the cap in
pyproject.toml). Each helper below reads one thing that changed, or might change, between releases through
a path that works on all of them; the comment says which release changed it. The rest of vtprune reaches
transformers internals only through this module (tests/test_compat.py checks each helper on the installed
release, and CI runs the suite on both ends of the range).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# --- the KV cache argument ------------------------------------------------------------------------------
# 5.24 renamed the cache keyword of every model forward and decoder layer from `past_key_values` to
# `cache` (the old name still works, through a `deprecate_kwarg` wrapper that renames it *inside* forward;
# a forward pre-hook sees the name the caller used). Model outputs followed: `output.cache`, with
# `output.past_key_values` kept as a deprecated property.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_from_call(call: dict):
    """The KV cache a forward call was given, under whichever name the caller used (None if none)."""
    for name in CACHE_KWARGS:
        if call.get(name) is not None:
            return call[name]
    return None


def cache_from_output(output):
    """The KV cache a model output carries (`cache` from 5.24, `past_key_values` before)."""
    fields = getattr(output, "__dataclass_fields__", {})
    # 5.24+: read `cache` itself (the deprecated property logs a warning)
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def static_key_length(cache, layer_idx: int) -> int | None:
    """The key length attention sees at `layer_idx` when its cache layer is preallocated, else None.

    A static cache layer (`cache_implementation="static"`, 5.17 through 5.24: `StaticLayer`) returns its whole
    buffer of `max_cache_len` keys from `update`, valid or not; the attention mask must cover all of them.
    Each layer counts its own length (`cumulative_length`), so layers pruned to different lengths coexist.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return int(layer.max_cache_len) if type(layer) is StaticLayer else None


def static_tokens_held(cache, layer_idx: int) -> torch.Tensor | None:
    """How many tokens the preallocated cache layer at `layer_idx` holds, as a 0-d device tensor (None when the
    layer is not preallocated or not filled yet).

    A static layer counts its own writes in `cumulative_length`, a device tensor with a static address that
    `update` advances in place (5.17 through 5.24). Decode steps read their position from it, so a compiled step
    sees no Python integer that changes from one step to the next (no recompilation, one CUDA graph).
    """
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer) is not StaticLayer or not layer.is_initialized:
        return None
    return layer.cumulative_length


def fit_static_cache(cache, first_layer: int, change: int) -> bool:
    """Resize the preallocated layers of `cache` from `first_layer` on by `change` slots (fewer when negative)
    before they allocate them: a static layer allocates `max_cache_len` slots at its first update, 5.17 through
    5.24, and generate() sized them for the unpruned prompt. False if one of them already did (a cache the
    caller initialised early, or one being reused)."""
    layers = [layer for layer in getattr(cache, "layers", [])[first_layer:] if type(layer) is StaticLayer]
    if any(layer.is_initialized for layer in layers):
        return False
    for layer in layers:
        layer.max_cache_len += change
    return True


def cache_holds_any_length(cache) -> bool:
    """Whether every layer of `cache` stores whatever number of tokens its layer was given.

    The full-attention `DynamicLayer` (grows by concatenation) and `StaticLayer` (preallocated, counts its own
    length) do, in 5.17 through 5.24; sliding-window, quantized and linear-attention layers keep a window, a
    residual or a state and are not supported with pruning inside the LLM. No cache (None) is fine too.
    """
    if cache is None:
        return True
    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer) in (DynamicLayer, StaticLayer) for layer in layers)


def is_prebuilt_mask(mask) -> bool:
    """Whether `generate()` turned the padding mask into the model's 4-D mask before calling forward (see
    below). Models with several attention types get a dict of them, one per layer type (Qwen2-VL / Qwen2.5-VL
    with a preallocated cache, 5.24: {"full_attention": ...}; a value is None where no mask is needed)."""
    return isinstance(mask, dict) or isinstance(mask, torch.Tensor) and mask.ndim == 4


def prebuilt_mask(mask) -> torch.Tensor | None:
    """The full-attention 4-D mask of a prebuilt mask (`is_prebuilt_mask`); None when it needs none."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    return mask


def padding_mask_of_prebuilt(mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: which of the first `length` keys are real tokens, read from a 4-D mask.

    For a preallocated cache, `generate()` turns the 2-D padding mask into the model's 4-D mask before calling
    forward (5.17: when a mask is given; 5.24: always). Under left padding the last query is a real token
    and sees every real key before it, so its row is the padding mask (bool for SDPA, 0 / dtype-min for eager).
    """
    row = mask[:, 0, -1, :length]
    return row if row.dtype == torch.bool else row == 0


# --- attention ------------------------------------------------------------------------------------------
# Each model reads `config._attn_implementation` (None means eager); assigning it on a composite config sets
# every sub-config too (unchanged 5.0 → 5.24). A built model changes it with `set_attn_implementation`.
def attention_implementation(config) -> str:
    """The attention implementation a (text) config dispatches to."""
    return getattr(config, "_attn_implementation", None) or "eager"


def set_attention_implementation(config, name: str):
    """Make a config (and its sub-configs) dispatch to `name` before a model is built from it."""
    config._attn_implementation = name
    return config


# --- the attention interface ----------------------------------------------------------------------------
# `ALL_ATTENTION_FUNCTIONS` (transformers' AttentionInterface) keeps the shipped functions in a class-level
# `_global_mapping` and per-instance overrides in `_local_mapping`; item assignment writes the override and
# `del` removes it (unchanged 4.48 → 5.24). "eager" is no key of it: every model file passes its own
# `eager_attention_forward` as the default of `get_interface`.
def attention_function(name: str) -> Callable | None:
    """The function transformers dispatches `name` to now (an override if one is set), None if unknown."""
    try:
        return ALL_ATTENTION_FUNCTIONS[name]
    except KeyError:
        return None


def has_attention_override(name: str) -> bool:
    """Whether an override (not the shipped function) is registered for `name` on the shared interface."""
    return name in getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {})


def set_attention_override(name: str, fn: Callable | None) -> None:
    """Register `fn` as the override of `name`, or remove the override when `fn` is None."""
    if fn is None:
        if has_attention_override(name):
            del ALL_ATTENTION_FUNCTIONS[name]
    else:
        ALL_ATTENTION_FUNCTIONS[name] = fn


def attention_overrides() -> dict[str, Callable]:
    """A copy of the overrides now registered (for tests that check nothing is left behind)."""
    return dict(getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {}))


def model_file_function(module: torch.nn.Module, name: str) -> Callable:
    """A module-level function (`eager_attention_forward`, `apply_rotary_pos_emb`) of the model file that
    defines `module`'s class: every transformers model file has its own copy."""
    return getattr(sys.modules[type(module).__module__], name)


def eager_attention(module: torch.nn.Module) -> Callable:
    """The eager attention function of the model file `module` comes from."""
    return model_file_function(module, "eager_attention_forward")


# --- image features -------------------------------------------------------------------------------------
# `get_image_features` returns a `BaseModelOutputWithPooling` whose `pooler_output` holds the projected
# features per image (a list or a stacked tensor, 5.17 → 5.24); `generate()` pre-computes it once and passes
# it on as `mm_encoder_outputs={"image": ...}` (5.17 → 5.24).
def precomputed_image_output(call: dict):
    """The image encoder output `generate()` computed before the forward call, or None."""
    return (call.get("mm_encoder_outputs") or {}).get("image")


def projected_image_features(image_output) -> torch.Tensor:
    """(N, P, D) projected features of every image, from a `get_image_features` output."""
    pooled = image_output.pooler_output
    return pooled if isinstance(pooled, torch.Tensor) else torch.stack(list(pooled))


def qwen_window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int):
    """(window_index, cu_window_seqlens) of the Qwen2.5-VL tower: the order in which it lays out the 2 x 2 patch
    units (by attention window). A module function of `transformers.vision_utils` in 5.17 and 5.24."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=window_size, patch_size=patch_size)
