"""Random pruning (the FastV paper's K=0 baseline; UniPruneBench finds it a strong baseline).

Idea: keep `keep` visual tokens of each image drawn uniformly at random, in raster order, before the LLM.
The draw is seeded and does not depend on the batch: with `per_image=False` (default) every image keeps the
same random subset for a given seed; with `per_image=True` image i of a batch gets its own stream seeded
with (seed, i-th image of its sample), so it is still independent of the other samples.

Parameters: keep (default 64), seed (0), per_image (False).

Deviations from the official code: none known. There is no released implementation to follow (FastV's
K=0 setting is described in its paper, arXiv 2403.06764, not in pkunlp-icler/FastV's code); vtprune
prunes before the LLM, as the paper's K=0 drops tokens before layer 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.methods.base import ScorerMethod, register


@register
@dataclass
class RandomPruning(ScorerMethod):
    """Uniformly random visual tokens, seeded."""

    seed: int = 0
    per_image: bool = False

    name = "random"
    stage_kind = "vision"
    paper = "FastV K=0 baseline (arXiv 2403.06764)"

    def score(self, stage_index, stage, signals):
        n, p = signals.features.shape[:2]
        # only per-image streams need the image's place in its sample (a read from the device)
        images_per_sample = max(1, n // int(signals.image_sample.max() + 1)) if self.per_image else 1
        scores = torch.empty(n, p)
        for i in range(n):
            stream = i % images_per_sample
            generator = torch.Generator().manual_seed(self.seed * 1000003 + stream)
            scores[i] = torch.rand(p, generator=generator)
        return scores.to(signals.features.device)
