"""DART — "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., EMNLP 2025, arXiv 2502.11494; official code github.com/ZichenWen1/DART, also shipped in
ModelTC/LightCompress `token_reduction/dart.py`).

Idea: instead of ranking tokens by importance, pick a few *pivot* tokens — the image and text tokens with the
largest key norms at the layer before the cut — and keep, for each pivot, the image tokens *least* similar to
it (cosine of the hidden states), so the kept set holds little duplication. It reads no attention
probabilities, so the model stays on SDPA / FlashAttention: the keys are the score layer's post-RoPE key
states captured while it runs (`LLMSignals.keys`).

Official rule (LLaVA-1.5, `modeling_llama_self.py`): before decoder layer K (K = 2) take the key states of
layer K−1 (post-RoPE, all heads concatenated) and their L1 norms; the 4 image tokens and the 4 tokens after
the image (the question and " ASSISTANT:") with the largest norms are the pivots. The hidden states entering
layer K go through the language model's output RMSNorm; visiting the pivots one after the other, each takes
the `TOKEN_TOPK` remaining image tokens with the lowest cosine similarity to it (taken tokens leave the
pool). Kept: image pivots ∪ taken tokens (text pivots are not image tokens), in raster order, with their
original positions.

Pre-LLM variant (`K=0`, a vision stage): the same selection on the vision tower's feature layer — pivots by
the L1 norm of that layer's keys, duplication by the cosine of its patch features, no text pivots (the
official ViT script `scripts/classification/imagenette_tokenprune.py` does this at a ViT layer); the LLM then
sees the kept tokens with contiguous positions.

Parameters and defaults: keep (T, default 128: the repo's `max_num_trunction`; the LLaVA-1.5 tables use
T = 64 / 128 / 192 with K = 2 and 4 + 4 pivots at every budget), K = 2, pivot_image_token = 4,
pivot_text_token = 4, norm = "l1" (official; "l2" a vtprune option), budget = "exact".

Budget: the official code takes `TOKEN_TOPK = T // 8` tokens per pivot, so it keeps 4 + 8·⌊T/8⌋ image tokens
(68 / 132 / 196 at 64 / 128 / 192). vtprune keeps exactly T by default: the T − 4 non-pivot slots are shared
out as ⌊(T − 4)/8⌋ per pivot, the remainder one each to the first pivots visited; `budget="official"`
reproduces the official counts. With several images per sample the pool is the sample's visual tokens, with
`pivot_image_token` pivots per image and `keep` tokens per image.

Deviations from the official code (ZichenWen1/DART `llava/model/language_model/modeling_llama_self.py`, read
in its fork xqy1111111/DART @ d6a5af6, and ModelTC/LightCompress `token_reduction/dart.py` @ 9701d03):
* exactly T tokens by default (`budget="exact"`, above); the official 4 + 8·⌊T/8⌋ with `budget="official"`;
* the official code visits the pivots in Python-set order (integer hash order, effectively arbitrary);
  vtprune visits the image pivots, then the text pivots, each by decreasing key norm; ties go to the lower
  index;
* the keys are the post-RoPE key states of layer K−1 captured under SDPA (the official code returns them
  from a patched attention; LightCompress reads the KV cache): the same tensor, no eager attention;
* batches > 1 with left padding are pruned per sample (the official code reads sample 0 and hard-codes the
  image offset 35); when a prompt has fewer text tokens than `pivot_text_token`, the slots are shared by the
  pivots that exist;
* `K=0` (before the LLM) follows the repo's ViT script, not a LLaVA path of the official code (it has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.cuda_graphs import cuda_graphed
from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, ModelInfo, Selection, Stage, bounded, kept_per_row, register
from vtprune.selection import Picked, mask_indices, rank_tokens


def dart_quotas(pivot_valid: Tensor, pool: int, budget: str, per_pivot: int | None = None) -> Tensor:
    """(B, P) tokens each pivot takes, in visit order. "exact": `pool` slots shared by the valid pivots of the
    row (⌊pool/m⌋ each, one more for the first pool mod m); "official": `per_pivot` each."""
    valid = pivot_valid.long()
    if budget == "official":
        return valid * per_pivot
    m = valid.sum(dim=1, keepdim=True).clamp(min=1)
    base = pool // m
    rem = pool - base * m
    slot = torch.cumsum(valid, dim=1) - 1  # rank among the row's valid pivots
    return (base + (slot < rem).long()) * valid


@cuda_graphed  # one small loop per pivot, no host sync: one graph launch on a GPU
def dart_select(
    features: Tensor,
    scores: Tensor,
    k: int,
    num_pivots: int,
    *,
    valid: Tensor | None = None,
    text_features: Tensor | None = None,
    text_scores: Tensor | None = None,
    text_valid: Tensor | None = None,
    num_text_pivots: int = 0,
    budget: str = "exact",
) -> tuple[Picked, Tensor]:
    """DART's duplication-aware selection on a batch (rows independent).

    features (B, N, D): the candidate (image) tokens' vectors for the cosine; scores (B, N): their pivot
    scores (key norms); k: tokens kept per row, pivots included ("exact"; "official": 4 + 8·⌊k/8⌋ for the
    default pivots); text_* (B, M, ...): tokens that may be pivots but are never kept.
    Returns (Picked (B, width) in raster order, (B, P + Pt) image-pivot indices then -1 for text pivots).
    """
    b, n, _ = features.shape
    dev = features.device
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if valid is None else valid
    p = min(num_pivots, k, n)
    order, ok = rank_tokens(scores, valid)
    img_piv, img_ok = order[:, :p], ok[:, :p]
    x = F.normalize(features.float(), dim=-1)
    vectors = [x.gather(1, img_piv[:, :, None].expand(-1, -1, x.shape[-1]))]
    piv_ok = [img_ok]
    if text_features is not None and num_text_pivots > 0:
        t_valid = text_valid
        if t_valid is None:
            t_valid = torch.ones(text_scores.shape, dtype=torch.bool, device=dev)
        pt = min(num_text_pivots, text_scores.shape[1])
        t_order, t_ok = rank_tokens(text_scores, t_valid)
        t = F.normalize(text_features.float(), dim=-1)
        vectors.append(t.gather(1, t_order[:, :pt, None].expand(-1, -1, t.shape[-1])))
        piv_ok.append(t_ok[:, :pt])
    pivots = torch.cat(vectors, dim=1)  # (B, P + Pt, D) in visit order
    pivot_valid = torch.cat(piv_ok, dim=1)
    total = pivot_valid.shape[1]
    per_pivot = k // (num_pivots + num_text_pivots)
    quotas = dart_quotas(pivot_valid, k - p, budget, per_pivot)
    width = k if budget == "exact" else min(n, p + per_pivot * total)

    kept = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter(1, img_piv, img_ok)
    positions = torch.arange(n, device=dev)
    for j in range(total):
        cos = (x @ pivots[:, j, :, None]).squeeze(-1)  # (B, N)
        cand_order, cand_ok = rank_tokens(-cos, valid & ~kept)  # least similar first
        take = cand_ok & (positions < quotas[:, j : j + 1])
        kept = kept | torch.zeros_like(kept).scatter(1, cand_order, take)
    picked = mask_indices(kept, width)
    text_slots = torch.full((b, total - p), -1, dtype=torch.long, device=dev)
    pivot_index = torch.cat([torch.where(img_ok, img_piv, -1), text_slots], dim=1)
    return picked, pivot_index


@register
@dataclass
class DART(Method):
    """Duplication-aware pruning: key-norm pivots, then the image tokens least similar to each pivot."""

    K: int = bounded(2, ge=0)
    pivot_image_token: int = bounded(4, ge=1)
    pivot_text_token: int = bounded(4, ge=0)
    norm: Literal["l1", "l2"] = "l1"
    budget: Literal["exact", "official"] = "exact"

    name = "dart"
    stage_kind = "llm"
    paper = "arXiv 2502.11494 (EMNLP 2025)"

    def validate_for(self, info: ModelInfo) -> None:
        if self.K > info.num_layers - 1:
            raise PruneConfigError(
                f"dart: K={self.K} is outside the LLM's layers "
                f"(valid: 0 = before the LLM, 1..{info.num_layers - 1})"
            )
        super().validate_for(info)

    def stages(self, info: ModelInfo) -> list[Stage]:
        keep = self.keep_count(info, 128)
        if self.K == 0:
            return [Stage(kind="vision", keep=keep, name="dart")]
        # Keys of layer K-1 are captured while it runs; the cut is before layer K, positions stay original.
        return [Stage.before_layer(self.K, keep, queries=None, name="dart")]

    def _norms(self, keys: Tensor) -> Tensor:
        return keys.abs().sum(dim=-1) if self.norm == "l1" else keys.norm(dim=-1)

    def select(self, stage_index, stage, signals) -> Selection:
        if stage.kind == "vision":
            return self._select_vision(stage, signals)
        keys = signals.keys()  # (B, L, Dk) post-RoPE keys of layer K-1
        normed = signals.normed_hidden()  # (B, L, D)
        n_img = signals.images_per_sample
        vis = signals.visual_index
        image_scores = self._norms(keys.gather(1, vis[:, :, None].expand(-1, -1, keys.shape[-1])))
        image_x = normed.gather(1, vis[:, :, None].expand(-1, -1, normed.shape[-1]))
        text_pos, text_valid = signals.query_index("text")
        text_scores = self._norms(keys.gather(1, text_pos[:, :, None].expand(-1, -1, keys.shape[-1])))
        text_x = normed.gather(1, text_pos[:, :, None].expand(-1, -1, normed.shape[-1]))
        keep = kept_per_row(stage, signals)
        picked, pivots = dart_select(
            image_x,
            image_scores,
            keep,
            self.pivot_image_token * n_img,
            valid=signals.visual_valid,
            text_features=text_x,
            text_scores=text_scores,
            text_valid=text_valid,
            num_text_pivots=self.pivot_text_token,
            budget=self.budget,
        )
        return Selection(*picked, scores=image_scores, info={"pivots": pivots})

    def _select_vision(self, stage, signals) -> Selection:
        features = signals.features
        keys = signals.keys
        if keys.shape[1] != features.shape[1]:
            keys = keys[:, 1:]  # LLaVA's "default" features drop the [CLS]
        scores = self._norms(keys)
        picked, pivots = dart_select(
            features, scores, stage.keep, self.pivot_image_token, budget=self.budget
        )
        return Selection(*picked, scores=scores, info={"pivots": pivots})
