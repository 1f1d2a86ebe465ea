"""TokenCarve — "Information-Preserving Visual Token Compression in Multimodal Large Language Models"
(Tan et al., arXiv 2503.10501; repo ShawnTan86/TokenCarve), algorithms.md §10.

Idea: after layer K−1 the image tokens are ranked twice — by the last prompt token's attention (AV) and
by their "information contribution" (SV: row-wise L1 norm of U·S from the SVD of the image rows of layer
K−1's output) — the two rankings are fused by a Borda count (weight w on AV), the top 1.5·N survive and the
least distinct half of them is merged by similarity into the rest until N remain (GSM). The merged hidden
states replace the kept tokens entering layer K (`Selection.values`); kept tokens are in raster order with
their original positions. The work is `selection.tokencarve_fuse_and_merge`.

Budget: keep = N, the visual tokens per image entering layer K and every later layer ("keep T after K",
not a layer average); default 128 (the README's 576 → 128). 64/128/192 are the paper's N with its
settings K=2, w=0.5. keep ≥ tokens per image keeps everything unchanged.

Parameters: keep, K (2), weight (0.5; 1.0 = AV-only, 0.0 = SV-only, the repo's modes 2 and 1); attention
options heads, num_heads, debias (AV score only, §13: the SVD score and the merge are untouched),
debias_strength, benchmark.

The SV score is `selection.tokencarve_information`: the thin SVD of the fp32 image rows (after a QR
reduction to N × N, which keeps the accuracy of a direct SVD), to the official definition's accuracy —
never through an eigendecomposition of H·Hᵀ, which squares the condition number (issue 20).

Deviations from the official code (ShawnTan86/TokenCarve `TokenCarve/modeling_llama.py` @ a57bd59):
* the official code also gathers the KV caches of layers 0…K−1 to the kept tokens; here layers before K
  keep the full-length cache they computed (vtprune's engine; the prefill outputs are identical, a decoded
  token's attention in layers < K still sees every image token);
* the SVD is thin (the official `torch.linalg.svd` computes the full 4096 × 4096 V it never uses) and is
  taken through a QR reduction; the score equals the official one to fp32 accuracy;
* ties in either ranking, in the fused Borda points and in the merge similarities go to the lower index
  (stable sorts; the official `topk`/`sort` leave them to the backend);
* several images of a sample are ranked together (N per image × images); batches are supported (the
  official code reads sample 0 only).
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.methods.base import AttentionMethod, ModelInfo, Selection, Stage, bounded, register
from vtprune.selection import tokencarve_fuse_and_merge


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
        return [
            Stage(
                kind="llm",
                keep=keep,
                score_layer=self.K - 1,
                prune_layer=self.K,
                positions="original",
                queries="last",
                name="tokencarve",
            )
        ]

    def select(self, stage_index, stage, signals) -> Selection:
        scores, info = self.attention_scores(signals, "last", budget=stage.keep)
        keep = min(stage.keep * signals.images_per_sample, signals.num_visual)
        merged = tokencarve_fuse_and_merge(scores, signals.visual_hidden(), keep, weight=self.weight)
        info["merged"] = min(signals.num_visual, (3 * keep) // 2) - keep
        return Selection(merged.indices, values=merged.hidden, scores=scores, info=info)
