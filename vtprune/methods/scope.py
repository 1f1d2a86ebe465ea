"""SCOPE — "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs" (Deng et al.,
NeurIPS 2025, arXiv 2510.24214; official code github.com/kinredon/SCOPE, `scope/clip_encoder.py`).

Idea: a selected set *covers* every token by its best cosine similarity to the set (a facility-location
set-coverage function, submodular); SCOPE greedily adds the token whose coverage gain times its saliency
([CLS] attention) is largest, so the kept tokens are both salient and semantically complete. Before the LLM,
kept tokens in raster order.

Official rule (LLaVA-1.5): features = the feature layer's patch hidden states (what the projector receives),
S = their pairwise cosine similarity; saliency a = the feature layer's [CLS]-row attention to each patch,
summed over heads. Coverage c_i = max(0, max_{s ∈ selected} S_is) (0 for the empty set); the gain of an
unselected j is Σ_i max(0, S_ij − c_i) over every token i; the SCOPE score is gain_j · a_j^α
(`COMBINED=multi`; `add`: gain_j + a_j^α). Repeat T times, taking the argmax (ties: lower index).

Parameters and defaults: keep (T, default 64; the LLaVA-1.5 tables use T = 64 / 128 / 192 with the same
α), alpha = 1.0 (the repo's `ALPHA`), combine = "multi" (the repo's `COMBINED`).

Deviations from the official code (kinredon/SCOPE `scope/clip_encoder.py` @ 6bf7306):
* none in the rule; the greedy loop runs in float32 with explicit lower-index tie-breaking (the official
  `argmax` leaves ties to the backend), and the [CLS] row comes from the feature layer's q/k under SDPA
  instead of an eager tower's `output_attentions`;
* the official batched loop is kept per image (each image alone gives the same selection); on LLaVA-NeXT it
  runs on each image's tokens (base view, tiles, newlines) with each crop's own [CLS] attention.

Implementation: on CUDA the k greedy steps run as one fused Triton program per image
(:func:`vtprune.kernels.greedy.scope_fused`; ``VTPRUNE_TRITON=0`` keeps the torch loop below, which is also
the CPU path and the reference). At every step it streams from L2 the column chunks of the (N, N) cosine
matrix that can still hold the argmax (lazy greedy: scores never increase, so the last computed ones bound
the chunks it skips); the prologue (normalise, cosine matrix, saliency^α) and the kernel replay as one CUDA
graph. Same picks as the torch loop, up to the order of the float32 gain sums: scores equal to within
float32 rounding (not exactly equal) may be picked in the other order; exact ties (duplicate tokens,
all-zero gains) go to the lower index on both paths (:mod:`vtprune.kernels.greedy` states the contract).
On an H200 (B=16, N=576, D=1024; `benchmarks/scope_kernel_gpu.py`, results in
benchmarks/results/nvidia-h200-2026-12-03-prefill/) it takes 0.97 / 1.32 / 1.67 ms at keep 64 / 128 / 192
against 6.6 / 12.9 / 19.3 ms for the torch loop, with the same picks; SCOPE's batch-16 prefill is then within
0.9–2.5 % of its oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.cuda_graphs import cuda_graphed
from vtprune.kernels.greedy import fused_enabled, scope_fused
from vtprune.methods.base import Method, Selection, bounded, register
from vtprune.selection import Picked, argmax_first, check_count, check_valid, picked_from


def scope_select(
    features: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float = 1.0,
    combine: str = "multi",
    valid: Tensor | None = None,
    *,
    sort: bool = True,
) -> Picked:
    """Greedy saliency × coverage selection of `k` tokens per row (rows independent), in raster order.

    features (B, N, D), saliency (B, N) non-negative. Invalid tokens are neither selected nor covered; a row
    with fewer than `k` valid tokens keeps all of them, then padding (:class:`~vtprune.selection.Picked`).
    ``sort=False`` returns the pick order instead of raster order.

    On CUDA the greedy loop runs as one fused Triton kernel per call
    (:func:`vtprune.kernels.greedy.scope_fused`; ``VTPRUNE_TRITON=0`` turns it off): the same picks, up to
    the summation order of the float32 gains (exact ties, e.g. duplicate tokens or all-zero gains, go to the
    lower index on both paths; see :mod:`vtprune.kernels.greedy`). Either way the call replays as one CUDA
    graph (prologue and kernel, or prologue and the k torch steps).
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape (B, N, D); got {tuple(features.shape)}")
    _, n, _ = features.shape
    check_count("k", k, n)
    fused = k > 0 and fused_enabled(features, n)
    return _scope_select(features, saliency, k, alpha, combine, valid, sort=sort, fused=fused)


@cuda_graphed  # prologue and k greedy steps (or the fused kernel), no host sync: one graph launch on a GPU
def _scope_select(
    features: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float,
    combine: str,
    valid: Tensor | None,
    *,
    sort: bool,
    fused: bool,
) -> Picked:
    # `fused` is an argument, decided by the caller, so that it is part of the CUDA-graph cache key (a graph
    # captured on one path is never replayed for the other, e.g. after VTPRUNE_TRITON=0)
    b, n, _ = features.shape
    dev = features.device
    valid = check_valid(valid, b, n, dev)
    x = F.normalize(features.float(), dim=-1)
    sim = x @ x.transpose(1, 2)  # (B, N, N)
    weight = saliency.float().clamp(min=0) ** alpha
    got = scope_fused(sim, weight, k, valid, combine == "multi") if fused else None
    if got is not None:
        return picked_from(*got, sort=sort)
    covered = torch.zeros(b, n, device=dev)  # c_i: best similarity to the selected set, floored at 0
    available = valid.clone()
    counts = valid.float()[:, :, None]
    rows = torch.arange(b, device=dev)
    picks = torch.zeros(b, k, dtype=torch.long, device=dev)
    picked_ok = torch.zeros(b, k, dtype=torch.bool, device=dev)
    for step in range(k):
        gain = (torch.relu(sim - covered[:, :, None]) * counts).sum(dim=1)  # Σ_i max(0, S_ij − c_i)
        score = gain * weight if combine == "multi" else gain + weight
        best = argmax_first(score.masked_fill(~available, float("-inf")))
        picks[:, step] = best
        picked_ok[:, step] = available[rows, best]
        available = available.scatter(1, best[:, None], False)
        covered = torch.maximum(covered, sim[rows, best])
    # not a scatter of picked_ok into a mask: a row that runs out of valid tokens repeats pick 0 with
    # ok = False, which would overwrite a valid token 0 picked earlier
    return picked_from(picks, picked_ok, sort=sort)


@register
@dataclass
class SCOPE(Method):
    """Greedy saliency × coverage gain (submodular set cover) on the vision features."""

    alpha: float = bounded(1.0, ge=0)
    combine: Literal["multi", "add"] = "multi"

    name = "scope"
    stage_kind = "vision"
    paper = "arXiv 2510.24214 (NeurIPS 2025)"

    def select(self, stage_index, stage, signals) -> Selection:
        # The official saliency sums the heads (it matters for combine="add" only).
        saliency = signals.cls_attention_heads.sum(dim=1)
        picked = scope_select(signals.features, saliency, stage.keep, self.alpha, self.combine)
        return Selection(*picked, scores=saliency, all_valid=True)  # every token a candidate: each slot holds one
