"""VisionZip — "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
(Yang et al., CVPR 2025, arXiv 2412.04467).

Idea: keep D *dominant* tokens — the vision tower's [CLS] token plus the D−1 patches with the highest
[CLS] attention (summed over heads) at the feature layer — and compress the rest into C *contextual* tokens
by merging each remaining token into its most similar target token (head-mean key cosine); the LLM
receives [CLS, dominant patches in raster order, contextual tokens in target order] (docs/methods/visionzip.md).

Parameters: keep (T = D + C, default 64), dominant (D, [CLS] included) and contextual (C). With neither
given, D = round(T·54/64) (half up, at least 1) and C = T − D: the README's 54/10 at 64 and the
proportional 108/20 and 162/30 at 128 and 192 used by reproductions. Giving one of them fixes the other
from T; giving both sets T = D + C (a conflicting keep is an error). The README's `visionzip(model,
dominant=54, contextual=10)` is `get_method("visionzip", dominant=54, contextual=10)`.

How the tokens reach the LLM (engine contract): the [CLS] token and the contextual tokens are created
tokens and the engine places a Selection's `extra` tokens right after its kept slots, so VisionZip returns
no kept slots (`indices` of width 0) and its whole output as `extra`, already projected with the LLaVA
projector: [project(CLS), projected dominant patches, project(contextual)], with `extra_index` = the
patch's visual-token index for dominant patches and −1 for [CLS] and the contextual tokens (the record
lists them as −1, "created"). The dominant patches' vectors are the model's own projected features,
bit-identical to what the unpruned model feeds its LLM.

With `vision_feature_select_strategy="full"` (the [CLS] token is visual token 0) the [CLS] token is an
ordinary kept token and is recorded with index 0.

A full budget (keep, or dominant + contextual, = every visual token of the image) leaves the model
unmodified: every patch is kept as it is, no [CLS] token and no merge (the record's stage info says
"unchanged").

Deviations from the official code (dvlab-research/VisionZip `visionzip/clip_encoder.py`, `utils.py`
@ 3151f6d):
* ties in the [CLS] attention go to the lower index (stable sort; torch.topk has no guaranteed tie order)
  and ties between targets go to the earlier target (`visionzip_merge` below);
* at a full budget the official code still feeds [CLS] in place of a patch, moves the non-dominant
  patches after the dominant ones (contextual targets) and adds the one left over to its most similar
  target; vtprune feeds the unmodified image (issue 20);
* the [CLS] attention and keys of the feature layer are computed from its q/k projections (SDPA tower), not
  by a monkey-patched eager CLIP attention; several images per sample and batches are supported.
* LLaVA-NeXT: the official rule (an equal budget per view, each with its own [CLS]) is `crop_budget="crop"`,
  the default (`vtprune.methods.base.CropBudget`); the official code's 672 x 672 pin with no
  unpadding and no `image_newline` is not the HF model's input and is not reproduced.
* Qwen2-VL / Qwen2.5-VL (no [CLS]): `_select_without_cls`; the [CLS] attention is replaced by the attention
  each token receives in the tower's last full-attention block (`vtprune.models.qwen2_vl`), no [CLS] token
  is created, and the D dominant tokens are kept in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.errors import PruneConfigError
from vtprune.methods.base import (
    CropBudget,
    Method,
    ModelInfo,
    Selection,
    Stage,
    bounded,
    register,
    resolve_keep,
)
from vtprune.selection import argmax_first, check_count, check_features, gather_rows, topk_indices

# Dominant share of the budget in the README setting (54 of 64).
DOMINANT_SHARE = (54, 64)


class ContextualTokens(NamedTuple):
    """Result of :func:`visionzip_merge`.

    Attributes:
        tokens: ``(B, C, D)`` contextual tokens in target order; dtype of ``hidden``.
        targets: ``(B, C)`` long, input index of each target token (the same for every sample).
        assignment: ``(B, N)`` long, the contextual token (0..C-1) each input token contributes to
            (targets map to themselves).
    """

    tokens: Tensor
    targets: Tensor
    assignment: Tensor


def visionzip_merge(hidden: Tensor, keys: Tensor, num_contextual: int) -> ContextualTokens:
    """VisionZip's contextual tokens.

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
    check_features("keys", keys, b, n)
    c = check_count("num_contextual", num_contextual, n)
    dev = hidden.device
    hf = hidden.float()
    step = max(1, n // c) if c else 1
    pos = torch.arange(n, device=dev)
    targets = pos[0::step][:c]
    # target t sits at position t * step; built arithmetically so no index_put is needed
    is_target = (pos % step == 0) & (pos < step * c)
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn @ kn[:, targets].transpose(1, 2)  # (B, N, C)
    assign = argmax_first(sim) if c else torch.zeros(b, n, dtype=torch.long, device=dev)
    assign = torch.where(is_target, pos // step, assign)
    cid = torch.arange(c, device=dev)
    member = (assign.unsqueeze(1) == cid[None, :, None]) & ~is_target[None, None, :]  # (B, C, N)
    member = member.float()
    agg = (member @ hf) / member.sum(dim=-1, keepdim=True).clamp_min(1.0)
    tokens = hf[:, targets] + agg
    return ContextualTokens(tokens.to(hidden.dtype), targets.expand(b, -1), assign)


@register
@dataclass
class VisionZip(Method):
    """Dominant tokens by [CLS] attention + contextual tokens by key-similarity merging."""

    dominant: int | None = bounded(None, ge=1, note="[CLS] included")
    contextual: int | None = bounded(None, ge=0)
    crop_budget: CropBudget = "crop"  # LLaVA-NeXT: an equal share per tower input (official rule)

    name = "visionzip"
    stage_kind = "vision"
    paper = "arXiv 2412.04467"

    def split_total(self, total: int) -> tuple[int, int]:
        """(D, C) for a budget of `total` tokens per image."""
        if self.dominant is not None and self.contextual is not None:
            return self.dominant, self.contextual
        if self.dominant is not None:
            return self.dominant, total - self.dominant
        if self.contextual is not None:
            return total - self.contextual, self.contextual
        share, of = DOMINANT_SHARE
        d = max(1, (2 * total * share + of) // (2 * of))  # round(total * 54 / 64), half up
        return d, total - d

    def split(self, info: ModelInfo) -> tuple[int, int]:
        """(D, C): dominant tokens ([CLS] included) and contextual tokens per image; validated."""
        if self.dominant is not None and self.contextual is not None:
            total = resolve_keep(self.dominant + self.contextual, info.visual_tokens, what=f"{self.name}: dominant + contextual")
            if self.keep is not None and resolve_keep(self.keep, info.visual_tokens) != total:
                raise PruneConfigError(
                    f"{self.name}: keep={self.keep} conflicts with dominant={self.dominant} + "
                    f"contextual={self.contextual}; give keep or both"
                )
        else:
            total = self.keep_count(info, 64)
        d, c = self.split_total(total)
        if d < 1 or c < 0:
            raise PruneConfigError(
                f"{self.name}: keep={total} cannot be split into dominant={d} (>= 1, [CLS] included) and "
                f"contextual={c} (>= 0)"
            )
        return d, c

    def validate_for(self, info: ModelInfo) -> None:
        super().validate_for(info)
        self.split(info)

    def stages(self, info: ModelInfo) -> list[Stage]:
        d, c = self.split(info)
        return [Stage(kind="vision", keep=d + c, name=self.name)]

    def select(self, stage_index, stage, signals) -> Selection:
        hidden = signals.hidden  # (N, 1 + P, Dv): [CLS] first
        n, length, _ = hidden.shape
        p = signals.projected.shape[1]
        if stage.keep >= p:
            # A full budget has nothing to compress: every patch, unchanged, as the unmodified model feeds
            # them (the official code would still swap a patch for [CLS], reorder and merge one patch).
            every = torch.arange(p, device=hidden.device).expand(n, p)
            return Selection(indices=every, info={"dominant": 0, "contextual": 0, "unchanged": True})
        if not signals.adapter.has_cls:  # Qwen-VL
            return self._select_without_cls(stage, signals)
        heads_attn = signals.cls_attention_heads  # (N, Hv, P), columns = tower tokens 1..P
        # Visual token j is tower token j + 1 ("default": [CLS] dropped) or j ("full": [CLS] is token 0).
        offset = length - signals.projected.shape[1]
        d, c = self.split_total(stage.keep)

        scores = heads_attn.float().sum(dim=1)  # (N, P) summed over heads, as the official code
        top = topk_indices(scores, d - 1).indices + 1  # tower positions, ascending
        cls = torch.zeros(n, 1, dtype=torch.long, device=hidden.device)
        dominant = torch.cat([cls, top], dim=1)  # (N, D): [CLS] first, then raster order
        is_dominant = torch.zeros(n, length, dtype=torch.bool, device=hidden.device).scatter(1, dominant, True)
        # the L − D other tokens, in original order (stable sort puts the non-dominant ones first)
        rest = torch.sort(is_dominant.to(torch.int8), dim=1, stable=True).indices[:, : length - d]
        hv = heads_attn.shape[1]
        keys = signals.keys.reshape(n, length, hv, -1).float().mean(dim=2)  # head-mean keys (N, L, dh)
        contextual = visionzip_merge(gather_rows(hidden, rest), gather_rows(keys, rest), c)

        projected = signals.projected
        if offset == 1:
            created = signals.project(torch.cat([hidden[:, :1], contextual.tokens], dim=1))
            cls_vec, ctx_vec = created[:, :1], created[:, 1:]
            dom_vec = gather_rows(projected, top - 1)
            dom_index = torch.cat([torch.full_like(cls, -1), top - 1], dim=1)
            tokens = torch.cat([cls_vec, dom_vec.to(cls_vec.dtype), ctx_vec], dim=1)
        else:
            ctx_vec = signals.project(contextual.tokens)
            dom_vec = gather_rows(projected, dominant)
            dom_index = dominant
            tokens = torch.cat([dom_vec.to(ctx_vec.dtype), ctx_vec], dim=1)
        extra_index = torch.cat([dom_index, torch.full((n, c), -1, dtype=torch.long, device=hidden.device)], dim=1)
        empty = torch.zeros(n, 0, dtype=torch.long, device=hidden.device)
        return Selection(
            indices=empty,
            extra=tokens,
            extra_index=extra_index,
            scores=scores,
            info={"dominant": d, "contextual": c},
        )

    def _select_without_cls(self, stage, signals) -> Selection:
        """Towers without [CLS] (Qwen-VL): the D dominant tokens are the D image tokens with the highest
        [CLS]-free importance (`VisionSignals.cls_attention_heads`, summed over heads; the adapter documents
        the rule), kept in place (their own positions); the other tokens are merged into C contextual tokens
        as on LLaVA (head-mean key cosine, `visionzip_merge`) in the merger's input space and projected with
        the merger's MLP."""
        features = signals.features  # (N, P, F): the merger's input of each token
        n, p, _ = features.shape
        d, c = self.split_total(stage.keep)
        heads_attn = signals.cls_attention_heads  # (N, Hv, P)
        scores = heads_attn.float().sum(dim=1)
        dominant = topk_indices(scores, d).indices  # ascending
        is_dominant = torch.zeros(n, p, dtype=torch.bool, device=features.device).scatter(1, dominant, True)
        rest = torch.sort(is_dominant.to(torch.int8), dim=1, stable=True).indices[:, : p - d]
        keys = signals.keys[:, 1:].reshape(n, p, heads_attn.shape[1], -1).float().mean(dim=2)
        contextual = visionzip_merge(gather_rows(features, rest), gather_rows(keys, rest), c)
        return Selection(
            indices=dominant,
            extra=signals.project(contextual.tokens),
            extra_index=torch.full((n, c), -1, dtype=torch.long, device=features.device),
            scores=scores,
            info={"dominant": d, "contextual": c},
        )
