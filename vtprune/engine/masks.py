"""Attention masks for a sequence with padding and holes, in the form each attention implementation expects."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_allowed(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, q, k) bool: query i (the last q of k positions) may see key j <= its own position."""
    k_len = key_valid.shape[1]
    q_pos = torch.arange(k_len - q_len, k_len, device=key_valid.device)
    k_pos = torch.arange(k_len, device=key_valid.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]
    # Padding or hole rows see nothing; let them see themselves so no softmax row is empty (no NaN).
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]


def format_mask(
    key_valid: torch.Tensor,
    q_len: int,
    implementation: str,
    dtype: torch.dtype,
    all_valid: bool | None = None,
    key_length: int | None = None,
):
    """An attention mask in the form the model's attention implementation expects (None when not needed).

    `all_valid` (no padding, no holes), when the caller already knows it, saves a device-to-host sync.
    `key_length`: the number of keys attention sees when the layer's cache is preallocated (a static cache
    returns its whole buffer); the slots after the layer's own tokens are masked out.
    """
    unused_slots = 0 if key_length is None else key_length - key_valid.shape[1]
    if all_valid is None:
        all_valid = bool(key_valid.all())
    if implementation.startswith("flash"):
        if unused_slots > 0:
            return F.pad(key_valid, (0, unused_slots), value=False).long()
        return None if all_valid else key_valid.long()
    if implementation == "sdpa" and all_valid and not unused_slots and q_len in (1, key_valid.shape[1]):
        return None  # SDPA's own causal path: no mask to build, and the fast kernels stay eligible
    allowed = causal_allowed(key_valid, q_len)
    if unused_slots > 0:
        allowed = F.pad(allowed, (0, unused_slots), value=False)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def static_step_mask(
    key_valid: torch.Tensor,
    held: torch.Tensor,
    q_len: int,
    key_length: int,
    implementation: str,
    dtype: torch.dtype,
):
    """The mask of one decode step over a preallocated cache of `key_length` slots, in a fixed shape.

    `key_valid` (B, L): the prefill's real tokens in the first L slots; `held` (0-d tensor): tokens the layer
    holds before this step, so the step's queries sit in slots held .. held + q_len - 1. Every token written
    after the prefill is real. Nothing here depends on a Python integer that changes between steps.
    """
    slots = torch.arange(key_length, device=key_valid.device)
    valid = F.pad(key_valid, (0, key_length - key_valid.shape[1]), value=True)
    query_slots = held + torch.arange(q_len, device=key_valid.device)
    if implementation.startswith("flash"):
        return (valid & (slots < held + q_len)).long()
    allowed = valid[:, None, None, :] & (slots[None, :] <= query_slots[:, None])[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
