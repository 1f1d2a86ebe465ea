"""Attention rows without eager attention.

Methods need, at one layer, softmax attention probabilities from a few query rows to the visual keys.
SDPA and FlashAttention never materialise them, so vtprune reads the layer's own post-RoPE query and key
states while the layer runs and computes only the rows it needs.

The reading happens in a thin wrapper around the attention function transformers dispatches to
(`ALL_ATTENTION_FUNCTIONS`, the AttentionInterface). The model's `_attn_implementation` is never changed,
so its masks are built exactly as before (registering a *new* name in the interface would make transformers
silently drop the padding mask). The wrapper is installed while at least one model is pruned, acts only on the attention
modules a pruning session registered, and is removed with the last session.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vtprune import compat

CaptureFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float], None]

# id(attention module) -> callback(module, query, key, scaling). Filled by pruning sessions.
_CAPTURES: dict[int, CaptureFn] = {}
_WITH_VALUE: set[int] = set()  # modules whose callback also takes the value states (a 5th argument)
_SAVED: dict[str, Callable | None] = {}  # implementation name -> previous override (None: there was none)
_ORIGINAL: dict[str, Callable | None] = {}  # implementation name -> what it dispatched to before the wrapper
_WRAPPED_NAMES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _make_wrapper(impl_name: str) -> Callable:
    def vtprune_attention(module, query, key, value, attention_mask, *args, **kwargs):
        capture = _CAPTURES.get(id(module))
        if capture is not None:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            if id(module) in _WITH_VALUE:
                capture(module, query, key, scaling, value)
            else:
                capture(module, query, key, scaling)
        original = _ORIGINAL.get(impl_name) or compat.eager_attention(module)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    vtprune_attention.__name__ = f"vtprune_{impl_name}"
    return vtprune_attention


def add_capture(module: torch.nn.Module, fn: Callable, with_value: bool = False) -> None:
    """Call `fn(module, query, key, scaling)` (with `value` as a 5th argument when `with_value`) each time the
    module's attention runs."""
    if not _CAPTURES and not _SAVED:
        _install()
    _CAPTURES[id(module)] = fn
    if with_value:
        _WITH_VALUE.add(id(module))
    else:
        _WITH_VALUE.discard(id(module))


def remove_capture(module: torch.nn.Module) -> None:
    _CAPTURES.pop(id(module), None)
    _WITH_VALUE.discard(id(module))


def _install() -> None:
    for name in _WRAPPED_NAMES:
        current = compat.attention_function(name)
        if current is None and name != "eager":
            continue  # not available in this transformers release
        _SAVED[name] = current if compat.has_attention_override(name) else None
        _ORIGINAL[name] = current
        compat.set_attention_override(name, _make_wrapper(name))


def release_if_unused(active_sessions: int) -> None:
    """Restore the attention interface exactly as it was once no session is left."""
    if active_sessions or not _SAVED:
        return
    for name, previous in _SAVED.items():
        compat.set_attention_override(name, previous)
    _SAVED.clear()
    _ORIGINAL.clear()
    _CAPTURES.clear()
    _WITH_VALUE.clear()


# Float32 logits one step of `received_attention` holds at most (64 MiB): whole heads of every image at a time.
RECEIVED_CHUNK_ELEMENTS = 1 << 24


_BF16_GEMM = [True]  # False once bmm(..., out_dtype=float32) failed in this process


def _scaled_logits(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """(N, L, dh) x (N, L, dh) -> (N, L, L) float32 q k^T * scaling.

    bf16 q/k on CUDA with a power-of-two scaling (CLIP's dh^-0.5 for dh = 64): one bf16 matmul with float32
    output. The products of bf16 numbers are exact in float32 and the sum is float32, and scaling a bf16 by a
    power of two is exact, so this is the float32 matmul of the upcast q/k up to the order of the sum, at
    tensor-core speed. Otherwise: float32 inputs, the scaling applied in the matmul (beta=0: the first
    argument is never read)."""
    exact_scale = scaling > 0 and math.frexp(scaling)[0] == 0.5
    if _BF16_GEMM[0] and q.is_cuda and q.dtype == k.dtype == torch.bfloat16 and exact_scale:
        try:
            return torch.bmm(q * scaling, k.transpose(-1, -2), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without float32 output for bf16
            _BF16_GEMM[0] = False
    q, k = q.float(), k.float()
    return torch.baddbmm(q.new_empty(1, 1, 1), q, k.transpose(-1, -2), beta=0.0, alpha=scaling)


def received_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, chunk_elements: int = RECEIVED_CHUNK_ELEMENTS
) -> torch.Tensor:
    """(B, L) attention each token receives, without masks: softmax(q k^T * scaling) over every key per query
    row, then the mean over heads and over every query row, in float32.

    query: (B, H, L, dh); key: (B, Hkv, L, dh) (GQA heads are repeated). Computed a few whole heads at a time
    (at most `chunk_elements` logits): one scaled batched matmul (`_scaled_logits`: bf16 tensor cores with
    float32 output where that is exact), a softmax and a column sum per step, so the (B, H, L, L)
    probabilities are never held at once and are read back only once. Equal to `attention_rows` over every
    row followed by the two means, up to float rounding (the sum over heads and rows is taken in one
    reduction, then divided by H * L).
    """
    b, h, length, dh = query.shape
    group = h // key.shape[1]
    step = max(1, min(h, chunk_elements // max(1, b * length * length)))
    total = None
    for first in range(0, h, step):
        last = min(h, first + step)
        q = query[:, first:last].reshape(-1, length, dh)
        if group == 1:
            k = key[:, first:last]
        else:
            k = key[:, first // group : (last - 1) // group + 1].repeat_interleave(group, dim=1)
            k = k[:, first % group : first % group + last - first]
        logits = _scaled_logits(q, k.reshape(-1, length, dh), scaling)
        probs = torch.softmax(logits, dim=-1)
        del logits
        part = probs.view(b, last - first, length, length).sum(dim=(1, 2))
        del probs
        total = part if total is None else total.add_(part)
    return total.div_(h * length)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    query_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention probabilities of selected query rows over all keys, in float32.

    query: (B, H, L, dh) post-RoPE; key: (B, Hkv, L, dh) post-RoPE (GQA heads are repeated);
    query_index: (B, Q) sequence positions of the wanted rows; key_valid: (B, L) padding mask.
    Returns (B, H, Q, L). The softmax runs over every key the query could see (causal + padding), never
    renormalised over a subset, as the official code does: the non-visual keys (the BOS and
    system-prompt sinks) keep their share.
    """
    b, h, _, dh = query.shape
    q_rows = torch.gather(query, 2, query_index[:, None, :, None].expand(b, h, -1, dh))
    return attention_of_rows(q_rows, key, scaling, query_index, key_valid, causal)


def attention_of_rows(
    q_rows: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    query_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    causal: bool = True,
) -> torch.Tensor:
    """`attention_rows` from the query rows alone: q_rows (B, H, Q, dh) are the post-RoPE queries at the
    sequence positions `query_index` (B, Q), for a caller that projected only those rows."""
    b, h, _, _ = q_rows.shape
    length = key.shape[2]
    device = q_rows.device
    q_rows = q_rows.float()
    k = key.float()
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = torch.matmul(q_rows, k.transpose(-1, -2)) * scaling  # (B, H, Q, L)
    if not causal and key_valid is None:  # every key is allowed: no mask to build
        return torch.softmax(logits, dim=-1)
    allowed = torch.ones(b, query_index.shape[1], length, dtype=torch.bool, device=device)
    if causal:
        positions = torch.arange(length, device=device)
        allowed = positions[None, None, :] <= query_index[:, :, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    # A padded query row sees no valid key; let it see itself so the softmax stays finite.
    allowed = allowed | (torch.arange(length, device=device)[None, None, :] == query_index[:, :, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)
