"""`vtprune analyze overlap`: how much the kept sets of different methods agree on the same samples.

Every method runs the prefill of every sample at the same budget; its kept set is what the last LLM layer
sees (the final stage of the record, original numbering over all images of the sample; merged/created
tokens excluded). For methods a and b the Jaccard index |A ∩ B| / |A ∪ B| is averaged over samples.
For reference, independent uniformly random sets of sizes a and b out of N tokens overlap by
E|A∩B| = ab/N, so their Jaccard is ≈ (ab/N) / (a + b − ab/N) (k / (2N − k) for a = b = k);
`random_expectation` holds this for every pair, from the methods' mean kept counts.

Outputs: `overlap.json` (mean and standard deviation matrices, kept counts, the random reference) and
`overlap.png/.pdf` (the mean matrix as an annotated heat map).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vtprune.analysis.common import AnalysisModel, Sample, final_kept, settings, write_json
from vtprune.analysis.plots import heatmap
from vtprune.eval.errors import EvalInputError


def jaccard(a: set[int], b: set[int]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets agree completely (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def random_jaccard(a: float, b: float, n: int) -> float:
    """≈ expected Jaccard of independent uniformly random sets of sizes a and b out of n (ratio of means)."""
    common = a * b / n
    union = a + b - common
    return common / union if union > 0 else 1.0


def run_overlap(
    am: AnalysisModel,
    samples: list[Sample],
    output: str | Path,
    *,
    methods: list[str],
    keep: int | float | None,
    params: dict[str, dict[str, Any]],
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    import vtprune

    if len(methods) < 2:
        raise EvalInputError(f"--methods needs at least two methods to compare, got {methods}")
    if len(set(methods)) != len(methods):
        raise EvalInputError(f"--methods lists a method twice: {methods}")
    for method in methods:
        vtprune.get_method(method, keep=keep, **params.get(method, {}))
    m = len(methods)
    per_sample = []
    counts = {name: [] for name in methods}
    visual_tokens = None
    for n, sample in enumerate(samples, start=1):
        inputs = am.encode(sample.example.question, sample.images)
        kept: dict[str, set[int]] = {}
        for method in methods:
            vtprune.prune(am.model, method, keep=keep, **params.get(method, {}))
            try:
                am.prefill(inputs)
                record = vtprune.last_record(am.model)
            finally:
                vtprune.unprune(am.model)
            kept[method] = set(final_kept(record))
            counts[method].append(len(kept[method]))
            visual_tokens = record.visual_tokens
        per_sample.append([[jaccard(kept[a], kept[b]) for b in methods] for a in methods])
        if log:
            log(f"sample {n}/{len(samples)}: " + ", ".join(f"{k} {len(v)}" for k, v in kept.items()))
    stack = np.asarray(per_sample)  # (S, M, M)
    mean = stack.mean(axis=0)
    mean_counts = {name: float(np.mean(v)) for name, v in counts.items()}
    random_ref = [[random_jaccard(mean_counts[a], mean_counts[b], visual_tokens) for b in methods] for a in methods]
    out_dir = Path(output)
    files = heatmap(
        mean, methods, methods, out_dir / "overlap",
        title=f"Jaccard overlap of kept tokens (keep {keep}, {len(samples)} samples)",
        colorbar_label="mean Jaccard", annotate=m * m <= 400, vmin=0.0, vmax=1.0, cmap="viridis",
        figsize=(2.6 + 0.9 * m, 2.0 + 0.8 * m),
    )
    data = {
        "settings": settings(am, methods=methods, keep=keep, params={k: params.get(k, {}) for k in methods}),
        "methods": methods,
        "num_samples": len(samples),
        "visual_tokens": visual_tokens,
        "matrix": mean,
        "std": stack.std(axis=0),
        "mean_kept": mean_counts,
        "random_expectation": random_ref,
        "sample_ids": [s.example.uid for s in samples],
        "figures": [str(f) for f in files],
    }
    write_json(out_dir / "overlap.json", data)
    return data
