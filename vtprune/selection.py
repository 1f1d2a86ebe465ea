"""Batched tensor selection primitives shared by the pruning methods.

Every function here is pure (no model, no hooks, no state) and works on a batch: inputs carry a leading
batch dimension ``B`` and each sample is processed exactly as if it were alone (batch invariance). The
rules are the ones written in ``shared/algorithms.md``; each docstring names its section.

Conventions (algorithms.md §0.3 and the design's "selection" contract):

* **Float32 inside.** Inputs may be fp16/bf16; they are upcast to float32 before any arithmetic, because
  half-precision scores tie far too often and greedy updates lose precision. Merged hidden states are
  returned in the dtype of the ``hidden`` input.
* **Deterministic ties.** Whenever the spec says "top", "argmax" or "sort", equal values are broken by the
  **lower index first** (a stable sort on ``(-score, index)``); ``torch.topk``/``argmax`` give no such
  guarantee on every backend, so the helpers below implement the rule explicitly.
* **Raster order.** Selections are returned as indices **sorted ascending** (original raster order), the
  order every method except VisionZip/PruMerge feeds the LLM with. Greedy selectors accept ``sort=False``
  to get the pick order instead.
* **Validity masks.** Selectors accept ``valid: BoolTensor (B, N)``; invalid tokens are never selected and
  take no part in any score (they are treated as absent). If a sample has fewer valid tokens than asked
  for, the result holds all of its valid tokens followed by padding: see :class:`Picked`.
* **No host synchronisation in loops.** Greedy loops run over ``k`` (a Python int) and are vectorised over
  the batch with ``where``/``gather``/``scatter``; nothing calls ``.item()``, ``nonzero`` or
  boolean-mask indexing, and no Python branch depends on tensor values, so CUDA work is queued without
  a device-to-host sync per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.cuda_graphs import cuda_graphed

__all__ = [
    "PAD_INDEX",
    "Picked",
    "Clusters",
    "ContextualTokens",
    "MergedSelection",
    "topk_indices",
    "vispruner_select",
    "vispruner_rounds",
    "cdpruner_kernel",
    "dpp_greedy",
    "maxmin_diversity",
    "dpc_knn_cluster",
    "visionzip_merge",
    "tokencarve_information",
    "tokencarve_fuse_and_merge",
    "illava_weighted_merge",
    "numerical_rank",
    "effective_rank",
    "minmax_normalize",
]

PAD_INDEX = -1
"""Index written into the padding slots of a :class:`Picked` whose sample ran out of valid tokens.

It is deliberately not a usable index: a gather with it fails loudly instead of silently duplicating a
token. Use ``Picked.valid`` to drop those slots."""


class Picked(NamedTuple):
    """Result of a selector.

    Attributes:
        indices: ``(B, k)`` long. Per sample, the selected token indices, sorted ascending (or in pick order
            when the selector was called with ``sort=False``). Slots past the number of selected tokens
            hold :data:`PAD_INDEX`; they only occur when a sample has fewer than ``k`` valid tokens.
        valid: ``(B, k)`` bool. ``True`` where ``indices`` holds a real token; always a prefix of each row.
    """

    indices: Tensor
    valid: Tensor


class Clusters(NamedTuple):
    """Result of :func:`dpc_knn_cluster` (SparseVLM recycling, algorithms.md §2 step D).

    Attributes:
        merged: ``(B, C, D)`` mean of each cluster's members, in centre order (descending ρ·δ); dtype of x.
        assignment: ``(B, M)`` long, the cluster (0..C-1) of every input token; ``-1`` for invalid tokens.
        centers: ``(B, C)`` long, the input index of each cluster centre (:data:`PAD_INDEX` if missing).
        valid: ``(B, C)`` bool, ``False`` for clusters that do not exist because the sample had fewer valid
            tokens than ``C`` (their ``merged`` rows are zeros).
    """

    merged: Tensor
    assignment: Tensor
    centers: Tensor
    valid: Tensor


class ContextualTokens(NamedTuple):
    """Result of :func:`visionzip_merge` (algorithms.md §7).

    Attributes:
        tokens: ``(B, C, D)`` contextual tokens in target order; dtype of ``hidden``.
        targets: ``(B, C)`` long, input index of each target token (the same for every sample).
        assignment: ``(B, N)`` long, the contextual token (0..C-1) each input token contributes to
            (targets map to themselves).
    """

    tokens: Tensor
    targets: Tensor
    assignment: Tensor


class MergedSelection(NamedTuple):
    """Kept tokens plus their (partly merged) hidden states, for merge-style pruners (§10, §11).

    Attributes:
        indices: ``(B, K)`` long, kept token indices sorted ascending (raster order).
        hidden: ``(B, K, D)`` hidden states of the kept tokens in the same order, with merged tokens
            replaced by their merged value; dtype of the ``hidden`` input.
    """

    indices: Tensor
    hidden: Tensor


# ----------------------------------------------------------------------------------------------------------
# Internal helpers
# ----------------------------------------------------------------------------------------------------------


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (B, N); got {tuple(t.shape)}")


def _check_features(name: str, x: Tensor, b: int, n: int) -> None:
    if x.dim() != 3 or x.shape[0] != b or x.shape[1] != n:
        raise ValueError(f"{name} must have shape ({b}, {n}, D); got {tuple(x.shape)}")


def _check_valid(valid: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    """Return a (B, N) bool mask on ``device`` (all True when ``valid`` is None)."""
    if valid is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if valid.shape != (b, n):
        raise ValueError(f"valid must have shape ({b}, {n}); got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor; got {valid.dtype}")
    return valid.to(device)


def _check_count(name: str, k: int, n: int, low: int = 0) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int; got {type(k).__name__}")
    if not low <= k <= n:
        raise ValueError(f"{name} must be in [{low}, {n}]; got {k}")
    return k


def _rank(scores: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Full ranking of every row: valid tokens first, by descending score, ties by lower index.

    Returns ``(order (B, N) long, order_valid (B, N) bool)``; ``order_valid`` is a prefix of each row.
    NaN scores rank as ``-inf`` (below every finite score, still above invalid tokens).
    """
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    if valid is None:
        return order, torch.ones_like(order, dtype=torch.bool)
    ok = valid.gather(-1, order)
    # second stable pass: valid before invalid, score order preserved inside each group
    perm = torch.sort((~ok).to(torch.uint8), dim=-1, stable=True).indices
    return order.gather(-1, perm), ok.gather(-1, perm)


def _argmax_first(scores: Tensor) -> Tensor:
    """Argmax over the last dim with ties resolved to the lowest index (explicitly, on every backend)."""
    n = scores.shape[-1]
    best = scores.amax(dim=-1, keepdim=True)
    ar = torch.arange(n, device=scores.device)
    idx = torch.where(scores == best, ar, n).amin(dim=-1)
    # a row of NaNs would give n; clamp so a corrupt input can never index out of range
    return idx.clamp_max(n - 1)


def _finalize(idx: Tensor, ok: Tensor, sort: bool = True) -> Picked:
    """Pack per-slot indices and validity into a :class:`Picked` (sorted ascending, padding last)."""
    if not sort:
        return Picked(torch.where(ok, idx, PAD_INDEX), ok)
    sentinel = torch.iinfo(torch.long).max
    key = torch.where(ok, idx, sentinel)
    key = torch.sort(key, dim=-1).values
    ok_sorted = key != sentinel
    return Picked(torch.where(ok_sorted, key, PAD_INDEX), ok_sorted)


def _cosine_matrix(features: Tensor, dup_tol: float) -> Tensor:
    """Pairwise cosine similarity (B, N, N) in float32, exactly symmetric, clipped to [-1, 1].

    Similarities within ``dup_tol`` of 1 are snapped to exactly 1: two numerically identical tokens then
    tie bit-for-bit, so the lower-index rule decides between them instead of float rounding noise (which
    differs between CPU, CUDA and batch sizes).
    """
    x = F.normalize(features.float(), dim=-1)
    g = x @ x.transpose(-1, -2)
    g = 0.5 * (g + g.transpose(-1, -2))
    g = g.clamp(-1.0, 1.0)
    if dup_tol > 0:
        g = torch.where(g >= 1.0 - dup_tol, torch.ones_like(g), g)
    return g


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# 1. top-k
# ----------------------------------------------------------------------------------------------------------


def topk_indices(scores: Tensor, k: int, valid: Tensor | None = None) -> Picked:
    """Indices of the ``k`` highest scores per sample, returned in raster order (algorithms.md §0.3, §1).

    The ranking is a stable sort on ``(-score, index)``: equal scores go to the lower index, which makes
    FastV-style selections reproducible even when fp16 attention produces exact ties. Scores are upcast
    to float32 first; NaN ranks lowest among valid tokens.

    Args:
        scores: ``(B, N)`` scores, any float dtype.
        k: number of tokens to keep, ``0 <= k <= N``.
        valid: optional ``(B, N)`` bool mask; invalid tokens are never selected.

    Returns:
        :class:`Picked` with ``indices (B, k)`` sorted ascending and ``valid (B, k)``.
    """
    _check_2d("scores", scores)
    b, n = scores.shape
    _check_count("k", k, n)
    v = None if valid is None else _check_valid(valid, b, n, scores.device)
    order, ok = _rank(scores, v)
    return _finalize(order[:, :k], ok[:, :k])


# ----------------------------------------------------------------------------------------------------------
# 2. VisPruner
# ----------------------------------------------------------------------------------------------------------


def _residual_bounds(residual: int, diverse: int, removal_per_round: int) -> list[int]:
    """|R| before each duplicate-removal round of VisPruner, starting from ``residual`` tokens (§4)."""
    if removal_per_round < 1:
        raise ValueError(f"removal_per_round must be >= 1; got {removal_per_round}")
    sizes = []
    while residual > diverse:
        sizes.append(residual)
        residual -= min(removal_per_round, residual - diverse, (residual + 1) // 2)
    return sizes


def vispruner_rounds(residual: int, diverse: int, removal_per_round: int = 8) -> int:
    """Number of duplicate-removal rounds VisPruner needs to shrink a residual list (algorithms.md §4).

    Each round removes ``min(removal_per_round, n - diverse, ceil(n / 2))`` tokens. ``n -> n - r_step``
    is non-decreasing in ``n``, so a sample with fewer residual tokens is never behind a larger one: the
    batched code runs the rounds of the largest residual (valid masks make residuals differ) and lets
    finished samples do no-op rounds.
    """
    return len(_residual_bounds(residual, diverse, removal_per_round))


@cuda_graphed
def vispruner_select(
    cls_attn: Tensor,
    features: Tensor,
    keep: int,
    important_ratio: float = 0.5,
    removal_per_round: int = 8,
    valid: Tensor | None = None,
    *,
    dup_tol: float = 1e-6,
) -> Picked:
    """VisPruner: important tokens by [CLS] attention, then diverse tokens by duplicate removal (§4).

    Exactly algorithms.md §4, vectorised over the batch:

    1. ``T_imp = int(keep * important_ratio)``, ``T_div = keep - T_imp``.
    2. Rank tokens by ``cls_attn`` (descending, ties lower index). The first ``T_imp`` are *important*;
       the residual list ``R`` is the rest, **kept in descending-attention order**.
    3. If ``T_div > 0``, repeat while ``|R| > T_div``: ``r_step = min(removal_per_round, |R| - T_div,
       |A|)``; split ``R`` by position parity into ``A = R[0::2]``, ``B = R[1::2]``; ``m(a) =
       max_{b in B} cos(x_a, x_b)``; sort ``A`` by ``m`` descending (stable: ties keep their order in
       ``A``, so of two tied members the earlier one — higher attention, or lower index on equal
       attention — is deleted first); delete the first ``r_step`` of ``A``; new ``R`` = surviving ``A`` in
       that sorted order, then ``B`` in its previous order. The official code sizes the deletion with
       ``|R| // 2``, which breaks when ``|R|`` is odd; here the actual ``|A| = ceil(|R| / 2)`` is used.

    Ties: the official loop (Theia-4869/VisPruner ``llava/model/llava_arch.py`` @ aefa01a) sorts with
    ``argsort(descending=True)``, which leaves the order of exactly tied scores to the backend; the stable
    rule above makes the selection the same on every device and batch size.
    4. Keep ``important ∪ R`` (``keep`` tokens), returned in raster order.

    ``removal_per_round`` is the cap on tokens deleted per round (§4 uses 8; it is the seed's
    ``removal_number``). Invalid tokens (e.g. attention sinks, §20 seed 000) take part in neither the
    important nor the diverse selection. Cosines are computed once as a Gram matrix of the L2-normalised
    features (float32); values within ``dup_tol`` of 1 are snapped to 1 so duplicates tie exactly.

    Args:
        cls_attn: ``(B, N)`` head-mean [CLS]→patch attention.
        features: ``(B, N, D)`` patch features (CLIP layer 22, pre-projector).
        keep: total tokens to keep, ``0 <= keep <= N``.
        important_ratio: fraction ``r`` of ``keep`` chosen by attention.
        removal_per_round: maximum deletions per duplicate-removal round (>= 1).
        valid: optional ``(B, N)`` bool mask of candidate tokens.

    Returns:
        :class:`Picked` with ``indices (B, keep)`` in raster order.
    """
    _check_2d("cls_attn", cls_attn)
    b, n = cls_attn.shape
    _check_features("features", features, b, n)
    _check_count("keep", keep, n)
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1]; got {important_ratio}")
    if removal_per_round < 1:
        raise ValueError(f"removal_per_round must be >= 1; got {removal_per_round}")
    dev = cls_attn.device
    v = None if valid is None else _check_valid(valid, b, n, dev)

    t_imp = int(keep * important_ratio)
    t_div = keep - t_imp
    order, order_ok = _rank(cls_attn, v)
    imp, imp_ok = order[:, :t_imp], order_ok[:, :t_imp]
    if t_div == 0:
        return _finalize(imp, imp_ok)

    res = order[:, t_imp:]  # (B, L): valid residual tokens form a prefix, in descending attention
    n_res = order_ok[:, t_imp:].sum(dim=-1)  # (B,) current |R| per sample
    # |R| of the largest possible residual before each round (Python ints, no sync). Every sample's |R|
    # stays <= this bound (the update n -> n - r_step is monotone), so each round only needs that prefix.
    bounds = _residual_bounds(res.shape[1], t_div, removal_per_round)
    if bounds:
        # Gram matrix with an extra -inf column: padded B slots point there and drop out of the max
        gram = _cosine_matrix(features, dup_tol)
        gram = torch.cat([gram, gram.new_full((b, n, 1), float("-inf"))], dim=2).reshape(b, n * (n + 1))
        neg_inf = torch.full((), float("-inf"), device=dev)
        for cur in bounds:
            res = res[:, :cur]
            pos = torch.arange(cur, device=dev)
            ja, jb = pos[: (cur + 1) // 2], pos[: cur // 2]
            n_a = (n_res + 1) // 2
            n_b = n_res // 2
            r_step = torch.minimum(
                torch.minimum(n_res - t_div, n_a), torch.full_like(n_res, removal_per_round)
            )
            r_step = r_step.clamp_min(0)
            a_idx, b_idx = res[:, 0::2], res[:, 1::2]
            a_ok = ja.unsqueeze(0) < n_a.unsqueeze(1)
            b_ok = jb.unsqueeze(0) < n_b.unsqueeze(1)
            flat = (a_idx * (n + 1)).unsqueeze(2) + torch.where(b_ok, b_idx, n).unsqueeze(1)
            sim = gram.gather(1, flat.reshape(b, -1)).reshape(b, ja.numel(), jb.numel())
            m = torch.where(a_ok, sim.amax(dim=-1), neg_inf)
            perm = torch.sort(m, dim=-1, descending=True, stable=True).indices
            a_sorted = a_idx.gather(1, perm)
            # scatter survivors of A, then B, into their new positions; dead slots go to a dump column
            new_pos_a = ja.unsqueeze(0) - r_step.unsqueeze(1)
            keep_a = (ja.unsqueeze(0) >= r_step.unsqueeze(1)) & a_ok
            new_pos_b = (n_a - r_step).unsqueeze(1) + jb.unsqueeze(0)
            new_res = torch.zeros(b, cur + 1, dtype=res.dtype, device=dev)
            new_res.scatter_(1, torch.where(keep_a, new_pos_a, cur), a_sorted)
            new_res.scatter_(1, torch.where(b_ok, new_pos_b, cur), b_idx)
            # a finished sample keeps its list untouched (a no-op round must not reorder it)
            res = torch.where((r_step > 0).unsqueeze(1), new_res[:, :cur], res)
            n_res = n_res - r_step
    div = res[:, :t_div]
    div_ok = torch.arange(t_div, device=dev).unsqueeze(0) < n_res.unsqueeze(1)
    return _finalize(torch.cat([imp, div], dim=1), torch.cat([imp_ok, div_ok], dim=1))


# ----------------------------------------------------------------------------------------------------------
# 3. CDPruner: conditional DPP
# ----------------------------------------------------------------------------------------------------------


def cdpruner_kernel(
    similarity_features: Tensor,
    relevance: Tensor,
    valid: Tensor | None = None,
    *,
    eps: float = 1e-6,
) -> Tensor:
    """CDPruner's conditional DPP kernel ``L = diag(ρ̃) · S · diag(ρ̃)`` (algorithms.md §5).

    ``S`` is the cosine similarity of ``similarity_features`` (projected features), ``ρ̃`` the min–max
    normalised relevance ``(ρ - min ρ + eps) / (max ρ - min ρ)``. **Min and max are taken per sample**
    (over that sample's valid tokens), not over the whole batch tensor as the official code does — the
    two agree at batch size 1, and only the per-sample version keeps samples independent. A sample whose
    relevance is constant gets ``ρ̃ = 1`` everywhere (pure diversity) instead of a division by zero.
    The sign convention of ρ (CDPruner negates the CLIP cosine) is the caller's business.

    Args:
        similarity_features: ``(B, N, D)`` features defining S (float32 inside).
        relevance: ``(B, N)`` raw relevance ρ.
        valid: optional ``(B, N)`` mask restricting the min/max to valid tokens.
        eps: the additive constant of the official normalisation.

    Returns:
        ``(B, N, N)`` float32 kernel, exactly symmetric.
    """
    _check_2d("relevance", relevance)
    b, n = relevance.shape
    _check_features("similarity_features", similarity_features, b, n)
    v = _check_valid(valid, b, n, relevance.device)
    rel = relevance.float()
    lo = torch.where(v, rel, float("inf")).amin(dim=-1, keepdim=True)
    hi = torch.where(v, rel, float("-inf")).amax(dim=-1, keepdim=True)
    span = hi - lo
    flat = ~(span > 0)  # constant relevance (or no valid token): no ranking information
    rho = torch.where(flat, torch.ones_like(rel), (rel - lo + eps) / torch.where(flat, 1.0, span))
    s = _cosine_matrix(similarity_features, dup_tol=0.0)
    # (ρ_i ρ_j) S_ij: the outer product is symmetric bit-for-bit, so L is exactly symmetric
    return (rho.unsqueeze(-1) * rho.unsqueeze(-2)) * s


@cuda_graphed
def dpp_greedy(
    kernel: Tensor,
    k: int,
    valid: Tensor | None = None,
    *,
    sort: bool = True,
    exhaustion_tol: float = 1e-5,
) -> Picked:
    """Greedy MAP inference of a DPP with the fast Cholesky update of Chen et al. 2018 (algorithms.md §5).

    Per sample: ``d² ← diag(L)``; for ``i = 1..k``: ``j = argmax d²`` over available tokens (ties: lower
    index); ``e = (L[j, :] - Σ_{t<i} c_t[j] · c_t) / sqrt(d²_j)``; ``c_i = e``; ``d² ← d² - e²``; ``j``
    becomes unavailable. Cost O(N·k²) after the kernel; the loop is over ``k`` only, batched.

    Numerical guard (a documented deviation for degenerate kernels): a candidate whose residual has
    fallen to ``d²_i <= exhaustion_tol · L_ii`` lies, to float32 precision, in the span of the tokens
    already chosen (e.g. an exact duplicate, or ``k`` above the kernel's rank). Such candidates all score
    exactly 0, so they are picked after every non-exhausted candidate, by lower index, and picking one
    adds no update (a literal implementation would divide by ~0 there and spread NaN/inf). On a
    kernel of full rank with distinct tokens this guard never fires and the result is the plain greedy.

    Args:
        kernel: ``(B, N, N)`` symmetric PSD kernel (e.g. :func:`cdpruner_kernel`).
        k: tokens to select, ``0 <= k <= N``.
        valid: optional ``(B, N)`` mask of candidate tokens.
        sort: return indices in raster order (default) instead of pick order.
        exhaustion_tol: relative residual below which a candidate counts as exhausted.

    Returns:
        :class:`Picked` with ``indices (B, k)``.
    """
    if kernel.dim() != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel must have shape (B, N, N); got {tuple(kernel.shape)}")
    b, n, _ = kernel.shape
    _check_count("k", k, n)
    dev = kernel.device
    avail = _check_valid(valid, b, n, dev).clone()
    lk = kernel.float()
    diag = lk.diagonal(dim1=-2, dim2=-1).clone()
    d2 = diag.clone()
    cs = torch.zeros(b, k, n, dtype=torch.float32, device=dev)
    picks = torch.zeros(b, k, dtype=torch.long, device=dev)
    picked_ok = torch.zeros(b, k, dtype=torch.bool, device=dev)
    ar = torch.arange(b, device=dev)
    cols = torch.arange(n, device=dev)
    neg_inf = torch.full((), float("-inf"), device=dev)
    zero = torch.zeros((), device=dev)
    for i in range(k):
        exhausted = d2 <= exhaustion_tol * diag
        score = torch.where(avail, torch.where(exhausted, zero, d2), neg_inf)
        j = _argmax_first(score)
        ok = avail[ar, j]
        live = ok & ~exhausted[ar, j]
        row = lk[ar, j]  # (B, N)
        if i:
            row = row - torch.bmm(cs[ar, :i, j].unsqueeze(1), cs[:, :i]).squeeze(1)
        e = row / torch.sqrt(d2[ar, j].clamp_min(torch.finfo(torch.float32).tiny)).unsqueeze(-1)
        e = torch.where(live.unsqueeze(-1), e, zero)
        cs[:, i] = e
        d2 = d2 - e * e
        # elementwise, not `avail[ar, j] = False`: an index_put with a host scalar syncs on CUDA
        avail = avail & (cols != j.unsqueeze(1))
        picks[:, i] = j
        picked_ok[:, i] = ok
    return _finalize(picks, picked_ok, sort=sort)


# ----------------------------------------------------------------------------------------------------------
# 4. DivPrune: max–min diversity
# ----------------------------------------------------------------------------------------------------------


@cuda_graphed
def maxmin_diversity(
    features: Tensor,
    k: int,
    valid: Tensor | None = None,
    *,
    sort: bool = True,
    dup_tol: float = 1e-6,
) -> Picked:
    """DivPrune's greedy max–min diversity selection with cosine distance (algorithms.md §6).

    ``D = 1 - cos(F_i, F_j)``. First pick: the token whose distance to its nearest *other* (valid) token
    is largest. Then, ``k - 1`` times: the available token whose minimum distance to the selected set is
    largest. The minimum distances are kept in a running vector updated with one column of ``D`` per
    step (O(N·k) after the O(N²·D) Gram matrix). Ties go to the lower index.

    Two deliberate clarifications of the official code: selected tokens are excluded explicitly (the
    official relies on their zero self-distance, so once only duplicates remain it can re-pick a token),
    and distances within ``dup_tol`` of 0 are snapped to exactly 0 so that numerical duplicates tie
    exactly and the lower-index rule, not rounding noise, decides between them. Invalid tokens are
    treated as absent, also as "nearest other" candidates for the first pick.

    Args:
        features: ``(B, N, D)`` features (projected visual tokens for DivPrune).
        k: tokens to select, ``0 <= k <= N``.
        valid: optional ``(B, N)`` mask of candidate tokens.
        sort: return indices in raster order (default) instead of pick order.
        dup_tol: cosine distances ``<= dup_tol`` count as 0.

    Returns:
        :class:`Picked` with ``indices (B, k)``.
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape (B, N, D); got {tuple(features.shape)}")
    b, n, _ = features.shape
    _check_count("k", k, n)
    dev = features.device
    avail = _check_valid(valid, b, n, dev).clone()
    picks = torch.zeros(b, k, dtype=torch.long, device=dev)
    picked_ok = torch.zeros(b, k, dtype=torch.bool, device=dev)
    if k == 0:
        return _finalize(picks, picked_ok, sort=sort)
    dist = (1.0 - _cosine_matrix(features, dup_tol)).clamp_min(0.0)
    ar = torch.arange(b, device=dev)
    cols = torch.arange(n, device=dev)
    inf = torch.full((), float("inf"), device=dev)
    neg_inf = torch.full((), float("-inf"), device=dev)
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    others = torch.where(eye.unsqueeze(0) | ~avail.unsqueeze(1), inf, dist)
    score = torch.where(avail, others.amin(dim=-1), neg_inf)
    run_min = torch.full((b, n), float("inf"), device=dev)
    for i in range(k):
        if i:
            score = torch.where(avail, run_min, neg_inf)
        j = _argmax_first(score)
        picks[:, i] = j
        picked_ok[:, i] = avail[ar, j]
        avail = avail & (cols != j.unsqueeze(1))
        run_min = torch.minimum(run_min, dist[ar, :, j])
    return _finalize(picks, picked_ok, sort=sort)


# ----------------------------------------------------------------------------------------------------------
# 5. SparseVLM recycling: DPC-kNN clustering
# ----------------------------------------------------------------------------------------------------------


def dpc_knn_cluster(
    x: Tensor,
    num_clusters: int,
    k_neighbors: int,
    valid: Tensor | None = None,
    *,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> Clusters:
    """Density-peak clustering with k-NN density, as SparseVLM recycles deleted tokens (§2 step D).

    Per sample (valid tokens only):

    * ``dist_ij = ||x_i - x_j||₂ / sqrt(D)`` (computed by direct differences, so self-distances and
      duplicate distances are exactly 0; the official ``torch.cdist`` default uses a matmul expansion);
    * density ``ρ_i = exp(-mean of the squared distances to its k nearest neighbours, self included)``
      (``k = min(k_neighbors, #valid)``); SparseVLM passes ``k_neighbors = num_clusters``;
    * ``δ_i`` = distance to the nearest token of higher density, or the sample's maximum pairwise
      distance if there is none. "Higher" is the strict order on ``(ρ, -index)``: equal densities are
      ordered by the lower index (see below);
    * centres = top ``num_clusters`` by ``ρ·δ`` (descending, ties lower index) — this is the centre order;
    * every token joins its nearest centre (ties: earlier centre); a centre always joins its own cluster;
    * each cluster's token is the **mean** of its members (the code averages; the paper writes a sum).

    Density ties are common (two mutual nearest neighbours with ``k = 2`` have exactly the same ρ) and,
    left unbroken, would make both tokens peaks with ``δ = max`` and put two centres in one cluster. The
    official code breaks them by adding ``1e-6 · U(0, 1)`` to ρ, which makes results irreproducible; here
    that jitter is **off by default** (``jitter=0``) and ties are broken deterministically instead, as if
    the lower-index token had an infinitesimally higher density. Pass ``jitter=1e-6`` and a seeded
    ``generator`` (on x's device) to mimic the official random tie-breaking.

    Args:
        x: ``(B, M, D)`` tokens to cluster (the recycled hidden states).
        num_clusters: ``C``, ``1 <= C <= M``.
        k_neighbors: neighbours used for the density, ``>= 1`` (clipped to ``M``).
        valid: optional ``(B, M)`` mask; invalid tokens are ignored and get assignment ``-1``.
        jitter: amplitude of the uniform density jitter (0 = off).
        generator: RNG for the jitter.

    Returns:
        :class:`Clusters`.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, M, D); got {tuple(x.shape)}")
    b, m, d = x.shape
    _check_count("num_clusters", num_clusters, m, low=1)
    if k_neighbors < 1:
        raise ValueError(f"k_neighbors must be >= 1; got {k_neighbors}")
    dev = x.device
    v = _check_valid(valid, b, m, dev)
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)
    dist = 0.5 * (dist + dist.transpose(-1, -2))
    inf = torch.full((), float("inf"), device=dev)

    knn = min(k_neighbors, m)
    near = torch.where(v.unsqueeze(1), dist, inf).topk(knn, dim=-1, largest=False).values
    finite = torch.isfinite(near)
    sq = torch.where(finite, near * near, 0.0).sum(dim=-1) / finite.sum(dim=-1).clamp_min(1)
    density = torch.exp(-sq)
    if jitter > 0:
        density = density + jitter * torch.rand(density.shape, generator=generator, device=dev)

    pair_ok = v.unsqueeze(1) & v.unsqueeze(2)
    dist_max = torch.where(pair_ok, dist, 0.0).flatten(1).amax(dim=-1)
    # "higher density" is a strict total order: ties in ρ go to the lower index (see docstring)
    rho_j, rho_i = density.unsqueeze(1), density.unsqueeze(2)
    ar = torch.arange(m, device=dev)
    lower_index = ar.view(1, 1, m) < ar.view(1, m, 1)
    higher = ((rho_j > rho_i) | ((rho_j == rho_i) & lower_index)) & v.unsqueeze(1)
    delta = torch.where(higher, dist, dist_max[:, None, None]).amin(dim=-1)
    order, order_ok = _rank(density * delta, v)
    centers, c_ok = order[:, :num_clusters], order_ok[:, :num_clusters]

    to_centre = dist.gather(1, centers.unsqueeze(-1).expand(-1, -1, m))  # (B, C, M)
    to_centre = torch.where(c_ok.unsqueeze(-1), to_centre, inf)
    assign = _argmax_first(-to_centre.transpose(1, 2))  # nearest centre, earlier centre on ties
    cid = torch.arange(num_clusters, device=dev).expand(b, -1)
    assign = assign.scatter(1, centers, cid)
    assign = torch.where(v, assign, -1)

    onehot = (assign.unsqueeze(1) == cid.unsqueeze(-1)).float()  # (B, C, M); deterministic bmm, no atomics
    merged = (onehot @ xf) / onehot.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return Clusters(merged.to(x.dtype), assign, torch.where(c_ok, centers, PAD_INDEX), c_ok)


# ----------------------------------------------------------------------------------------------------------
# 6. VisionZip contextual merge
# ----------------------------------------------------------------------------------------------------------


def visionzip_merge(hidden: Tensor, keys: Tensor, num_contextual: int) -> ContextualTokens:
    """VisionZip's contextual tokens (algorithms.md §7).

    ``hidden``/``keys`` are the tokens left after the dominant selection, in original order. Targets are
    every ``step``-th of them, ``step = max(1, N // C)``, first ``C``. Each non-target token is assigned
    to the target whose L2-normalised key is most similar (argmax cosine, ties to the earlier target).
    Contextual token = target hidden state + **mean** of the hidden states assigned to it (count clamped
    to >= 1, so a target with no members stays itself). Output is in target order.

    Args:
        hidden: ``(B, N, D)`` hidden states of the remaining tokens (layer 22).
        keys: ``(B, N, Dk)`` their head-averaged keys (layer 22).
        num_contextual: ``C``, ``0 <= C <= N``.

    Returns:
        :class:`ContextualTokens`.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, N, D); got {tuple(hidden.shape)}")
    b, n, _ = hidden.shape
    _check_features("keys", keys, b, n)
    c = _check_count("num_contextual", num_contextual, n)
    dev = hidden.device
    hf = hidden.float()
    step = max(1, n // c) if c else 1
    pos = torch.arange(n, device=dev)
    targets = pos[0::step][:c]
    # target t sits at position t * step; built arithmetically so no index_put is needed
    is_target = (pos % step == 0) & (pos < step * c)
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn @ kn[:, targets].transpose(1, 2)  # (B, N, C)
    assign = _argmax_first(sim) if c else torch.zeros(b, n, dtype=torch.long, device=dev)
    assign = torch.where(is_target, pos // step, assign)
    cid = torch.arange(c, device=dev)
    member = (assign.unsqueeze(1) == cid[None, :, None]) & ~is_target[None, None, :]  # (B, C, N)
    member = member.float()
    agg = (member @ hf) / member.sum(dim=-1, keepdim=True).clamp_min(1.0)
    tokens = hf[:, targets] + agg
    return ContextualTokens(tokens.to(hidden.dtype), targets.expand(b, -1), assign)


# ----------------------------------------------------------------------------------------------------------
# 7. TokenCarve
# ----------------------------------------------------------------------------------------------------------


def _borda_points(scores: Tensor) -> Tensor:
    """``N - rank`` per token (rank 0 = highest score, ties lower index first), as float32."""
    b, n = scores.shape
    order, _ = _rank(scores)
    pts = torch.arange(n, 0, -1, device=scores.device, dtype=torch.float32).expand(b, -1)
    return torch.empty(b, n, device=scores.device).scatter_(1, order, pts)


def tokencarve_information(hidden: Tensor) -> Tensor:
    """TokenCarve's information-contribution score (algorithms.md §10 step 2), ``(B, N, D) -> (B, N)``.

    ``sv_i = Σ_k |(U·S)_ik|`` for the thin SVD ``H = U S Vᵀ`` of each sample's rows, computed in float32
    to the accuracy of an fp32 SVD of ``H`` (the official code runs ``torch.linalg.svd`` on the fp32 layer
    outputs: ShawnTan86/TokenCarve ``TokenCarve/modeling_llama.py`` @ a57bd59).

    Not through the Gram matrix: an eigendecomposition of ``H·Hᵀ`` squares the condition number, and LLM
    hidden states have massive-activation rows whose norm dwarfs the others, so in fp32 the small singular
    directions drown (≈5–13 % error on the score and a different kept set). When ``N < D`` the rows are
    first reduced by a QR factorisation ``Hᵀ = Q R``: ``H = Rᵀ Qᵀ`` with orthonormal ``Q``, so ``Rᵀ``
    (``N × N``) has the same ``U`` and ``S`` as ``H``, and both Householder QR and the SVD are backward
    stable — the accuracy of a direct SVD at the cost of a QR plus an ``N × N`` SVD. Signs of singular
    vectors do not matter (absolute values).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, N, D); got {tuple(hidden.shape)}")
    h = hidden.float()
    if h.shape[-2] < h.shape[-1]:
        h = torch.linalg.qr(h.mT, mode="r").R.mT
    u, s, _ = torch.linalg.svd(h, full_matrices=False)
    return (u * s.unsqueeze(-2)).abs().sum(dim=-1)


def tokencarve_fuse_and_merge(
    attn_scores: Tensor,
    hidden: Tensor,
    keep: int,
    weight: float = 0.5,
) -> MergedSelection:
    """TokenCarve: Borda fusion of attention and SVD information scores, then similarity merge (§10).

    1. AV = ``attn_scores`` (last-token head-mean attention of layer 1).
    2. SV = :func:`tokencarve_information` of the image rows ``H``: row-wise L1 norm of ``U·S`` of the
       thin SVD ``H = U S Vᵀ`` (float32). (Its L2 version would be ``||h_i||₂`` exactly, §15.)
    3. Borda: rank ρ by AV and ρ' by SV (0-based, descending, ties lower index) give
       ``(N - ρ)·w + (N - ρ')·(1 - w)``; keep the top ``N1 = min(N, floor(1.5·keep))`` by that fused score.
    4. GSM merge: order the ``N1`` tokens by fused score; ``A`` = first ``floor(N1/2)``, ``B`` = the rest;
       each ``B`` token's best ``A`` match by cosine of ``H`` (ties: earlier in A); the ``M`` ``B`` tokens with
       the highest best-match similarity (ties: earlier in B) are merged into their partner by mean
       (partner ← mean of itself and every B merged into it); other ``B`` tokens are kept. ``M = N1 - keep``,
       which equals §10's ``min(|A|, floor(keep/2))`` whenever ``N1 = floor(1.5·keep)`` and makes the final
       count exactly ``keep`` when ``N1`` is clipped to ``N``.
    5. Output in raster order with the merged hidden states (mean computed in float32 by a one-hot bmm,
       so it is deterministic on CUDA too).

    This is the one primitive here with a host sync on CUDA: the SVD checks convergence. It happens once
    per call, not per token.

    Args:
        attn_scores: ``(B, N)`` AV score.
        hidden: ``(B, N, D)`` layer-1 output hidden states of the image tokens.
        keep: final token count, ``1 <= keep <= N``.
        weight: AV weight ``w`` of the Borda fusion (SV gets ``1 - w``).

    Returns:
        :class:`MergedSelection` with ``keep`` tokens.
    """
    _check_2d("attn_scores", attn_scores)
    b, n = attn_scores.shape
    _check_features("hidden", hidden, b, n)
    _check_count("keep", keep, n, low=1)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1]; got {weight}")
    h = hidden.float()
    sv = tokencarve_information(h)
    fused = _borda_points(attn_scores) * weight + _borda_points(sv) * (1.0 - weight)
    n1 = min(n, (3 * keep) // 2)
    forder, _ = _rank(fused)
    forder = forder[:, :n1]
    na = n1 // 2
    nm = n1 - keep
    if nm > na:  # cannot happen for keep >= 1 (see docstring); guards future edits
        raise AssertionError(f"TokenCarve merge count {nm} exceeds |A| = {na}")
    a_idx, b_idx = forder[:, :na], forder[:, na:]
    h_a, h_b = _gather_rows(h, a_idx), _gather_rows(h, b_idx)
    if nm == 0:
        idx, hid = forder, _gather_rows(h, forder)
    else:
        nb = n1 - na
        cos = F.normalize(h_b, dim=-1) @ F.normalize(h_a, dim=-1).transpose(1, 2)  # (B, nb, na)
        best_sim = cos.amax(dim=-1)
        partner = _argmax_first(cos)
        border, _ = _rank(best_sim)
        merged = torch.zeros(b, nb, dtype=torch.bool, device=h.device).scatter_(1, border[:, :nm], True)
        w = (partner.unsqueeze(1) == torch.arange(na, device=h.device)[None, :, None]) & merged.unsqueeze(1)
        w = w.float()  # (B, na, nb)
        h_a = (h_a + w @ h_b) / (1.0 + w.sum(dim=-1, keepdim=True))
        survivors = torch.sort(merged.to(torch.uint8), dim=-1, stable=True).indices[:, : nb - nm]
        idx = torch.cat([a_idx, b_idx.gather(1, survivors)], dim=1)
        hid = torch.cat([h_a, _gather_rows(h_b, survivors)], dim=1)
    raster = torch.sort(idx, dim=-1).indices
    return MergedSelection(idx.gather(1, raster), _gather_rows(hid, raster).to(hidden.dtype))


# ----------------------------------------------------------------------------------------------------------
# 8. iLLaVA (LLM stage)
# ----------------------------------------------------------------------------------------------------------


def illava_weighted_merge(scores: Tensor, hidden: Tensor, num_remove: int) -> MergedSelection:
    """iLLaVA's LLM-stage rule: drop the ``r`` lowest-scoring tokens, folding them into a survivor (§11).

    Rank tokens by score (descending, ties lower index). The last ``r + 1`` of that ranking — the lowest-
    scoring kept token followed by the ``r`` tokens to remove, in decreasing score — are averaged with
    weights ``1, 2, …, r + 1`` (the *least* important token weighs most, as the official code does),
    normalised by their sum, and the result replaces the surviving token. The ``r`` tokens are dropped;
    the ``N - r`` kept tokens are returned in raster order. ``r = round(N · (1 - keep_fraction))`` is the
    caller's job.

    Args:
        scores: ``(B, N)`` importance (last-token attention of the previous layer, head mean).
        hidden: ``(B, N, D)`` hidden states of the image tokens.
        num_remove: ``r``, ``0 <= r <= N - 1``.

    Returns:
        :class:`MergedSelection` with ``N - r`` tokens.
    """
    _check_2d("scores", scores)
    b, n = scores.shape
    _check_features("hidden", hidden, b, n)
    r = _check_count("num_remove", num_remove, n - 1)
    h = hidden.float()
    order, _ = _rank(scores)
    tail = order[:, n - r - 1 :]  # survivor first, then the removed tokens by decreasing score
    w = torch.arange(1, r + 2, device=h.device, dtype=torch.float32)
    merged = torch.einsum("t,btd->bd", w, _gather_rows(h, tail)) / w.sum()
    kept = order[:, : n - r]
    hid = _gather_rows(h, kept)
    hid[:, n - r - 1] = merged
    raster = torch.sort(kept, dim=-1).indices
    return MergedSelection(kept.gather(1, raster), _gather_rows(hid, raster).to(hidden.dtype))


# ----------------------------------------------------------------------------------------------------------
# 9. ranks, 10. normalisation (analysis helpers)
# ----------------------------------------------------------------------------------------------------------


def numerical_rank(matrix: Tensor, rel_threshold: float | None = 1e-3) -> Tensor:
    """Numerical rank ``#{i : σ_i > τ · σ_max}`` of each matrix in a batch (algorithms.md §15).

    Singular values come from a float64 SVD so the count reflects the matrix, not fp32 rounding.
    ``rel_threshold=None`` reproduces the ``torch.linalg.matrix_rank`` default SparseVLM v1 relied on for
    a float32 matrix: ``τ = max(m, n) · eps(float32)``. A zero (or empty) matrix has rank 0.

    Args:
        matrix: ``(..., m, n)``.
        rel_threshold: τ, relative to the largest singular value.

    Returns:
        ``(...)`` long tensor.
    """
    if matrix.dim() < 2:
        raise ValueError(f"matrix must have at least 2 dims; got {tuple(matrix.shape)}")
    m, n = matrix.shape[-2:]
    tau = max(m, n) * torch.finfo(torch.float32).eps if rel_threshold is None else float(rel_threshold)
    s = torch.linalg.svdvals(matrix.to(torch.float64))
    return (s > tau * s[..., :1]).sum(dim=-1)


def effective_rank(matrix: Tensor) -> Tensor:
    """Effective rank ``exp(-Σ p_i log p_i)`` with ``p = σ / Σσ`` (Roy & Vetterli; algorithms.md §15).

    Computed in float64; zero singular values contribute nothing; a zero matrix has effective rank 0.

    Args:
        matrix: ``(..., m, n)``.

    Returns:
        ``(...)`` float64 tensor.
    """
    if matrix.dim() < 2:
        raise ValueError(f"matrix must have at least 2 dims; got {tuple(matrix.shape)}")
    s = torch.linalg.svdvals(matrix.to(torch.float64))
    total = s.sum(dim=-1, keepdim=True)
    p = s / torch.where(total > 0, total, 1.0)
    ent = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(ent), 0.0)


def minmax_normalize(values: Tensor | Sequence[float], dim: int | None = None) -> Tensor:
    """Min–max normalise to [0, 1]: ``(v - min) / (max - min)``; a constant series maps to zeros.

    Used by the rank-analysis plots of seed 001 (algorithms.md §20), where a flat curve (e.g. a rank that
    never changes) must not become a division by zero.

    Args:
        values: a tensor, or a sequence of numbers (converted to float64).
        dim: normalise each slice along ``dim``; ``None`` normalises over all elements.

    Returns:
        Tensor of the same shape; float dtype of the input (float32 for integer tensors).
    """
    t = torch.as_tensor(values, dtype=torch.float64) if not isinstance(values, Tensor) else values
    if not t.is_floating_point():
        t = t.float()
    if t.numel() == 0:
        return t.clone()
    if dim is None:
        lo, hi = t.amin(), t.amax()
    else:
        lo, hi = t.amin(dim=dim, keepdim=True), t.amax(dim=dim, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (t - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(t))
