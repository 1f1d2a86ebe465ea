"""VisPruner — "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(Zhang et al., ICCV 2025, arXiv 2412.01818; v1 = FasterVLM).

Idea: keep a few *important* tokens by the vision tower's [CLS] attention, then fill the rest of the
budget with *diverse* tokens by repeatedly deleting, among the remaining ones, those most similar to
others; before the LLM, kept tokens in raster order (algorithms.md §4).
Optional sink exclusion (seeds/000, `vispruner_nosink`): patches whose head-mean [CLS] attention exceeds
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

Ties (deterministic, `vtprune.selection.vispruner_select`): equal [CLS] attention ranks the lower index
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
* `attention_sink_threshold` (`vispruner_nosink`, seeds/000) is not in the official code: the sinks are
  excluded from both selections, so keep = all tokens is not the unmodified model for that variant.
* LLaVA-NeXT: the official rule (an equal budget per view, each with its own [CLS]) is `crop_budget="crop"`,
  the default (`vtprune.methods.base.check_crop_budget`); the official code's 672 x 672 pin with no
  unpadding and no `image_newline` is not the HF model's input and is not reproduced.
* Qwen2-VL / Qwen2.5-VL (no [CLS], no official port): the [CLS] attention is replaced by the attention each
  token receives in the tower's last full-attention block (`vtprune.models.qwen2_vl`, `token_importance`);
  each image is one tower input, so the per-crop rule is the per-image rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import (
    Method,
    ModelInfo,
    PruneConfigError,
    Selection,
    Stage,
    check_crop_budget,
    register,
)
from vtprune.selection import vispruner_select


@register
@dataclass
class VisPruner(Method):
    """Important tokens by [CLS] attention + diverse tokens by similarity-based removal."""

    important_ratio: float = 0.5
    removal_number: int = 8
    attention_sink_threshold: float | None = None
    retain_img_tokens: int | None = None  # alias of keep (seed 000)
    vispruner_ratio: float | None = None  # alias of important_ratio (seed 000)
    crop_budget: str = "crop"  # LLaVA-NeXT: an equal share per tower input (official rule)

    name = "vispruner"
    stage_kind = "vision"
    paper = "arXiv 2412.01818"

    def __post_init__(self) -> None:
        check_crop_budget(self)
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
        if not 0.0 <= self.important_ratio <= 1.0:
            raise PruneConfigError(f"{self.name}: important_ratio={self.important_ratio} must be in [0, 1]")
        if self.removal_number < 1:
            raise PruneConfigError(f"{self.name}: removal_number={self.removal_number} must be >= 1")
        if self.attention_sink_threshold is not None and not 0.0 < self.attention_sink_threshold <= 1.0:
            raise PruneConfigError(f"{self.name}: attention_sink_threshold must be in (0, 1]")

    def stages(self, info: ModelInfo) -> list[Stage]:
        return [Stage(kind="vision", keep=self.keep_count(info, 64), name=self.name)]

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
        info = {} if sinks is None else {"sinks": sinks.sum(dim=1).tolist()}
        return Selection(*picked, scores=attention, info=info)


@register
@dataclass
class VisPrunerNoSink(VisPruner):
    """VisPruner that never selects attention-sink patches ([CLS] attention above a threshold)."""

    attention_sink_threshold: float | None = 0.02

    name = "vispruner_nosink"
