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

Host syncs (the prefill is host-bound on a GPU: each read empties the queue): a stage reads its facts once,
before scoring — the width of the text rows and their alignment with Step A's text tokens, each sample's
visual and kept count (they give the padded width and the recycling plans); v1 reads its rank-based counts
a second time (and its batched SVD waits for the solver). The rater counts (and v1's ranks) go to the
record, which the engine reads once when the prefill ends; the selection tells the engine whether every slot
is real (``Selection.all_valid``). Recycling clusters the rows of each plan together, selected from a device
sort of the plans (no row numbers are copied over), and each clustering replays as one CUDA graph.

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

from vtprune.cuda_graphs import cuda_graphed
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
    after, n_text = _input_text(signals)
    if width is None:
        width = int(n_text.max())
    return _text_raters(signals, after, width)


def _input_text(signals) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L0) the text tokens of the LLM input (real tokens after its last image) and (B,) their count per
    sample, on the device (the count is checked against the stage's text rows)."""
    vis_index = signals.input_visual_index
    b, length = signals.input_valid.shape
    positions = torch.arange(length, device=vis_index.device).expand(b, length)
    after = (positions > vis_index.max(dim=1).values[:, None]) & signals.input_valid
    return after, after.sum(dim=1)


def _text_raters(signals, after: torch.Tensor, width: int) -> torch.Tensor:
    """Step A: (B, width) raters among the input's text tokens `after`, packed to the left."""
    embeds = signals.input_embeds.float()
    vis_index = signals.input_visual_index
    d = embeds.shape[-1]
    vis_valid = torch.gather(signals.input_valid, 1, vis_index)
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
    return torch.where(none, text_valid, raters)


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
        n_deleted: torch.Tensor,
        plans: list[tuple[int, int]],
    ):
        """Step D: cluster the best dropped tokens into new ones; `plans` = (tokens recycled, clusters) per
        row, `n_deleted` (B,) the rows' dropped tokens on the device. Returns (extra, extra_valid)."""
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
        # Rows of one plan cluster together, in row order. The device sorts the rows by their recycled count
        # (the plan's key; recomputed there exactly as `recycle_counts` does, in double precision) and the
        # host sorts its plans the same way, so each group is a slice of that order: no row numbers travel
        # to the device.
        n_rec = torch.where(n_deleted > 0, torch.trunc(n_deleted.double() * RECYCLE_RATIO) + 1, 0).long()
        by_plan = torch.sort(n_rec, stable=True).indices
        start = 0
        for (n, c), size in _runs(sorted(plans, key=lambda plan: plan[0])):
            rows = slice(None) if size == b else by_plan[start : start + size]
            start += size
            if not c:
                continue
            pick = order[rows, :n]
            x = torch.gather(hidden[rows], 1, pick[:, :, None].expand(-1, -1, hidden.shape[-1]))
            merged, made = _cluster(x, c)
            extra[rows, :c] = merged.to(extra.dtype)
            extra_valid[rows, :c] = made
        return extra, extra_valid

    def select(self, stage_index, stage, signals) -> Selection:
        valid = signals.visual_valid
        n_valid = valid.sum(dim=1)
        after, n_text = _input_text(signals)
        stage_text = signals.text_counts()
        adaptive = self.version == "1" and stage.keep < signals.tokens_per_image
        if self.version == "1":
            counts = n_valid  # the budget keeps everything; else replaced by the rank-adaptive counts below
        else:
            counts = n_valid.clamp(max=stage.keep * signals.images_per_sample)
        # The stage's one host read before scoring (v1.5 / v2.0: its only one): the width of the text rows,
        # their alignment with Step A's text tokens, and the counts, which give the padded width and the
        # recycling plans. The rater counts stay on the device; the engine reads them with the stage record.
        facts = torch.stack([f.long() for f in (stage_text, n_text != stage_text, n_valid, counts)]).tolist()
        text_counts, misaligned, n_host, kept = facts
        if any(misaligned):
            raise RuntimeError("sparsevlm: rater rows do not match the text rows of the stage")
        width = max(text_counts, default=0)
        signals.set_text_width(width)
        raters = _text_raters(signals, after, width)
        replaced = self._v2_attention(signals, raters) if self.version == "2.0" else None
        rows = _RaterRows(signals, raters, replaced)
        first = stage_index == 0
        raw, info = self.attention_scores(rows, "text", budget=stage.keep, debias=False)
        scores = raw
        if first and self._debias is not None:
            scores, info = self.attention_scores(rows, "text", budget=stage.keep, debias=True)
        if adaptive:
            counts, ranks = self._v1_counts(signals, raters, stage.keep)
            kept, info["rank"] = torch.stack([counts, ranks]).tolist()  # v1's second read: its own counts
        indices, ok = topk_counts(scores, counts, valid, width=max(kept, default=0))
        extra = extra_valid = None
        recycled = [0] * indices.shape[0]
        if self.recycle:
            # every kept token is valid, so a row drops n_valid - kept tokens
            plans = [recycle_counts(n - k) for n, k in zip(n_host, kept, strict=True)]
            extra, extra_valid = self._recycle(signals, raw, indices, ok, n_valid - counts, plans)
            recycled = [c for _, c in plans]
        info.update(kept=kept, recycled=recycled, tokens=[k + c for k, c in zip(kept, recycled, strict=True)])
        info["raters"] = raters.sum(dim=1)  # read with the record (Selection.info)
        extra_index = None
        if extra is not None:
            extra_index = torch.full(extra_valid.shape, -1, dtype=torch.long, device=extra.device)
        # Every slot holds a real token when all rows keep the padded width and make as many clusters as
        # the widest: the engine then knows the new sequence's holes without reading them.
        all_valid = all(k == indices.shape[1] for k in kept) and (
            extra is None or all(c == extra.shape[1] for c in recycled)
        )
        return Selection(
            indices,
            valid=ok,
            extra=extra,
            extra_valid=extra_valid,
            extra_index=extra_index,
            scores=scores,
            info=info,
            all_valid=all_valid,
        )


@cuda_graphed
def _cluster(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step D's DPC-kNN (k = C) of one plan's rows: (merged, valid). Tens of small kernels and no host sync,
    so on a GPU it replays as one CUDA graph per shape."""
    out = dpc_knn_cluster(x, clusters, k_neighbors=clusters)
    return out.merged, out.valid


def _runs(items: list) -> list[tuple[object, int]]:
    """(item, run length) of each run of equal consecutive items."""
    runs: list[tuple[object, int]] = []
    for item in items:
        if runs and runs[-1][0] == item:
            runs[-1] = (item, runs[-1][1] + 1)
        else:
            runs.append((item, 1))
    return runs


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
