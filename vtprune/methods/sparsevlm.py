"""SparseVLM — "Visual Token Sparsification for Efficient Vision-Language Model Inference"
(Zhang et al., ICML 2025, arXiv 2410.04417; repo Gumpest/SparseVLMs); docs/methods/sparsevlm.md.

Idea: the text tokens that are relevant to the image ("raters", chosen once from the LLM input embeddings)
judge the visual tokens: at a few sparse layers the visual tokens those raters attend to least are dropped
from the layer's output, and (v1/v1.5) the best of the dropped ones are recycled into a few cluster tokens.

Steps (rows are samples; every step is per sample, so a batch behaves as its samples run alone):

* A (once): raters = the tokens after the (last) image whose mean, over the visual tokens, of the
  text-axis softmax of ``H_v · H_qᵀ`` (projected image embeddings × text embeddings, raw dot products,
  float32 here) is strictly above its mean.
* B (at each sparse layer l, which runs on all current tokens): head-mean attention of layer l, rows =
  raters, columns = the current visual tokens, mean over the raters (``attention_scores`` with the rater
  rows, so ``heads``/``num_heads``/``debias`` apply; debiasing touches the first stage only).
* C (how many): ``version="1.5"`` (default, the ICML numbers) keeps a fixed count per stage from the
  schedule of the budget (per image, LLaVA-1.5 frame of 576 tokens per image):
  192 → 300/200/110, 128 → 303/110/36, 96 → 238/48/26, 64 → 66/30/17.
  ``version="2.0"`` (SparseVLM+): 192 → 300/200/118, 128 → 238/108/60, 96 → 246/54/28, 64 → 66/34/20.
  Any other budget (or a model whose images do not have 576 tokens) scales the 192 schedule
  proportionally: ``count = round(c · keep / 192)`` clipped to [1, tokens per image]; an explicit
  ``schedule`` overrides both. ``version="1"`` is rank-adaptive: ``rank`` = numerical rank
  (``torch.linalg.matrix_rank`` default tolerance) of the rater × visual block of the head-mean
  attention, ``keep = min(int(rank · scale + bias), n_vis − 1)`` per sample (nothing is dropped when
  ``rank == n_vis``), so samples keep different counts (``Selection.valid``). ``scale``/``bias`` default
  by budget to the README's examples: 192 → (13.5, 0), 128 → (9, 6), 64 → (0.8, 0); otherwise (13.5, 0).
* D (v1/v1.5, ``recycle=True``): of the dropped tokens, the top ``int(0.3·N_del) + 1`` by the (not
  debiased) score are clustered with DPC-kNN (``selection.dpc_knn_cluster``, k = C) into
  ``C = int(n_rec / 10) + 1`` tokens (member means of layer l's output), placed right after the kept
  visual tokens in centre order; they are visual tokens for the later stages.
* E (v2.0): attention probabilities are divided by the RoPE prior of all-ones q/k at the current
  positions (``q₁·k₁ᵀ/√d``), only the ``priority_heads`` (14) heads with the largest rater→visual mass are
  averaged, no recycling, original position ids.

Layers: ``layers`` = the sparse layers l (score layer l runs on everything, layers ≥ l+1 see the pruned
set): default [2, 6, 15] (v1.5, v2.0) and [2, 6, 15, 19] (v1). v1/v1.5 re-index positions after each
stage, v2.0 keeps the original ones. The record holds, per stage, the count including recycled tokens
(``info``: ``kept``, ``recycled``, ``tokens`` = kept + recycled, ``raters``; v1 also ``rank``).

Budget accounting: the schedules hit their budget under the repo's count of the visual tokens *after*
each layer's pruning (192 → 309/204/113 gives 192.0 over 32 layers); vtprune's record counts the tokens
*entering* each layer (the sparse layer itself still runs on the unpruned set), 206.5 for the same run.

Parameters: keep (budget per image, default 192 of 576 — a third of the tokens per image on other
models), version ("1.5" | "1" | "2.0"), layers,
schedule, recycle (None = on for v1/v1.5, off for v2.0), scale, bias, priority_heads (14), and the
attention options heads, num_heads, debias, debias_strength, benchmark.

Debiasing as the released patch (intcomp/attention-bias `patches/SparseVLMs.patch` @ e75ebe7, against
SparseVLMs 734d900): the first sparse layer's rater score only; "sink" drops the patches whose validity,
bilinearly resized to the patch grid, is below 0.5 — read here as "more than half padding"; the keep
count is not capped; recycling ranks with the plain score.

Deviations from the official code (Gumpest/SparseVLMs: v1.5 @ b9619e6, v1 @ b72c5d6, v2.0 @ 26a5f48; the
official code runs batch size 1 in fp16):
* keep ≥ tokens per image keeps everything (no stage drops or recycles); a schedule count ≥ the current
  visual count keeps all of them (the official ``min(count, n − 1)`` would still drop one token). Neither
  happens with the paper budgets on LLaVA-1.5.
* Scores and the rater softmax in float32; ties go to the lower index; DPC-kNN breaks density ties by the
  lower index instead of the official 1e-6 random jitter.
* v1's rank is taken from the plain head-mean block whatever ``heads`` selects for the scores.
* A sample with no rater (a single text token) uses every text token as rater (the official code would
  average an empty set, NaN). v1 keeps at least one token.
* v2.0's priority heads are skipped when ``heads``/``num_heads`` choose the heads (the option wins); on a
  model with fewer than ``priority_heads`` heads all heads are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtprune.errors import PruneConfigError
from vtprune.methods.base import AttentionMethod, ModelInfo, Selection, Stage, bounded, register, resolve_keep
from vtprune.selection import dpc_knn_cluster, rank_tokens, topk_counts

PAPER_TOKENS = 576  # tokens per image of LLaVA-1.5, the frame the schedules are written in

SCHEDULES: dict[str, dict[int, tuple[int, ...]]] = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
V1_SCALE_BIAS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
DEFAULT_LAYERS = {"1": (2, 6, 15, 19), "1.5": (2, 6, 15), "2.0": (2, 6, 15)}
RECYCLE_RATIO = 0.3  # τ: share of the dropped tokens that are recycled
VERSIONS = ("1", "1.5", "2.0")


def sparsevlm_schedule(version: str, keep: int, tokens_per_image: int) -> tuple[int, ...]:
    """Per-image keep counts of the three sparse layers for a budget (v1.5 / v2.0), see the module doc."""
    if keep >= tokens_per_image:
        return (tokens_per_image,) * 3
    table = SCHEDULES[version]
    if tokens_per_image == PAPER_TOKENS and keep in table:
        return table[keep]
    return tuple(min(tokens_per_image, max(1, round(c * keep / 192))) for c in table[192])


def recycle_counts(n_deleted: int) -> tuple[int, int]:
    """(tokens recycled, clusters) for `n_deleted` dropped tokens (Step D: τ = 30 %, θ = 1/10)."""
    if n_deleted <= 0:
        return 0, 0
    n_rec = int(n_deleted * RECYCLE_RATIO) + 1
    return n_rec, int(n_rec / 10) + 1


class _RaterRows:
    """Stands in for the stage's LLMSignals inside `attention_scores`: the "text" rows limited to the raters,
    optionally with replaced probabilities (v2.0's corrected, head-selected attention)."""

    def __init__(self, signals, raters: torch.Tensor, attn: torch.Tensor | None = None):
        self._signals = signals
        self._raters = raters
        self._attn = attn

    def __getattr__(self, name):
        return getattr(self._signals, name)

    def attention(self, queries: str = "text"):
        attn, valid = self._signals.attention(queries)
        if self._attn is not None:
            attn = self._attn
        return attn, valid & self._raters


def text_raters(signals, width: int | None = None) -> torch.Tensor:
    """(B, Lt) Step A raters, aligned with the rows of ``signals.attention("text")``.

    ``width`` = Lt, the width of those rows when the caller knows it (it saves a host sync); by default it
    is the most text tokens of a sample."""
    return _text_raters(signals, width)[0]


def _text_raters(signals, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step A: (B, Lt) raters and (B,) each sample's text tokens (to check the alignment with the text rows)."""
    embeds = signals.input_embeds.float()
    vis_index = signals.input_visual_index
    b, length, d = embeds.shape
    vis_valid = torch.gather(signals.input_valid, 1, vis_index)
    positions = torch.arange(length, device=embeds.device).expand(b, length)
    after = (positions > vis_index.max(dim=1).values[:, None]) & signals.input_valid
    n_text = after.sum(dim=1)
    if width is None:
        width = int(n_text.max())
    order = torch.sort((~after).to(torch.int8), dim=1, stable=True).indices[:, :width]
    text_valid = torch.gather(after, 1, order)
    h_v = torch.gather(embeds, 1, vis_index[:, :, None].expand(-1, -1, d))
    h_q = torch.gather(embeds, 1, order[:, :, None].expand(-1, -1, d))
    logits = (h_v @ h_q.transpose(1, 2)).masked_fill(~text_valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).masked_fill(~vis_valid[:, :, None], 0.0)
    r = probs.sum(dim=1) / vis_valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (r * text_valid).sum(dim=1, keepdim=True) / text_valid.sum(dim=1, keepdim=True).clamp(min=1)
    raters = (r > mean) & text_valid
    none = ~raters.any(dim=1, keepdim=True)
    return torch.where(none, text_valid, raters), n_text


def rope_prior(signals, rows: torch.Tensor) -> torch.Tensor:
    """(B, Q, V) v2.0 prior: RoPE-rotated all-ones query (at `rows`) · all-ones key (at the visual tokens)
    / sqrt(head_dim), at the current position ids."""
    cos, sin = signals.adapter.rotary(signals.hidden, signals.position_ids)
    cos = cos.float().expand(signals.hidden.shape[0], -1, -1)
    sin = sin.float().expand(signals.hidden.shape[0], -1, -1)
    d = cos.shape[-1]
    half = torch.ones(d, device=cos.device)  # made on the device: a host-to-device copy would sync
    half[: d // 2] = -1.0
    rotated = cos + half * sin  # q_embed of q = 1: 1·cos + rotate_half(1)·sin
    q = torch.gather(rotated, 1, rows[:, :, None].expand(-1, -1, d))
    k = torch.gather(rotated, 1, signals.visual_index[:, :, None].expand(-1, -1, d))
    return (q @ k.transpose(1, 2)) / d**0.5


@register
@dataclass
class SparseVLM(AttentionMethod):
    """Text-rater-guided progressive pruning inside the LLM with token recycling."""

    version: str | int | float = "1.5"  # numbers too: a command line reads version=2.0 as a float
    layers: tuple[int, ...] | None = bounded(None, ge=0)
    schedule: tuple[int, ...] | None = bounded(None, ge=1)
    recycle: bool | None = None
    scale: float | None = bounded(None, gt=0)
    bias: float | None = None
    priority_heads: int = bounded(14, ge=1)

    name = "sparsevlm"
    stage_kind = "llm"
    paper = "arXiv 2410.04417"
    default_keep: ClassVar[int] = 192

    def __post_init__(self) -> None:
        super().__post_init__()
        self.version = str(self.version)
        if self.version == "2":
            self.version = "2.0"
        if self.version not in VERSIONS:
            raise PruneConfigError(f"sparsevlm: version={self.version!r}; valid: {', '.join(VERSIONS)}")
        if self.layers is not None and (not self.layers or list(self.layers) != sorted(set(self.layers))):
            raise PruneConfigError(f"sparsevlm: layers={self.layers} must be increasing layer indices >= 0")
        if self.schedule is not None and self.version == "1":
            raise PruneConfigError("sparsevlm: version 1 is rank-adaptive; schedule applies to 1.5 and 2.0")
        if self.recycle is None:
            self.recycle = self.version != "2.0"
        if self.recycle and self.version == "2.0":
            raise PruneConfigError(
                "sparsevlm: version 2.0 keeps original positions and cannot recycle (recycle=False)"
            )

    # --- planning -----------------------------------------------------------------------------------------
    def sparse_layers(self) -> tuple[int, ...]:
        return self.layers if self.layers is not None else DEFAULT_LAYERS[self.version]

    def budget(self, info: ModelInfo) -> int:
        """Layer-average budget per image: keep, or 192 of 576 (the same third on other token counts)."""
        return self.keep_count(info, max(1, round(info.visual_tokens * self.default_keep / PAPER_TOKENS)))

    def counts(self, info: ModelInfo) -> tuple[int, ...]:
        """Per-image keep count of each stage (v1: the budget, an upper bound only)."""
        layers = self.sparse_layers()
        keep = self.budget(info)
        if self.version == "1":
            return (keep,) * len(layers)
        if self.schedule is not None:
            counts = tuple(resolve_keep(c, info.visual_tokens, "schedule count") for c in self.schedule)
        else:
            counts = sparsevlm_schedule(self.version, keep, info.visual_tokens)
        if len(counts) != len(layers):
            raise PruneConfigError(
                f"sparsevlm: {len(layers)} sparse layers {list(layers)} need {len(layers)} schedule counts, "
                f"got {list(counts)} (pass schedule=...)"
            )
        return counts

    def scale_bias(self, budget: int, tokens_per_image: int) -> tuple[float, float]:
        """v1's (λ, bias): explicit values, else the README example of the budget on LLaVA-1.5, else (13.5, 0)."""
        default = V1_SCALE_BIAS.get(budget, (13.5, 0.0)) if tokens_per_image == PAPER_TOKENS else (13.5, 0.0)
        return (
            self.scale if self.scale is not None else default[0],
            self.bias if self.bias is not None else default[1],
        )

    def stages(self, info: ModelInfo) -> list[Stage]:
        positions = "original" if self.version == "2.0" else "reindex"
        return [
            Stage.before_layer(layer + 1, k, queries="text", name=f"sparsevlm@{layer}", positions=positions)
            for layer, k in zip(self.sparse_layers(), self.counts(info), strict=True)
        ]

    def validate_for(self, info: ModelInfo) -> None:
        last = info.num_layers - 2
        bad = [layer for layer in self.sparse_layers() if not 0 <= layer <= last]
        if bad:
            raise PruneConfigError(
                f"sparsevlm: sparse layers {bad} out of range; layer l runs on all tokens and layer l+1 must "
                f"exist (valid: 0..{last})"
            )
        super().validate_for(info)

    # --- selection ----------------------------------------------------------------------------------------
    def _v2_attention(self, signals, raters: torch.Tensor) -> torch.Tensor | None:
        """Step E: prior-corrected probabilities, restricted to the priority heads (None: nothing to replace)."""
        attn, _ = signals.attention("text")
        rows, _ = signals.query_index("text")
        attn = attn.float() / rope_prior(signals, rows)[:, None]
        if not self._head_policy.is_mean:
            return attn
        heads = min(self.priority_heads, attn.shape[1])
        mass = (attn * raters[:, None, :, None] * signals.visual_valid[:, None, None, :]).sum(dim=(2, 3))
        top = torch.sort(mass, dim=1, descending=True, stable=True).indices[:, :heads]
        return torch.gather(attn, 1, top[:, :, None, None].expand(-1, -1, attn.shape[2], attn.shape[3]))

    def _v1_counts(self, signals, raters: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) keep counts and (B,) ranks of the rater × visual blocks, all on the device (no host sync
        beyond the one the batched SVD makes on CUDA)."""
        attn, _ = signals.attention("text")
        block = attn.float().mean(dim=1)  # (B, Q, V) head mean, as the official rank
        scale, bias = self.scale_bias(budget, signals.tokens_per_image)
        ranks = batched_block_rank(block, raters, signals.visual_valid)
        n = signals.visual_valid.sum(dim=1)
        # int(rank · scale + bias) in double precision, as Python computes it, truncated toward zero
        adaptive = torch.trunc(ranks.double() * scale + bias)
        adaptive = torch.minimum(adaptive, (n - 1).double()).clamp(min=1).long()
        return torch.where(ranks == n, n, adaptive), ranks

    def _recycle(
        self,
        signals,
        scores: torch.Tensor,
        kept: torch.Tensor,
        kept_valid: torch.Tensor,
        plans: list[tuple[int, int]],
    ):
        """Step D: cluster the best dropped tokens into new ones; `plans` = (tokens recycled, clusters) per
        row. Returns (extra, extra_valid)."""
        width = max((c for _, c in plans), default=0)
        if width == 0:
            return None, None
        valid = signals.visual_valid
        b, v = valid.shape
        kept_mask = torch.zeros(b, v + 1, dtype=torch.bool, device=valid.device)  # column v: unused slots
        kept_mask.scatter_(1, torch.where(kept_valid, kept, v), True)
        dropped = valid & ~kept_mask[:, :v]
        hidden = signals.visual_hidden()
        order, _ = rank_tokens(scores, dropped)
        extra = hidden.new_zeros(b, width, hidden.shape[-1])
        extra_valid = torch.zeros(b, width, dtype=torch.bool, device=hidden.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for row, plan in enumerate(plans):
            if plan[1]:
                groups.setdefault(plan, []).append(row)
        for (n_rec, c), rows in groups.items():
            # rows of one plan cluster together; a non-blocking copy of their numbers does not wait for the device
            idx = slice(None) if len(rows) == b else torch.tensor(rows).to(hidden.device, non_blocking=True)
            pick = order[idx, :n_rec]
            x = torch.gather(hidden[idx], 1, pick[:, :, None].expand(-1, -1, hidden.shape[-1]))
            clusters = dpc_knn_cluster(x, c, k_neighbors=c)
            extra[idx, :c] = clusters.merged.to(extra.dtype)
            extra_valid[idx, :c] = clusters.valid
        return extra, extra_valid

    def select(self, stage_index, stage, signals) -> Selection:
        attn, text_rows = signals.attention("text")
        raters, n_text = _text_raters(signals, width=attn.shape[2])
        replaced = self._v2_attention(signals, raters) if self.version == "2.0" else None
        rows = _RaterRows(signals, raters, replaced)
        first = stage_index == 0
        raw, info = self.attention_scores(rows, "text", budget=stage.keep, debias=False)
        scores = raw
        if first and self._debias is not None:
            scores, info = self.attention_scores(rows, "text", budget=stage.keep, debias=True)
        valid = signals.visual_valid
        n_valid = valid.sum(dim=1)
        ranks = None
        if self.version == "1" and stage.keep < signals.tokens_per_image:
            counts, ranks = self._v1_counts(signals, raters, stage.keep)
        elif self.version == "1":
            counts = n_valid  # keep >= tokens per image: keep everything
        else:
            counts = n_valid.clamp(max=stage.keep * signals.images_per_sample)
        # The stage's one host sync for its counts: the padded width, the recycling plans and the record.
        facts = [counts, n_valid, raters.sum(dim=1), n_text != text_rows.sum(dim=1)]
        if ranks is not None:
            facts.append(ranks)
        host = torch.stack([f.long() for f in facts]).tolist()
        kept, n_host, n_raters, misaligned = host[:4]
        if any(misaligned):
            raise RuntimeError("sparsevlm: rater rows do not match the text rows of the stage")
        indices, ok = topk_counts(scores, counts, valid, width=max(kept, default=0))
        extra = extra_valid = None
        recycled = [0] * indices.shape[0]
        if self.recycle:
            # every kept token is valid, so a row drops n_valid - kept tokens
            plans = [recycle_counts(n - k) for n, k in zip(n_host, kept, strict=True)]
            extra, extra_valid = self._recycle(signals, raw, indices, ok, plans)
            recycled = [c for _, c in plans]
        if ranks is not None:
            info["rank"] = host[4]
        info.update(
            kept=kept,
            recycled=recycled,
            tokens=[k + c for k, c in zip(kept, recycled, strict=True)],
            raters=n_raters,
        )
        extra_index = None
        if extra is not None:
            extra_index = torch.full(extra_valid.shape, -1, dtype=torch.long, device=extra.device)
        return Selection(
            indices,
            valid=ok,
            extra=extra,
            extra_valid=extra_valid,
            extra_index=extra_index,
            scores=scores,
            info=info,
        )


def batched_block_rank(block: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B,) numerical rank of each sample's block ``block[b][rows[b]][:, cols[b]]`` with
    ``torch.linalg.matrix_rank``'s default tolerance for that unpadded (m_b, n_b) block, in one batched call.

    The selected rows and columns are moved to the top-left of a zero (B, R, C) tensor (zero rows and columns
    add only zero singular values) and each sample gets its own relative tolerance ``max(m_b, n_b)·eps``
    (the default of an (m_b, n_b) matrix; R × C would give a larger one). A block with no row or no column
    has rank 0."""
    b, r, c = block.shape
    if r == 0 or c == 0:
        return torch.zeros(b, dtype=torch.long, device=block.device)
    row_order = torch.sort((~rows).to(torch.int8), dim=1, stable=True).indices  # selected rows first
    col_order = torch.sort((~cols).to(torch.int8), dim=1, stable=True).indices
    row_ok = torch.gather(rows, 1, row_order)
    col_ok = torch.gather(cols, 1, col_order)
    packed = torch.gather(block, 1, row_order[:, :, None].expand(-1, -1, c))
    packed = torch.gather(packed, 2, col_order[:, None, :].expand(-1, r, -1))
    packed = packed.masked_fill(~(row_ok[:, :, None] & col_ok[:, None, :]), 0.0)
    m, n = rows.sum(dim=1), cols.sum(dim=1)
    # in the block's dtype, as matrix_rank's own (0-dim) default promotes: max(m, n)·eps is exact there
    rtol = torch.maximum(m, n).to(block.dtype) * torch.finfo(block.dtype).eps
    return torch.linalg.matrix_rank(packed, rtol=rtol)
