"""TokenCarve — "Information-Preserving Visual Token Compression in Multimodal Large Language Models"
(Tan et al., arXiv 2503.10501; repo ShawnTan86/TokenCarve); docs/methods/tokencarve.md.

Idea: after layer K−1 the image tokens are ranked twice — by the last prompt token's attention (AV) and
by their "information contribution" (SV: row-wise L1 norm of U·S from the SVD of the image rows of layer
K−1's output) — the two rankings are fused by a Borda count (weight w on AV), the top 1.5·N survive and the
least distinct half of them is merged by similarity into the rest until N remain (GSM). The merged hidden
states replace the kept tokens entering layer K (`Selection.values`); kept tokens are in raster order with
their original positions. The work is `tokencarve_fuse_and_merge` below.

Budget: keep = N, the visual tokens per image entering layer K and every later layer ("keep T after K",
not a layer average); default 128 (the README's 576 → 128). 64/128/192 are the paper's N with its
settings K=2, w=0.5. keep ≥ tokens per image keeps everything unchanged.

Parameters: keep, K (2), weight (0.5; 1.0 = AV-only, 0.0 = SV-only, the repo's modes 2 and 1); attention
options heads, num_heads, debias (AV score only: the SVD score and the merge are untouched),
debias_strength, benchmark.

The SV score is `tokencarve_information` below: the thin SVD of the fp32 image rows (after a QR
reduction to N × N, which keeps the accuracy of a direct SVD), to the official definition's accuracy —
never through an eigendecomposition of H·Hᵀ, which squares the condition number (issue 20).

Deviations from the official code (ShawnTan86/TokenCarve `TokenCarve/modeling_llama.py` @ a57bd59):
* the official code also gathers the KV caches of layers 0…K−1 to the kept tokens; here layers before K
  keep the full-length cache they computed (vtprune's engine; the prefill outputs are identical, a decoded
  token's attention in layers < K still sees every image token);
* the SVD is thin (the official `torch.linalg.svd` computes the full 4096 × 4096 V it never uses): on CUDA
  cuSOLVER's `gesvda` driver, on the CPU through a QR reduction; the score equals the official one to fp32
  accuracy;
* ties in either ranking, in the fused Borda points and in the merge similarities go to the lower index
  (stable sorts; the official `topk`/`sort` leave them to the backend);
* several images of a sample are ranked together (N per image × images); batches are supported (the
  official code reads sample 0 only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.methods.base import AttentionMethod, ModelInfo, Selection, Stage, bounded, kept_per_row, register
from vtprune.selection import (
    MergedSelection,
    argmax_first,
    check_2d,
    check_count,
    check_features,
    gather_rows,
    rank_tokens,
)


def _borda_points(scores: Tensor) -> Tensor:
    """``N - rank`` per token (rank 0 = highest score, ties lower index first), as float32."""
    b, n = scores.shape
    order, _ = rank_tokens(scores)
    pts = torch.arange(n, 0, -1, device=scores.device, dtype=torch.float32).expand(b, -1)
    return torch.empty(b, n, device=scores.device).scatter_(1, order, pts)


def tokencarve_information(hidden: Tensor) -> Tensor:
    """TokenCarve's information-contribution score (step 2 of the paper), ``(B, N, D) -> (B, N)``.

    ``sv_i = Σ_k |(U·S)_ik|`` for the thin SVD ``H = U S Vᵀ`` of each sample's rows, computed in float32
    to the accuracy of an fp32 SVD of ``H`` (the official code runs ``torch.linalg.svd`` on the fp32 layer
    outputs: ShawnTan86/TokenCarve ``TokenCarve/modeling_llama.py`` @ a57bd59).

    Not through the Gram matrix: an eigendecomposition of ``H·Hᵀ`` squares the condition number, and LLM
    hidden states have massive-activation rows whose norm dwarfs the others, so in fp32 the small singular
    directions drown (≈5–13 % error on the score and a different kept set). When ``N < D`` the rows are
    first reduced by a QR factorisation ``Hᵀ = Q R``: ``H = Rᵀ Qᵀ`` with orthonormal ``Q``, so ``Rᵀ``
    (``N × N``) has the same ``U`` and ``S`` as ``H``, and both Householder QR and the SVD are backward
    stable — the accuracy of a direct SVD at the cost of a QR plus an ``N × N`` SVD. On CUDA a direct thin
    SVD with cuSOLVER's ``gesvda`` driver is both faster and more accurate than that route (H200, 16 × 576 ×
    4096: 46 ms and 2e-7 per-token relative error, against 376 ms and 9e-4 for QR + the default driver;
    benchmarks/tokencarve_svd_gpu.py, results in benchmarks/results/nvidia-h200-2026-12-03-prefill/).
    Signs of singular vectors do not matter (absolute values).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, N, D); got {tuple(hidden.shape)}")
    h = hidden.float()
    if h.is_cuda:
        u, s, _ = torch.linalg.svd(h, full_matrices=False, driver="gesvda")
        return (u * s.unsqueeze(-2)).abs().sum(dim=-1)
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
    """TokenCarve: Borda fusion of attention and SVD information scores, then similarity merge.

    1. AV = ``attn_scores`` (last-token head-mean attention of layer 1).
    2. SV = :func:`tokencarve_information` of the image rows ``H``: row-wise L1 norm of ``U·S`` of the
       thin SVD ``H = U S Vᵀ`` (float32). (Its L2 version would be ``||h_i||₂`` exactly: the l2norm method.)
    3. Borda: rank ρ by AV and ρ' by SV (0-based, descending, ties lower index) give
       ``(N - ρ)·w + (N - ρ')·(1 - w)``; keep the top ``N1 = min(N, floor(1.5·keep))`` by that fused score.
    4. GSM merge: order the ``N1`` tokens by fused score; ``A`` = first ``floor(N1/2)``, ``B`` = the rest;
       each ``B`` token's best ``A`` match by cosine of ``H`` (ties: earlier in A); the ``M`` ``B`` tokens with
       the highest best-match similarity (ties: earlier in B) are merged into their partner by mean
       (partner ← mean of itself and every B merged into it); other ``B`` tokens are kept. ``M = N1 - keep``,
       which equals the paper's ``min(|A|, floor(keep/2))`` whenever ``N1 = floor(1.5·keep)`` and makes the final
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
    check_2d("attn_scores", attn_scores)
    b, n = attn_scores.shape
    check_features("hidden", hidden, b, n)
    check_count("keep", keep, n, low=1)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1]; got {weight}")
    h = hidden.float()
    sv = tokencarve_information(h)
    fused = _borda_points(attn_scores) * weight + _borda_points(sv) * (1.0 - weight)
    n1 = min(n, (3 * keep) // 2)
    forder, _ = rank_tokens(fused)
    forder = forder[:, :n1]
    na = n1 // 2
    nm = n1 - keep
    if nm > na:  # cannot happen for keep >= 1 (see docstring); guards future edits
        raise AssertionError(f"TokenCarve merge count {nm} exceeds |A| = {na}")
    a_idx, b_idx = forder[:, :na], forder[:, na:]
    h_a, h_b = gather_rows(h, a_idx), gather_rows(h, b_idx)
    if nm == 0:
        idx, hid = forder, gather_rows(h, forder)
    else:
        nb = n1 - na
        cos = F.normalize(h_b, dim=-1) @ F.normalize(h_a, dim=-1).transpose(1, 2)  # (B, nb, na)
        best_sim = cos.amax(dim=-1)
        partner = argmax_first(cos)
        border, _ = rank_tokens(best_sim)
        merged = torch.zeros(b, nb, dtype=torch.bool, device=h.device).scatter_(1, border[:, :nm], True)
        w = (partner.unsqueeze(1) == torch.arange(na, device=h.device)[None, :, None]) & merged.unsqueeze(1)
        w = w.float()  # (B, na, nb)
        h_a = (h_a + w @ h_b) / (1.0 + w.sum(dim=-1, keepdim=True))
        survivors = torch.sort(merged.to(torch.uint8), dim=-1, stable=True).indices[:, : nb - nm]
        idx = torch.cat([a_idx, b_idx.gather(1, survivors)], dim=1)
        hid = torch.cat([h_a, gather_rows(h_b, survivors)], dim=1)
    return MergedSelection.in_raster_order(idx, hid, hidden.dtype)


@register
@dataclass
class TokenCarve(AttentionMethod):
    """Borda fusion of attention and SVD information scores, then similarity merging, at layer K."""

    K: int = bounded(2, ge=1, note="scores come from layer K-1")
    weight: float = bounded(0.5, ge=0, le=1, note="AV share of the Borda fusion")

    name = "tokencarve"
    stage_kind = "llm"
    paper = "arXiv 2503.10501"

    def stages(self, info: ModelInfo) -> list[Stage]:
        keep = self.keep_count(info, max(1, round(info.visual_tokens * 128 / 576)))
        return [Stage.before_layer(self.K, keep, queries="last", name="tokencarve")]

    def select(self, stage_index, stage, signals) -> Selection:
        scores, info = self.attention_scores(signals, "last", budget=stage.keep)
        keep = kept_per_row(stage, signals)
        merged = tokencarve_fuse_and_merge(scores, signals.visual_hidden(), keep, weight=self.weight)
        info["merged"] = min(signals.num_visual, (3 * keep) // 2) - keep
        return Selection(merged.indices, values=merged.hidden, scores=scores, info=info)
