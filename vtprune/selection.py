"""Batched tensor selection primitives shared by the pruning methods: top-k, greedy DPP MAP, max–min
diversity, density-peak clustering, and the checks and building blocks (ranking, packing, cosine matrix)
the method modules build their own algorithms from (each method's algorithm lives in its module,
vtprune/methods/NAME.py).

Every function here is pure (no model, no hooks, no state) and works on a batch: inputs carry a leading
batch dimension ``B`` and each sample is processed exactly as if it were alone (batch invariance).

Conventions:

* **Float32 inside.** Inputs may be fp16/bf16; they are upcast to float32 before any arithmetic, because
  half-precision scores tie far too often and greedy updates lose precision. Merged hidden states are
  returned in the dtype of the ``hidden`` input.
* **Deterministic ties.** Whenever a method says "top", "argmax" or "sort", equal values are broken by the
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
* **Fused on CUDA.** The greedy loops of :func:`dpp_greedy` and :func:`maxmin_diversity` (and VisPruner's
  rounds, SCOPE's loop) run as one Triton kernel per call where triton imports (:mod:`vtprune.kernels.greedy`, which
  states how exactly they match the torch loops here; ``VTPRUNE_TRITON=0`` turns them off).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.cuda_graphs import cuda_graphed
from vtprune.kernels.greedy import dpp_greedy_fused, fused_enabled, maxmin_fused

__all__ = [
    "PAD_INDEX",
    "Picked",
    "Clusters",
    "MergedSelection",
    "topk_indices",
    "topk_counts",
    "mask_indices",
    "dpp_greedy",
    "maxmin_diversity",
    "dpc_knn_cluster",
    "check_2d",
    "check_features",
    "check_valid",
    "check_count",
    "rank_tokens",
    "argmax_first",
    "picked_from",
    "cosine_matrix",
    "gather_rows",
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
    """Result of :func:`dpc_knn_cluster` (SparseVLM recycles its dropped tokens with it).

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


class MergedSelection(NamedTuple):
    """Kept tokens plus their (partly merged) hidden states, for merge-style pruners (TokenCarve, iLLaVA).

    Attributes:
        indices: ``(B, K)`` long, kept token indices sorted ascending (raster order).
        hidden: ``(B, K, D)`` hidden states of the kept tokens in the same order, with merged tokens
            replaced by their merged value; dtype of the ``hidden`` input.
    """

    indices: Tensor
    hidden: Tensor

    @classmethod
    def in_raster_order(cls, indices: Tensor, hidden: Tensor, dtype: torch.dtype) -> MergedSelection:
        """Kept ``indices (B, K)`` in any order and their ``hidden (B, K, D)`` states, sorted into raster order
        (hidden states cast to ``dtype``)."""
        raster = torch.sort(indices, dim=-1).indices
        return cls(indices.gather(1, raster), gather_rows(hidden, raster).to(dtype))


# ----------------------------------------------------------------------------------------------------------
# Checks and building blocks (used by the method modules too)
# ----------------------------------------------------------------------------------------------------------


def check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (B, N); got {tuple(t.shape)}")


def check_features(name: str, x: Tensor, b: int, n: int) -> None:
    if x.dim() != 3 or x.shape[0] != b or x.shape[1] != n:
        raise ValueError(f"{name} must have shape ({b}, {n}, D); got {tuple(x.shape)}")


def check_valid(valid: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    """Return a (B, N) bool mask on ``device`` (all True when ``valid`` is None)."""
    if valid is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if valid.shape != (b, n):
        raise ValueError(f"valid must have shape ({b}, {n}); got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor; got {valid.dtype}")
    return valid.to(device)


def check_count(name: str, k: int, n: int, low: int = 0) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int; got {type(k).__name__}")
    if not low <= k <= n:
        raise ValueError(f"{name} must be in [{low}, {n}]; got {k}")
    return k


def rank_tokens(scores: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
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


def argmax_first(scores: Tensor) -> Tensor:
    """Argmax over the last dim with ties resolved to the lowest index (explicitly, on every backend)."""
    n = scores.shape[-1]
    best = scores.amax(dim=-1, keepdim=True)
    ar = torch.arange(n, device=scores.device)
    idx = torch.where(scores == best, ar, n).amin(dim=-1)
    # a row of NaNs would give n; clamp so a corrupt input can never index out of range
    return idx.clamp_max(n - 1)


def picked_from(idx: Tensor, ok: Tensor, sort: bool = True) -> Picked:
    """Pack per-slot indices and validity into a :class:`Picked` (sorted ascending, padding last)."""
    if not sort:
        return Picked(torch.where(ok, idx, PAD_INDEX), ok)
    sentinel = torch.iinfo(torch.long).max
    key = torch.where(ok, idx, sentinel)
    key = torch.sort(key, dim=-1).values
    ok_sorted = key != sentinel
    return Picked(torch.where(ok_sorted, key, PAD_INDEX), ok_sorted)


def cosine_matrix(features: Tensor, dup_tol: float) -> Tensor:
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


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------------------


def topk_indices(scores: Tensor, k: int, valid: Tensor | None = None) -> Picked:
    """Indices of the ``k`` highest scores per sample, returned in raster order.

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
    check_2d("scores", scores)
    b, n = scores.shape
    check_count("k", k, n)
    v = None if valid is None else check_valid(valid, b, n, scores.device)
    order, ok = rank_tokens(scores, v)
    return picked_from(order[:, :k], ok[:, :k])


def topk_counts(scores: Tensor, counts: Tensor, valid: Tensor, width: int | None = None) -> Picked:
    """:func:`topk_indices` with a count per row: the ``counts[b]`` highest-scoring valid tokens of row ``b``,
    in raster order; the width is the largest count, shorter rows are padded (adaptive methods).

    Args:
        scores: ``(B, N)`` scores, any float dtype.
        counts: ``(B,)`` long, tokens to keep per row (at most its valid tokens).
        valid: ``(B, N)`` bool mask; invalid tokens are never selected.
        width: ``max(counts)`` when the caller already has it on the host (saves the host sync).
    """
    if width is None:
        width = int(counts.max()) if counts.numel() else 0  # one host sync: the padded width
    order, ok = rank_tokens(scores, valid)
    slots = torch.arange(width, device=scores.device)[None, :] < counts[:, None]
    return picked_from(order[:, :width], ok[:, :width] & slots)


def mask_indices(mask: Tensor, k: int) -> Picked:
    """The ``True`` positions of each row of a ``(B, N)`` bool mask, in raster order, ``k`` slots wide (a row
    with fewer is padded): how a method that marks its kept tokens turns them into a selection."""
    return topk_indices(mask.float(), k, valid=mask)


# ----------------------------------------------------------------------------------------------------------
# Greedy DPP MAP
# ----------------------------------------------------------------------------------------------------------




def dpp_greedy(
    kernel: Tensor,
    k: int,
    valid: Tensor | None = None,
    *,
    sort: bool = True,
    exhaustion_tol: float = 1e-5,
) -> Picked:
    """Greedy MAP inference of a DPP with the fast Cholesky update of Chen et al. 2018 (NeurIPS, "Fast Greedy MAP Inference for DPP").

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

    On CUDA the loop runs as one fused Triton kernel (:mod:`vtprune.kernels.greedy`; ``VTPRUNE_TRITON=0``
    turns it off): the same picks, up to the summation order of one float32 dot product per step (see
    that module for the exact statement).

    Returns:
        :class:`Picked` with ``indices (B, k)``.
    """
    if kernel.dim() != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel must have shape (B, N, N); got {tuple(kernel.shape)}")
    b, n, _ = kernel.shape
    check_count("k", k, n)
    fused = k > 0 and fused_enabled(kernel, n)
    return _dpp_greedy(kernel, k, valid, sort=sort, exhaustion_tol=exhaustion_tol, fused=fused)


@cuda_graphed
def _dpp_greedy(
    kernel: Tensor, k: int, valid: Tensor | None, *, sort: bool, exhaustion_tol: float, fused: bool
) -> Picked:
    # `fused` is an argument, not decided in here, so that it is part of the CUDA-graph cache key
    b, n, _ = kernel.shape
    dev = kernel.device
    avail = check_valid(valid, b, n, dev).clone()
    lk = kernel.float()
    got = dpp_greedy_fused(lk, k, avail, exhaustion_tol) if fused else None
    if got is not None:
        return picked_from(*got, sort=sort)
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
        j = argmax_first(score)
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
    return picked_from(picks, picked_ok, sort=sort)


# ----------------------------------------------------------------------------------------------------------
# Max–min diversity
# ----------------------------------------------------------------------------------------------------------


def maxmin_diversity(
    features: Tensor,
    k: int,
    valid: Tensor | None = None,
    *,
    sort: bool = True,
    dup_tol: float = 1e-6,
) -> Picked:
    """DivPrune's greedy max–min diversity selection with cosine distance (arXiv 2503.02175).

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

    On CUDA the greedy loop runs as one fused Triton kernel (:mod:`vtprune.kernels.greedy`;
    ``VTPRUNE_TRITON=0`` turns it off) with bit-identical picks (it only compares and takes minima).

    Returns:
        :class:`Picked` with ``indices (B, k)``.
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape (B, N, D); got {tuple(features.shape)}")
    b, n, _ = features.shape
    check_count("k", k, n)
    fused = k > 0 and fused_enabled(features, n)
    return _maxmin_diversity(features, k, valid, sort=sort, dup_tol=dup_tol, fused=fused)


@cuda_graphed
def _maxmin_diversity(
    features: Tensor, k: int, valid: Tensor | None, *, sort: bool, dup_tol: float, fused: bool
) -> Picked:
    b, n, _ = features.shape
    dev = features.device
    avail = check_valid(valid, b, n, dev).clone()
    picks = torch.zeros(b, k, dtype=torch.long, device=dev)
    picked_ok = torch.zeros(b, k, dtype=torch.bool, device=dev)
    if k == 0:
        return picked_from(picks, picked_ok, sort=sort)
    dist = (1.0 - cosine_matrix(features, dup_tol)).clamp_min(0.0)
    got = maxmin_fused(dist, k, avail) if fused else None
    if got is not None:
        return picked_from(*got, sort=sort)
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
        j = argmax_first(score)
        picks[:, i] = j
        picked_ok[:, i] = avail[ar, j]
        avail = avail & (cols != j.unsqueeze(1))
        run_min = torch.minimum(run_min, dist[ar, :, j])
    return picked_from(picks, picked_ok, sort=sort)


# ----------------------------------------------------------------------------------------------------------
# Density-peak clustering
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
    """Density-peak clustering with k-NN density, as SparseVLM recycles deleted tokens (its step D).

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
    check_count("num_clusters", num_clusters, m, low=1)
    if k_neighbors < 1:
        raise ValueError(f"k_neighbors must be >= 1; got {k_neighbors}")
    dev = x.device
    v = check_valid(valid, b, m, dev)
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
    order, order_ok = rank_tokens(density * delta, v)
    centers, c_ok = order[:, :num_clusters], order_ok[:, :num_clusters]

    to_centre = dist.gather(1, centers.unsqueeze(-1).expand(-1, -1, m))  # (B, C, M)
    to_centre = torch.where(c_ok.unsqueeze(-1), to_centre, inf)
    assign = argmax_first(-to_centre.transpose(1, 2))  # nearest centre, earlier centre on ties
    cid = torch.arange(num_clusters, device=dev).expand(b, -1)
    assign = assign.scatter(1, centers, cid)
    assign = torch.where(v, assign, -1)

    onehot = (assign.unsqueeze(1) == cid.unsqueeze(-1)).float()  # (B, C, M); deterministic bmm, no atomics
    merged = (onehot @ xf) / onehot.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return Clusters(merged.to(x.dtype), assign, torch.where(c_ok, centers, PAD_INDEX), c_ok)
