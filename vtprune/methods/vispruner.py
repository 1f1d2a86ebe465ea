"""VisPruner — "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(Zhang et al., ICCV 2025, arXiv 2412.01818; v1 = FasterVLM).

Idea: keep a few *important* tokens by the vision tower's [CLS] attention, then fill the rest of the
budget with *diverse* tokens by repeatedly deleting, among the remaining ones, those most similar to
others; before the LLM, kept tokens in raster order (docs/methods/vispruner.md).
Optional sink exclusion (a vtprune variant, `vispruner_nosink`): patches whose head-mean [CLS] attention exceeds
`attention_sink_threshold` are treated as attention sinks and never selected.

Parameters: keep (T, default 64), important_ratio=0.5, removal_number=8 (tokens deleted per
duplicate-removal round — the seed's "maximum number of tokens removed per image" read as the per-round
cap), attention_sink_threshold=None (0.02 for `vispruner_nosink`). Budgets 64 / 128 / 192 use r = 0.5 (the
paper default; the per-benchmark r of the paper table is not published); any other budget is honoured
exactly with the same r.
Seed-script names are accepted as aliases: `retain_img_tokens` for keep and `vispruner_ratio` for
important_ratio. They are folded into keep / important_ratio when the method is built (and then read
None), so records and `dataclasses.replace` see one value; giving both names with different values is an
error.

Ties (deterministic, `vispruner_select` below): equal [CLS] attention ranks the lower index
first; in a duplicate-removal round, members of A with equal best-match similarity keep their order in A
(the residual's attention order), so the earlier one is deleted first. Cosines within 1e-6 of 1 count as
exactly 1, so near-identical patches tie instead of being told apart by float noise.

Deviations from the official code (Theia-4869/VisPruner `llava/model/llava_arch.py` @ aefa01a):
* exact ties: the official `argsort(descending=True)` leaves their order to the backend; vtprune breaks
  them as above (issue 20);
* an odd residual list: the official code sizes a round's deletion with |R| // 2 columns, which fails when
  |R| is odd; vtprune uses the actual |A| = ⌈|R| / 2⌉ (unreachable with 576 tokens and the usual budgets);
* the [CLS] attention comes from the feature layer's q/k (SDPA tower, float32), not from an eager tower's
  `output_attentions`; batches with different valid masks per image are supported;
* `attention_sink_threshold` (`vispruner_nosink`) is not in the official code: the sinks are
  excluded from both selections, so keep = all tokens is not the unmodified model for that variant.
* LLaVA-NeXT: the official rule (an equal budget per view, each with its own [CLS]) is `crop_budget="crop"`,
  the default (`vtprune.methods.base.CropBudget`); the official code's 672 x 672 pin with no
  unpadding and no `image_newline` is not the HF model's input and is not reproduced.
* Qwen2-VL / Qwen2.5-VL (no [CLS], no official port): the [CLS] attention is replaced by the attention each
  token receives in the tower's last full-attention block (`vtprune.models.qwen2_vl`, `token_importance`);
  each image is one tower input, so the per-crop rule is the per-image rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.cuda_graphs import cuda_graphed
from vtprune.errors import PruneConfigError
from vtprune.kernels.greedy import fused_enabled, vispruner_rounds_fused
from vtprune.methods.base import (
    CropBudget,
    Method,
    Selection,
    bounded,
    check_fields,
    register,
)
from vtprune.selection import (
    Picked,
    check_2d,
    check_count,
    check_features,
    check_valid,
    cosine_matrix,
    picked_from,
    rank_tokens,
)


def _residual_bounds(residual: int, diverse: int, removal_per_round: int) -> list[int]:
    """|R| before each duplicate-removal round of VisPruner, starting from ``residual`` tokens.

    Each round removes ``min(removal_per_round, n - diverse, ceil(n / 2))`` tokens. ``n -> n - r_step``
    is non-decreasing in ``n``, so a sample with fewer residual tokens is never behind a larger one: the
    batched code runs the rounds of the largest residual (valid masks make residuals differ) and lets
    finished samples do no-op rounds.
    """
    if removal_per_round < 1:
        raise ValueError(f"removal_per_round must be >= 1; got {removal_per_round}")
    sizes = []
    while residual > diverse:
        sizes.append(residual)
        residual -= min(removal_per_round, residual - diverse, (residual + 1) // 2)
    return sizes


_TRAJECTORIES: dict = {}


def _trajectories(length: int, diverse: int, removal_per_round: int, rounds: int, device) -> Tensor:
    """(length + 1, rounds + 1) int32: row n0 is |R| before each round (then after the last) of a sample whose
    residual starts with n0 tokens — the update ``n -> n - max(0, min(removal_per_round, n - diverse,
    ceil(n / 2)))`` of every round. Built on the device once per (length, diverse, cap, rounds, device),
    so that a batch's per-round counts are one lookup, with no host data and no host sync."""
    key = (length, diverse, removal_per_round, rounds, str(device))
    table = _TRAJECTORIES.get(key)
    if table is None:
        n = torch.arange(length + 1, device=device)
        columns = [n]
        for _ in range(rounds):
            step = torch.minimum((n - diverse).clamp(max=removal_per_round), (n + 1) // 2).clamp_min(0)
            n = n - step
            columns.append(n)
        table = torch.stack(columns, dim=1).int()
        # kept for the process (never freed: a captured CUDA graph of `_vispruner_select` reads it); one per
        # budget and residual width (138 KiB for 576 patches at keep 64). Made inside someone else's capture,
        # it stays that capture's.
        if not (table.is_cuda and torch.cuda.is_current_stream_capturing()):
            _TRAJECTORIES[key] = table
    return table


def _removal_rounds(
    features: Tensor,
    res: Tensor,
    res_ok: Tensor | None,
    n_res: Tensor,
    t_div: int,
    removal_per_round: int,
    bounds: list[int],
    dup_tol: float,
) -> tuple[Tensor, Tensor]:
    """The duplicate-removal rounds of `vispruner_select` (step 3) in a few kernels per round.

    res (B, L): residual lists (valid prefix of n_res (B,) tokens, `res_ok` marks it; None: all valid).
    Returns (the final lists, their lengths); slots past a row's length are unspecified.

    Per round: the Gram entries of every (a, b) pair in one indexing op, m(a) by one max, A sorted, and the
    new list in one or two copies. Invalid slots hold the index N, whose Gram row and column are -inf: a
    padded b never wins a max and a padded a sorts after every real one (stable: after the real ones of
    equal m, which come first in A), so no per-round masks are needed. How many tokens each row deletes in
    each round depends only on its starting |R|, so it is looked up once for all rounds
    (`_trajectories`). A row that is finished (|R| <= T_div) still has its list reordered (sorted A, then
    B): the set of its first |R| slots, all that is read, stays the same.
    """
    b, n, _ = features.shape
    dev = features.device
    gram = cosine_matrix(features, dup_tol)
    rows = torch.arange(b, device=dev)[:, None, None]
    if res_ok is None:
        # every row has the largest residual: the deletions of each round are Python ints
        for index, cur in enumerate(bounds):
            following = bounds[index + 1] if index + 1 < len(bounds) else t_div
            a_idx, b_idx = res[:, 0:cur:2], res[:, 1:cur:2]
            m = gram[rows, a_idx[:, :, None], b_idx[:, None, :]].amax(dim=-1)
            perm = torch.sort(m, dim=-1, descending=True, stable=True).indices
            res = torch.cat([a_idx.gather(1, perm)[:, cur - following :], b_idx], dim=1)
        return res, n_res - (bounds[0] - res.shape[1])
    # invalid slots -> N, whose Gram row and column are -inf
    padded = gram.new_full((b, n + 1, n + 1), float("-inf"))
    padded[:, :n, :n] = gram
    res = torch.where(res_ok, res, n)
    rounds = len(bounds)
    table = _trajectories(res.shape[1], t_div, removal_per_round, rounds, dev)
    sizes = table[n_res].long()  # (B, rounds + 1): |R| before each round, then the final one
    before, deleted = sizes[:, :-1], sizes[:, :-1] - sizes[:, 1:]  # (B, rounds)
    width = table[-1].long()  # (rounds + 1,) the largest residual's |R| = `bounds`, then T_div
    # where slot j of the new list comes from in [sorted A | B | an invalid slot]:
    # j < |A| - r: sorted A's j + r; then B's j - (|A| - r) while j < |R| - r; then the invalid slot
    j = torch.arange(bounds[0], device=dev)[None, None, :]
    survivors = ((before + 1) // 2 - deleted)[:, :, None]
    a_width = ((width[:-1] + 1) // 2)[None, :, None]
    source = torch.where(
        j < survivors,
        j + deleted[:, :, None],
        torch.where(j < (before - deleted)[:, :, None], j - survivors + a_width, width[:-1][None, :, None]),
    )  # (B, rounds, L)
    last = torch.full((b, 1), n, dtype=res.dtype, device=dev)
    for index, cur in enumerate(bounds):
        following = bounds[index + 1] if index + 1 < len(bounds) else t_div
        a_idx, b_idx = res[:, 0:cur:2], res[:, 1:cur:2]
        m = padded[rows, a_idx[:, :, None], b_idx[:, None, :]].amax(dim=-1)
        perm = torch.sort(m, dim=-1, descending=True, stable=True).indices
        res = torch.cat([a_idx.gather(1, perm), b_idx, last], dim=1).gather(1, source[:, index, :following])
    return res, sizes[:, -1]


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
    """VisPruner: important tokens by [CLS] attention, then diverse tokens by duplicate removal.

    The paper's rule (arXiv 2412.01818, official code Theia-4869/VisPruner), vectorised over the batch:

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

    ``removal_per_round`` is the cap on tokens deleted per round (the paper uses 8; it is the seed scripts'
    ``removal_number``). Invalid tokens (e.g. attention sinks, `vispruner_nosink`) take part in neither the
    important nor the diverse selection. Cosines are computed once as a Gram matrix of the L2-normalised
    features (float32); values within ``dup_tol`` of 1 are snapped to 1 so duplicates tie exactly.
    The torch rounds (`_removal_rounds`) take one indexing op, a max, a stable sort and one or two copies each,
    with no host sync (the per-round deletion counts of every row are looked up once); the whole selection is
    replayed as a CUDA graph on a GPU (`vtprune.cuda_graphs`).

    Args:
        cls_attn: ``(B, N)`` head-mean [CLS]→patch attention.
        features: ``(B, N, D)`` patch features (CLIP layer 22, pre-projector).
        keep: total tokens to keep, ``0 <= keep <= N``.
        important_ratio: fraction ``r`` of ``keep`` chosen by attention.
        removal_per_round: maximum deletions per duplicate-removal round (>= 1).
        valid: optional ``(B, N)`` bool mask of candidate tokens.

    With ``VTPRUNE_TRITON_VISPRUNER=1`` the rounds run on CUDA as one fused Triton kernel
    (:func:`vtprune.kernels.greedy.vispruner_rounds_fused`; off by default: slower than the torch rounds on an
    H200) with the same selection (only comparisons and maxima of the same
    Gram matrix; inputs with NaN features are the exception: there the two paths may differ).

    Returns:
        :class:`Picked` with ``indices (B, keep)`` in raster order.
    """
    check_2d("cls_attn", cls_attn)
    b, n = cls_attn.shape
    check_features("features", features, b, n)
    check_count("keep", keep, n)
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1]; got {important_ratio}")
    if removal_per_round < 1:
        raise ValueError(f"removal_per_round must be >= 1; got {removal_per_round}")
    # Opt-in: on an H200 the fused rounds were slower than the graph-replayed torch rounds (16 x 576: 7.1 vs
    # 6.1 ms at keep 64; 4 x 2,928: 288 vs 44 ms; benchmarks/results/nvidia-h200-2026-12-02-speed/greedy.json).
    fused = os.environ.get("VTPRUNE_TRITON_VISPRUNER") == "1" and fused_enabled(cls_attn, n)
    return _vispruner_select(
        cls_attn, features, keep, important_ratio, removal_per_round, valid, dup_tol=dup_tol, fused=fused
    )


@cuda_graphed
def _vispruner_select(
    cls_attn: Tensor,
    features: Tensor,
    keep: int,
    important_ratio: float,
    removal_per_round: int,
    valid: Tensor | None,
    *,
    dup_tol: float,
    fused: bool,
) -> Picked:
    # `fused` is an argument so that it is part of the CUDA-graph cache key
    b, n = cls_attn.shape
    dev = cls_attn.device
    v = None if valid is None else check_valid(valid, b, n, dev)

    t_imp = int(keep * important_ratio)
    t_div = keep - t_imp
    order, order_ok = rank_tokens(cls_attn, v)
    imp, imp_ok = order[:, :t_imp], order_ok[:, :t_imp]
    if t_div == 0:
        return picked_from(imp, imp_ok)

    res = order[:, t_imp:]  # (B, L): valid residual tokens form a prefix, in descending attention
    n_res = order_ok[:, t_imp:].sum(dim=-1)  # (B,) current |R| per sample
    # |R| of the largest possible residual before each round (Python ints, no sync). Every sample's |R|
    # stays <= this bound (the update n -> n - r_step is monotone), so each round only needs that prefix.
    bounds = _residual_bounds(res.shape[1], t_div, removal_per_round)
    got = None
    if bounds and fused:
        got = vispruner_rounds_fused(cosine_matrix(features, dup_tol), res, n_res, t_div, removal_per_round)
    if got is not None:
        res, n_res = got
    elif bounds:
        res_ok = None if v is None else order_ok[:, t_imp:]
        res, n_res = _removal_rounds(features, res, res_ok, n_res, t_div, removal_per_round, bounds, dup_tol)
    div = res[:, :t_div]
    div_ok = torch.arange(t_div, device=dev).unsqueeze(0) < n_res.unsqueeze(1)
    return picked_from(torch.cat([imp, div], dim=1), torch.cat([imp_ok, div_ok], dim=1))


@register
@dataclass
class VisPruner(Method):
    """Important tokens by [CLS] attention + diverse tokens by similarity-based removal."""

    important_ratio: float = bounded(0.5, ge=0, le=1)
    removal_number: int = bounded(8, ge=1)
    attention_sink_threshold: float | None = bounded(None, gt=0, le=1)
    retain_img_tokens: int | float | None = None  # alias of keep (seed 000)
    vispruner_ratio: float | None = None  # alias of important_ratio (seed 000)
    crop_budget: CropBudget = "crop"  # LLaVA-NeXT: an equal share per tower input (official rule)

    name = "vispruner"
    stage_kind = "vision"
    paper = "arXiv 2412.01818"

    def __post_init__(self) -> None:
        check_fields(self)  # the aliases' types, before they are folded into keep / important_ratio
        if self.retain_img_tokens is not None:
            if self.keep is not None and self.keep != self.retain_img_tokens:
                raise PruneConfigError(
                    f"{self.name}: keep={self.keep} and its alias retain_img_tokens={self.retain_img_tokens} differ"
                )
            self.keep, self.retain_img_tokens = self.retain_img_tokens, None
        if self.vispruner_ratio is not None:
            default = type(self).__dataclass_fields__["important_ratio"].default
            if self.important_ratio not in (default, self.vispruner_ratio):
                raise PruneConfigError(
                    f"{self.name}: important_ratio={self.important_ratio} and its alias "
                    f"vispruner_ratio={self.vispruner_ratio} differ"
                )
            self.important_ratio, self.vispruner_ratio = self.vispruner_ratio, None
        super().__post_init__()

    def sink_mask(self, cls_attention: torch.Tensor) -> torch.Tensor | None:
        if self.attention_sink_threshold is None:
            return None
        return cls_attention > self.attention_sink_threshold

    def select(self, stage_index, stage, signals) -> Selection:
        attention = signals.cls_attention
        sinks = self.sink_mask(attention)
        valid = None if sinks is None else ~sinks
        picked = vispruner_select(
            attention,
            signals.features,
            stage.keep,
            important_ratio=self.important_ratio,
            removal_per_round=self.removal_number,
            valid=valid,
        )
        # a tensor: read with the stage's record, no host sync here
        info = {} if sinks is None else {"sinks": sinks.sum(dim=1)}
        return Selection(*picked, scores=attention, info=info, all_valid=True if valid is None else None)


@register
@dataclass
class VisPrunerNoSink(VisPruner):
    """VisPruner that never selects attention-sink patches ([CLS] attention above a threshold)."""

    attention_sink_threshold: float | None = 0.02

    name = "vispruner_nosink"
