"""Head selection for attention-based token scores (FinePruner; docs/methods/attention_options.md).

Official LLM-stage pruners average the text→image attention of all heads. FinePruner instead picks the
heads that look "visual" with one of seven strategies, a number of heads that is fixed or chosen per sample
(dynamic count), and — in its resource-aware mode — the strategy itself, from candidates that depend on the
visual-token budget R. FinePruner's formulas are not published; every strategy below is defined
precisely in its docstring, from its name.

Inputs are post-softmax attention probabilities from query rows to the N visual tokens, ``(B, H, Q, N)``,
or a head-resolved score ``(B, H, N)``. Strategies first reduce ``(B, H, Q, N)`` to ``s = mean_Q A``
(``(B, H, N)``, optionally over valid query rows only) and return one score per head, ``(B, H)``, higher =
more useful. Everything is per sample (a batch gives the same result as its samples one by one), float32
(float64 kept), deterministic (ties broken by lower head index first) and free of host syncs except
where lists are built for records (:meth:`HeadSelection.indices`).

Two families of per-head quantities are used:

* **raw mass** quantities on ``s`` itself (image mass, max, range, top-k sum): a head that sends little
  attention to the image scores low — never renormalised;
* **shape** quantities on the head's distribution over image tokens ``p_h = s_h / Σ_j s_{h,j}`` (sparsity);
  a head with no image mass at all is treated as uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "HEAD_STRATEGIES",
    "HeadPolicy",
    "HeadSelection",
    "attention_range",
    "combination_quality",
    "combine_heads",
    "dynamic_head_count",
    "graph_based",
    "head_attention",
    "head_count_estimates",
    "head_similarity",
    "hierarchical",
    "image_mass",
    "max_attention",
    "multi_objective",
    "resource_candidates",
    "scale_head_range",
    "select_heads",
    "sparsity",
    "strategy_scores",
    "top_k_sum",
    "top_heads_mask",
]

_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def head_attention(attn: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce ``(B, H, Q, N)`` to ``(B, H, N)`` by the mean over (valid) query rows; pass ``(B, H, N)`` through.

    ``query_mask``: ``(B, Q)`` bool, True = a real query row (e.g. not left padding). A sample without any
    valid row gets zeros.
    """
    a = attn.to(torch.promote_types(attn.dtype, torch.float32))
    if a.dim() == 3:
        return a
    if a.dim() != 4:
        raise ValueError(f"attention must be (B, H, Q, N) or (B, H, N), got {tuple(attn.shape)}")
    if query_mask is None:
        return a.mean(2)
    m = query_mask.to(device=a.device, dtype=a.dtype)
    if m.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"query_mask must be (B, Q) = {(a.shape[0], a.shape[2])}, got {tuple(m.shape)}")
    return (a * m[:, None, :, None]).sum(2) / m.sum(1).clamp_min(1)[:, None, None]


def _distribution(s: torch.Tensor) -> torch.Tensor:
    """Per-head distribution over image tokens; heads with zero mass become uniform."""
    s = s.clamp_min(0)
    total = s.sum(-1, keepdim=True)
    uniform = torch.full_like(s, 1.0 / s.shape[-1])
    return torch.where(total > 0, s / total.clamp_min(_EPS), uniform)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Min–max normalise over heads (last dim) per sample; a constant row becomes 0."""
    lo = x.amin(-1, keepdim=True)
    span = x.amax(-1, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(_EPS), torch.zeros_like(x))


def head_similarity(s: torch.Tensor) -> torch.Tensor:
    """``(B, H, N) -> (B, H, H)`` cosine similarity of the heads' image-attention vectors (0 for zero heads)."""
    u = s / torch.linalg.vector_norm(s, dim=-1, keepdim=True).clamp_min(_EPS)
    return u @ u.transpose(-1, -2)


def _off_diagonal(c: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(c.shape[-1], dtype=torch.bool, device=c.device)
    return c.masked_fill(eye, 0.0)


# --------------------------------------------------------------------------------------------------------
# Strategies: (B, H, Q, N) or (B, H, N) -> (B, H), higher = better
# --------------------------------------------------------------------------------------------------------


def image_mass(attn: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Total attention a head sends to the image, ``m_h = Σ_j s_{h,j}`` (SparseVLM+ v2.0
    keeps the 14 heads of largest ``m_h``)."""
    return head_attention(attn, query_mask).sum(-1)


def sparsity(attn: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Concentration of a head's image attention: ``1 − H(p_h) / log N``, in [0, 1].

    ``H(p) = −Σ p_j log p_j`` (``0 log 0 = 0``) is the entropy of ``p_h = s_h / Σ_j s_{h,j}``. A one-hot head
    scores 1, a uniform head 0, a head split evenly over 2 of 4 tokens ``1 − log 2 / log 4 = 0.5``. The
    score ignores how much mass the head sends to the image (that is :func:`image_mass`). ``N = 1`` gives 0.
    """
    s = head_attention(attn, query_mask)
    n = s.shape[-1]
    if n < 2:
        return torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)
    p = _distribution(s)
    ent = -(torch.where(p > 0, p * torch.log(p.clamp_min(_EPS)), torch.zeros_like(p))).sum(-1)
    return (1.0 - ent / math.log(n)).clamp(0.0, 1.0)


def top_k_sum(attn: torch.Tensor, query_mask: torch.Tensor | None = None, k: int = 10) -> torch.Tensor:
    """Attention mass on the head's ``k`` most attended image tokens, ``Σ_{j∈top-k(s_h)} s_{h,j}`` (raw).

    ``k = 10`` by default (clipped to N), as in FinePruner's ablation code; for N = 576 that is the top 1.7%.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = head_attention(attn, query_mask)
    return torch.topk(s, min(k, s.shape[-1]), dim=-1).values.sum(-1)


def max_attention(attn: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A head's largest image attention, ``max_j s_{h,j}`` (raw)."""
    return head_attention(attn, query_mask).amax(-1)


def attention_range(attn: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spread of a head's image attention, ``max_j s_{h,j} − min_j s_{h,j}`` (raw)."""
    s = head_attention(attn, query_mask)
    return s.amax(-1) - s.amin(-1)


def graph_based(
    attn: torch.Tensor, query_mask: torch.Tensor | None = None, damping: float = 0.85
) -> torch.Tensor:
    """PageRank centrality of each head in the head-similarity graph (FinePruner's "graph_based").

    Graph: nodes = heads, edge weights ``C_{hg} = cos(s_h, s_g)`` for ``h ≠ g`` (non-negative, attention is
    non-negative), no self loops. Random walk ``P = D⁻¹ C`` (rows of a head with no similar head — zero
    row — jump uniformly). PageRank ``r = (1−d)/H · 1 + d · Pᵀ r`` with damping ``d = 0.85``, solved
    exactly as a linear system; scores sum to 1 per sample. Heads that agree with many other heads (the
    consensus visual pattern) score high; an idiosyncratic head scores low.
    """
    if not 0 <= damping < 1:
        raise ValueError(f"damping must be in [0, 1), got {damping}")
    s = head_attention(attn, query_mask)
    b, h, _ = s.shape
    c = _off_diagonal(head_similarity(s)).clamp_min(0)
    deg = c.sum(-1, keepdim=True)
    p = torch.where(deg > 0, c / deg.clamp_min(_EPS), torch.full_like(c, 1.0 / h))
    eye = torch.eye(h, dtype=s.dtype, device=s.device).expand(b, h, h)
    rhs = torch.full((b, h, 1), (1.0 - damping) / h, dtype=s.dtype, device=s.device)
    # I − d·Pᵀ is strictly diagonally dominant by columns (d < 1), so it is never singular: solve_ex
    # skips the error check and its host sync.
    r = torch.linalg.solve_ex(eye - damping * p.transpose(-1, -2), rhs).result.squeeze(-1)
    return r / r.sum(-1, keepdim=True)


def hierarchical(
    attn: torch.Tensor, query_mask: torch.Tensor | None = None, group_frac: float = 0.5
) -> torch.Tensor:
    """Two-level ranking: first by image mass, then by sparsity inside the top group (FinePruner's "hierarchical").

    Level 1: the ``G = ceil(group_frac · H)`` heads with the largest :func:`image_mass` (ties: lower index)
    form the top group. Level 2: inside the group heads are ranked by :func:`sparsity`; outside it, by
    image mass. The score encodes that order: ``1 + sparsity_h ∈ [1, 2]`` in the group,
    ``0.5 · m_h / max_g m_g ∈ [0, 0.5]`` outside, so every group head outranks every other head. (FinePruner's
    "layer-then-head" reading needs several layers' attention; with one layer's rows the coarse level is
    the head's image mass — a head that barely looks at the image is not a visual head — and the fine level
    its concentration.)
    """
    if not 0 < group_frac <= 1:
        raise ValueError(f"group_frac must be in (0, 1], got {group_frac}")
    s = head_attention(attn, query_mask)
    h = s.shape[1]
    mass = s.sum(-1)
    g = max(1, math.ceil(group_frac * h))
    in_group = top_heads_mask(mass, torch.full((s.shape[0],), g, dtype=torch.long, device=s.device))
    sp = sparsity(s)
    outside = 0.5 * mass / mass.amax(-1, keepdim=True).clamp_min(_EPS)
    return torch.where(in_group, 1.0 + sp, outside)


_MULTI_WEIGHTS = (0.4, 0.3, 0.3)


def multi_objective(
    attn: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    weights: tuple[float, float, float] = _MULTI_WEIGHTS,
) -> torch.Tensor:
    """Weighted blend of three min–max-normalised criteria (FinePruner's "multi_objective").

    ``score_h = 0.4 · n(sparsity_h) + 0.3 · n(image_mass_h) + 0.3 · n(diversity_h)`` where ``n`` is min–max
    normalisation over the heads of the sample (a constant criterion contributes 0) and
    ``diversity_h = 1 − mean_{g≠h} cos(s_h, s_g)`` (1 for a single head). Concentrated, image-focused heads
    that see something the other heads do not score high.
    """
    s = head_attention(attn, query_mask)
    h = s.shape[1]
    sim = _off_diagonal(head_similarity(s))
    diversity = 1.0 - sim.sum(-1) / max(h - 1, 1)
    w_sp, w_mass, w_div = weights
    return w_sp * _minmax(sparsity(s)) + w_mass * _minmax(s.sum(-1)) + w_div * _minmax(diversity)


StrategyFn = Callable[..., torch.Tensor]

#: Registry of head-scoring strategies, name -> ``fn(attn, query_mask=None, **options) -> (B, H)``.
#: The seven FinePruner strategies plus ``image_mass`` (SparseVLM+'s top-14-by-mass rule).
HEAD_STRATEGIES: dict[str, StrategyFn] = {
    "sparsity": sparsity,
    "graph_based": graph_based,
    "hierarchical": hierarchical,
    "top_k_sum": top_k_sum,
    "max_attention": max_attention,
    "multi_objective": multi_objective,
    "attention_range": attention_range,
    "image_mass": image_mass,
}

_STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "top_k_sum": ("k",),
    "graph_based": ("damping",),
    "hierarchical": ("group_frac",),
    "multi_objective": ("weights",),
}


def strategy_scores(
    attn: torch.Tensor, strategy: str, query_mask: torch.Tensor | None = None, **options: Any
) -> torch.Tensor:
    """Run a registered strategy, passing only the options it accepts."""
    if strategy not in HEAD_STRATEGIES:
        raise ValueError(f"unknown head strategy {strategy!r}; known: {', '.join(HEAD_STRATEGIES)}")
    accepted = _STRATEGY_OPTIONS.get(strategy, ())
    kw = {k: v for k, v in options.items() if k in accepted}
    return HEAD_STRATEGIES[strategy](attn, query_mask, **kw)


# --------------------------------------------------------------------------------------------------------
# Head counts and masks
# --------------------------------------------------------------------------------------------------------


def top_heads_mask(scores: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """``(B, H)`` bool mask of each sample's ``counts[b]`` best heads (stable: ties → lower index)."""
    b, h = scores.shape
    if isinstance(counts, int):
        counts = torch.full((b,), counts, dtype=torch.long, device=scores.device)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(h, device=scores.device).expand(b, h))
    return ranks < counts.to(scores.device)[:, None]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scale_head_range(head_range: tuple[int, int], num_heads: int, ref_heads: int = 32) -> tuple[int, int]:
    """Scale a head-count range made for ``ref_heads`` = 32 heads to a model with fewer heads.

    ``lo' = max(1, round(lo·H/32))``, ``hi' = max(lo', round(hi·H/32))`` (round half up); with 32 or more
    heads the range is kept (and ``hi`` is clipped to H).
    """
    lo, hi = head_range
    if num_heads < ref_heads:
        lo = max(1, _round_half_up(lo * num_heads / ref_heads))
        hi = max(lo, _round_half_up(hi * num_heads / ref_heads))
    hi = min(hi, num_heads)
    lo = min(lo, hi)
    return lo, hi


def resource_candidates(budget: int, num_heads: int = 32) -> tuple[tuple[str, ...], tuple[int, int]]:
    """Candidate strategies and preferred head-count range for a visual-token budget R (FinePruner).

    ``R ≥ 166`` → (sparsity, hierarchical), 14–26 heads; ``R ≥ 98`` → (sparsity, hierarchical, top_k_sum,
    max_attention), 8–26; otherwise (graph_based, multi_objective, attention_range), 6–18. R is the number of
    visual tokens kept after the pruning layer on LLaVA-1.5's 576-token image (FinePruner's R: 166 / 98 / 30
    for the 192 / 128 / 64 settings at K = 2); a caller with another token count should pass R rescaled to
    576 tokens. The range is scaled by :func:`scale_head_range` for models with fewer than 32 heads.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if budget >= 166:
        cands, rng = ("sparsity", "hierarchical"), (14, 26)
    elif budget >= 98:
        cands, rng = ("sparsity", "hierarchical", "top_k_sum", "max_attention"), (8, 26)
    else:
        cands, rng = ("graph_based", "multi_objective", "attention_range"), (6, 18)
    return cands, scale_head_range(rng, num_heads)


def head_count_estimates(
    scores: torch.Tensor, gap_k: float = 0.8, quality_k: float = 0.3, contribution: float = 0.85
) -> torch.Tensor:
    """The three head-count estimates of FinePruner's dynamic count, ``(B, H) -> (B, 3)`` long.

    With the sample's head scores sorted in decreasing order ``s_(1) ≥ … ≥ s_(H)`` (std = sample std, n−1):

    1. **gap**: gaps ``g_i = s_(i) − s_(i+1)``; the first ``i`` with ``g_i > mean(g) + 0.8·std(g)``
       gives ``i`` heads (those above the gap); no significant gap (or H < 3) → H.
    2. **quality**: ``#{h : s_h > mean(s) − 0.3·std(s)}``.
    3. **contribution**: with ``c_i = Σ_{j≤i} s_(j) / Σ_j s_(j)`` (scores clamped at 0; all-zero → uniform),
       ``#{i : c_i ≤ 0.85} + 1``, at most H.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, H), got {tuple(scores.shape)}")
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    b, h = s.shape
    srt = torch.sort(s, dim=-1, descending=True, stable=True).values
    full = torch.full((b,), h, dtype=torch.long, device=s.device)
    if h >= 3:
        gaps = srt[:, :-1] - srt[:, 1:]
        thr = gaps.mean(-1, keepdim=True) + gap_k * gaps.std(-1, keepdim=True)
        sig = gaps > thr
        first = torch.argmax(sig.to(torch.uint8), dim=-1) + 1
        gap_count = torch.where(sig.any(-1), first, full)
    else:
        gap_count = full  # fewer than two gaps: no spread to test against
    std = s.std(-1, keepdim=True) if h > 1 else torch.zeros_like(s[:, :1])
    quality_count = (s > s.mean(-1, keepdim=True) - quality_k * std).sum(-1)
    pos = srt.clamp_min(0)
    total = pos.sum(-1, keepdim=True)
    frac = torch.where(total > 0, pos / total.clamp_min(_EPS), torch.full_like(pos, 1.0 / h))
    contrib_count = ((frac.cumsum(-1) <= contribution).sum(-1) + 1).clamp(max=h)
    return torch.stack([gap_count, quality_count, contrib_count], dim=-1)


def dynamic_head_count(
    scores: torch.Tensor,
    head_range: tuple[int, int] | None = None,
    gap_k: float = 0.8,
    quality_k: float = 0.3,
    contribution: float = 0.85,
) -> torch.Tensor:
    """Per-sample number of heads: the median of :func:`head_count_estimates`, clipped to ``head_range``.

    ``head_range`` defaults to ``[1, H]`` and is itself clipped to ``[1, H]``. Returns ``(B,)`` long.
    """
    est = head_count_estimates(scores, gap_k, quality_k, contribution)
    h = scores.shape[-1]
    lo, hi = head_range if head_range is not None else (1, h)
    lo, hi = max(1, min(lo, h)), max(1, min(hi, h))
    if lo > hi:
        raise ValueError(f"empty head range {head_range}")
    return est.sort(dim=-1).values[:, 1].clamp(lo, hi)


# --------------------------------------------------------------------------------------------------------
# Combination and its quality
# --------------------------------------------------------------------------------------------------------


def combine_heads(attn: torch.Tensor, head_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the selected heads: ``(B, H, Q, N) -> (B, Q, N)`` or ``(B, H, N) -> (B, N)``.

    ``head_mask``: ``(B, H)`` bool. A sample with no selected head falls back to the mean over all heads.
    """
    a = attn.to(torch.promote_types(attn.dtype, torch.float32))
    if a.dim() not in (3, 4):
        raise ValueError(f"attention must be (B, H, Q, N) or (B, H, N), got {tuple(attn.shape)}")
    m = head_mask.to(device=a.device, dtype=torch.bool)
    if m.shape != a.shape[:2]:
        raise ValueError(f"head_mask must be {tuple(a.shape[:2])}, got {tuple(m.shape)}")
    m = torch.where(m.any(-1, keepdim=True), m, torch.ones_like(m)).to(a.dtype)
    shape = m.shape + (1,) * (a.dim() - 2)
    return (a * m.view(shape)).sum(1) / m.sum(1).view((-1,) + (1,) * (a.dim() - 2))


def combination_quality(
    attn: torch.Tensor,
    head_mask: torch.Tensor,
    scores: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    normalize_scores: bool = True,
) -> torch.Tensor:
    """Quality of a head selection, ``0.3·diversity + 0.3·score_quality + 0.4·attention_quality`` (FinePruner).

    Per sample, with ``S`` the selected heads and ``s = mean_Q A``:

    * ``diversity = 1 − mean_{h≠g ∈ S} cos(s_h, s_g)`` (1 when ``|S| = 1``);
    * ``score_quality = (std + range) / 2`` of the strategy scores of the heads in ``S`` (sample std, 0 for
      one head). Strategies have incomparable units (sparsity in [0,1], PageRank summing to 1, raw attention
      maxima ≈ 1e-2), so by default the scores are first min–max normalised over all heads of the sample;
      ``normalize_scores=False`` uses them as given;
    * ``attention_quality = var(c) · max(c)`` of the combined attention ``c = mean_{h∈S} s_h`` over the N
      tokens (sample variance; raw attention units, the same for every candidate).

    Returns ``(B,)``.
    """
    s = head_attention(attn, query_mask)
    m = head_mask.to(device=s.device, dtype=s.dtype)
    k = m.sum(-1)
    sim = _off_diagonal(head_similarity(s))
    pair_sum = torch.einsum("bh,bhg,bg->b", m, sim, m)
    pairs = k * (k - 1)
    diversity = torch.where(pairs > 0, 1.0 - pair_sum / pairs.clamp_min(1), torch.ones_like(k))

    sc = scores.to(s.dtype)
    if normalize_scores:
        sc = _minmax(sc)
    sel = m.bool()
    mean_sc = (sc * m).sum(-1) / k.clamp_min(1)
    var_sc = (((sc - mean_sc[:, None]) ** 2) * m).sum(-1) / (k - 1).clamp_min(1)
    std_sc = torch.where(k > 1, var_sc.sqrt(), torch.zeros_like(k))
    big = torch.finfo(s.dtype).max
    rng = sc.masked_fill(~sel, -big).amax(-1) - sc.masked_fill(~sel, big).amin(-1)
    rng = torch.where(k > 0, rng, torch.zeros_like(k))
    score_quality = (std_sc + rng) / 2

    comb = combine_heads(s, sel)
    attention_quality = comb.var(-1) * comb.amax(-1) if comb.shape[-1] > 1 else torch.zeros_like(k)
    return 0.3 * diversity + 0.3 * score_quality + 0.4 * attention_quality


# --------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------


@dataclass
class HeadSelection:
    """Result of a head selection for a batch.

    * ``mask``: ``(B, H)`` bool, True = head used;
    * ``strategy``: per sample, the strategy that chose its heads (``"mean"`` for all heads);
    * ``counts``: ``(B,)`` long, number of heads used;
    * ``scores``: ``(B, H)`` scores of that strategy (None for ``"mean"``);
    * ``quality``: ``(B,)`` combination quality of the chosen candidate (resource-aware mode only);
    * ``head_range``: the clipping range used by a dynamic count, if any.
    """

    mask: torch.Tensor
    strategy: list[str]
    counts: torch.Tensor
    scores: torch.Tensor | None = None
    quality: torch.Tensor | None = None
    head_range: tuple[int, int] | None = None

    def indices(self) -> list[list[int]]:
        """Selected head indices per sample, ascending (host lists, for records)."""
        return [torch.nonzero(row).flatten().tolist() for row in self.mask.cpu()]

    def combine(self, attn: torch.Tensor) -> torch.Tensor:
        """:func:`combine_heads` with this selection's mask."""
        return combine_heads(attn, self.mask)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (heads per sample, strategy, counts, quality)."""
        out: dict[str, Any] = {
            "heads": self.indices(),
            "strategy": list(self.strategy),
            "counts": self.counts.cpu().tolist(),
        }
        if self.quality is not None:
            out["quality"] = self.quality.cpu().tolist()
        if self.head_range is not None:
            out["head_range"] = list(self.head_range)
        return out


NumHeads = int | str | None


def _resolve_counts(
    scores: torch.Tensor, num_heads: NumHeads, head_range: tuple[int, int] | None
) -> torch.Tensor:
    b, h = scores.shape
    if isinstance(num_heads, int) and not isinstance(num_heads, bool):
        return torch.full((b,), min(num_heads, h), dtype=torch.long, device=scores.device)
    return dynamic_head_count(scores, head_range)


def _check_num_heads(num_heads: NumHeads) -> None:
    if num_heads is None or num_heads == "dynamic":
        return
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be None, 'dynamic' or an int >= 1, got {num_heads!r}")


def select_heads(
    attn: torch.Tensor,
    strategy: str = "auto",
    num_heads: NumHeads = None,
    budget: int | None = None,
    query_mask: torch.Tensor | None = None,
    head_range: tuple[int, int] | None = None,
    **options: Any,
) -> HeadSelection:
    """Select heads per sample (FinePruner).

    * ``strategy``: a name of :data:`HEAD_STRATEGIES`, ``"mean"`` (all heads, the official pruners' rule) or
      ``"auto"`` (resource-aware: every candidate of :func:`resource_candidates(budget)` is scored, counted
      and its selection rated by :func:`combination_quality`; the best candidate wins per sample, ties →
      the earlier candidate).
    * ``num_heads``: an int (fixed, clipped to H), or ``None`` / ``"dynamic"`` = :func:`dynamic_head_count`
      clipped to ``head_range``, which defaults to the budget's preferred range when ``budget`` is given
      (scaled to the model's head count) and to ``[1, H]`` otherwise.
    * ``budget``: visual tokens kept, R (required for ``"auto"``).
    * ``options``: strategy options (``k`` for top_k_sum, ``damping``, ``group_frac``, ``weights``).
    """
    _check_num_heads(num_heads)
    s = head_attention(attn, query_mask)
    b, h, _ = s.shape
    if strategy == "mean":
        if num_heads is not None:
            raise ValueError("strategy 'mean' uses all heads; num_heads must be None")
        return HeadSelection(
            mask=torch.ones(b, h, dtype=torch.bool, device=s.device),
            strategy=["mean"] * b,
            counts=torch.full((b,), h, dtype=torch.long, device=s.device),
        )
    if strategy == "auto":
        if budget is None:
            raise ValueError("strategy 'auto' needs the visual-token budget (budget=R)")
        candidates, rng = resource_candidates(budget, h)
    elif strategy in HEAD_STRATEGIES:
        candidates = (strategy,)
        rng = resource_candidates(budget, h)[1] if budget is not None else (1, h)
    else:
        raise ValueError(
            f"unknown head strategy {strategy!r}; known: auto, mean, {', '.join(HEAD_STRATEGIES)}"
        )
    if head_range is not None:
        rng = (int(head_range[0]), int(head_range[1]))
    dynamic = num_heads is None or num_heads == "dynamic"

    all_scores, all_masks, all_counts = [], [], []
    for name in candidates:
        sc = strategy_scores(s, name, **options)
        counts = _resolve_counts(sc, num_heads, rng)
        all_scores.append(sc)
        all_counts.append(counts)
        all_masks.append(top_heads_mask(sc, counts))
    if len(candidates) == 1:
        return HeadSelection(
            mask=all_masks[0],
            strategy=[candidates[0]] * b,
            counts=all_counts[0],
            scores=all_scores[0],
            head_range=rng if dynamic else None,
        )
    quality = torch.stack(
        [combination_quality(s, m, sc) for m, sc in zip(all_masks, all_scores, strict=True)], dim=-1
    )  # (B, C)
    best = torch.argmax(quality, dim=-1)  # first maximum on ties
    pick = best[:, None, None].expand(b, 1, h)
    mask = torch.gather(torch.stack(all_masks, 1), 1, pick).squeeze(1)
    scores = torch.gather(torch.stack(all_scores, 1), 1, pick).squeeze(1)
    counts = torch.gather(torch.stack(all_counts, 1), 1, best[:, None]).squeeze(1)
    names = [candidates[i] for i in best.cpu().tolist()]
    return HeadSelection(
        mask=mask,
        strategy=names,
        counts=counts,
        scores=scores,
        quality=torch.gather(quality, 1, best[:, None]).squeeze(1),
        head_range=rng if dynamic else None,
    )


@dataclass
class HeadPolicy:
    """Which heads' attention an attention-based method trusts (docs/methods/attention_options.md).

    * ``strategy``: ``"mean"`` (default: all heads, what the official pruners do), ``"auto"`` (resource-aware
      FinePruner mode, needs the budget) or a name in :data:`HEAD_STRATEGIES`;
    * ``num_heads``: ``None`` / ``"dynamic"`` (per-sample count) or a fixed int; must be ``None`` for mean;
    * ``options``: strategy options (``k``, ``damping``, ``group_frac``, ``weights``);
    * ``head_range``: override of the dynamic count's clipping range.
    """

    strategy: str = "mean"
    num_heads: NumHeads = None
    options: dict[str, Any] = field(default_factory=dict)
    head_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in HEAD_STRATEGIES and self.strategy not in ("auto", "mean"):
            raise ValueError(
                f"unknown head strategy {self.strategy!r}; known: auto, mean, {', '.join(HEAD_STRATEGIES)}"
            )
        _check_num_heads(self.num_heads)
        if self.strategy == "mean" and self.num_heads is not None:
            raise ValueError("strategy 'mean' uses all heads; num_heads must be None")
        allowed = {o for opts in _STRATEGY_OPTIONS.values() for o in opts}
        unknown = set(self.options) - allowed
        if unknown:
            raise ValueError(f"unknown head-strategy options {sorted(unknown)}; known: {sorted(allowed)}")
        if "k" in self.options and (not isinstance(self.options["k"], int) or self.options["k"] < 1):
            raise ValueError("option k must be an int >= 1")
        if self.head_range is not None:
            lo, hi = (int(v) for v in self.head_range)
            if not 1 <= lo <= hi:
                raise ValueError(f"head_range must satisfy 1 <= lo <= hi, got {self.head_range}")
            self.head_range = (lo, hi)

    @classmethod
    def from_spec(cls, spec: HeadPolicy | str | Mapping[str, Any] | None) -> HeadPolicy:
        """Build from ``prune(..., heads=...)``: ``None`` (mean), a strategy name, a dict or a policy."""
        if isinstance(spec, HeadPolicy):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, str):
            return cls(strategy=spec)
        if isinstance(spec, Mapping):
            return cls(**spec)
        raise TypeError(f"heads must be a strategy name, a dict or a HeadPolicy, not {type(spec).__name__}")

    @property
    def is_mean(self) -> bool:
        return self.strategy == "mean"

    def apply(
        self, attn: torch.Tensor, budget: int | None = None, query_mask: torch.Tensor | None = None
    ) -> HeadSelection:
        """Select heads for ``attn`` (``(B, H, Q, N)`` or ``(B, H, N)``) at visual-token budget ``budget``."""
        return select_heads(
            attn,
            self.strategy,
            self.num_heads,
            budget,
            query_mask=query_mask,
            head_range=self.head_range,
            **self.options,
        )

    def combine(
        self, attn: torch.Tensor, budget: int | None = None, query_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, HeadSelection]:
        """Selected-head mean of ``attn`` (``(B, Q, N)`` or ``(B, N)``) and the selection."""
        sel = self.apply(attn, budget, query_mask)
        return combine_heads(attn, sel.mask), sel
