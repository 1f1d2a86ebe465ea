"""`vtprune analyze rank`: accuracy and the numerical rank of the visual tokens' attention output against the
number of kept tokens (docs/ANALYSIS.md; the study behind `l2norm`, docs/methods/l2norm.md).

For every kept count k of the sweep (576, 566, …, 20 by default; clipped to the model's visual tokens per
image, the stop value always included) the method (default `l2norm`, the seed's feature-norm pruning) runs
on every sample with greedy decoding. For each sample, forward hooks read the output of `self_attn` (after
`o_proj`) of the first and the last decoder layer at prefill; the rows of the visual tokens that layer sees
(their positions follow from `input_ids` and the pruning record, see `common.visual_rows`) form a V_l × D
matrix whose numerical rank #{σ_i > τ·σ_1} (τ = `rank_threshold`, default 1e-3, singular values in float64)
is averaged over samples. Accuracy uses the task's own parser and scoring.

Outputs (the seed's names): `raw_results.json` (`token_counts`, `accuracies` in [0, 1], `first_layer_ranks`,
`last_layer_ranks`, plus effective ranks and the settings), `normalized_results.json` (every raw value and
the min–max normalised series), `pruning_experiment_results.png/.pdf` (the three normalised curves against
the kept count, large budgets on the left), and `samples.jsonl` (one line per sample and count).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtprune.analysis.common import (
    AnalysisModel,
    Sample,
    capture_outputs,
    settings,
    visual_rows,
    write_json,
)
from vtprune.analysis.plots import line_plot
from vtprune.analysis.rank import RankAccumulator, minmax_normalize
from vtprune.eval.errors import EvalInputError

DEFAULT_THRESHOLD = 1e-3
PLOT_STEM = "pruning_experiment_results"


def token_counts(start: int, stop: int, step: int, visual_tokens: int) -> list[int]:
    """start, start−step, … down to stop (stop always included), clipped to `visual_tokens`, no repeats."""
    if step < 1:
        raise EvalInputError(f"--step must be >= 1, got {step}")
    if stop < 1 or start < stop:
        raise EvalInputError(f"need --start >= --stop >= 1, got start={start}, stop={stop}")
    counts = list(range(start, stop - 1, -step))
    if counts[-1] != stop:
        counts.append(stop)
    return list(dict.fromkeys(min(k, visual_tokens) for k in counts))


def run_rank_study(
    am: AnalysisModel,
    task: Any,
    samples: list[Sample],
    counts: list[int],
    output: str | Path,
    *,
    method: str = "l2norm",
    params: dict[str, Any] | None = None,
    rank_threshold: float = DEFAULT_THRESHOLD,
    max_new_tokens: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    import vtprune

    params = dict(params or {})
    if not 0.0 < rank_threshold <= 1.0:
        raise EvalInputError(f"--rank-threshold must lie in (0, 1], got {rank_threshold}")
    for k in counts:  # every configuration is valid before the first sample runs
        vtprune.get_method(method, keep=k, **params)
    max_new_tokens = int(max_new_tokens or task.default_max_new_tokens)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {"first": 0, "last": am.num_layers - 1}
    ranks = RankAccumulator(rank_threshold)
    correct = {k: 0 for k in counts}
    modules = {name: am.adapter.layers[idx].self_attn for name, idx in layers.items()}
    with capture_outputs(modules) as found, (out_dir / "samples.jsonl").open("w", encoding="utf-8") as lines:
        for n, sample in enumerate(samples, start=1):
            ex = sample.example
            inputs = am.encode(ex.question, sample.images)
            for k in counts:
                vtprune.prune(am.model, method, keep=k, **params)
                try:
                    found.clear()
                    text = am.generate(inputs, max_new_tokens)
                    record = vtprune.last_record(am.model)
                finally:
                    vtprune.unprune(am.model)
                row: dict[str, Any] = {"id": ex.uid, "keep": k}
                for name, idx in layers.items():
                    rows = visual_rows(record, idx, inputs["input_ids"], am.image_token_id, am.image_lengths(inputs))
                    matrix = found[name][rows.to(found[name].device)]
                    row[f"{name}_layer_rank"] = ranks.add((k, name), matrix)
                    row[f"{name}_layer_rows"] = int(matrix.shape[0])
                parsed = task.parse(text, ex)
                ok = bool(task.is_correct(parsed, ex))
                correct[k] += ok
                row.update(prediction=text, parsed=parsed, target=ex.target, correct=ok)
                lines.write(json.dumps(row) + "\n")
            if log:
                log(f"sample {n}/{len(samples)} done ({len(counts)} budgets)")

    n_samples = len(samples)
    raw = {
        "token_counts": counts,
        "accuracies": [correct[k] / n_samples for k in counts],
        "first_layer_ranks": ranks.means([(k, "first") for k in counts]).tolist(),
        "last_layer_ranks": ranks.means([(k, "last") for k in counts]).tolist(),
        "first_layer_effective_ranks": [ranks.mean_effective((k, "first")) for k in counts],
        "last_layer_effective_ranks": [ranks.mean_effective((k, "last")) for k in counts],
        "first_layer_rank_std": [ranks.std((k, "first")) for k in counts],
        "last_layer_rank_std": [ranks.std((k, "last")) for k in counts],
        "num_samples": n_samples,
        "layers": layers,
        "rank_threshold": rank_threshold,
        "settings": settings(
            am, task=task.name, dataset=task.dataset, split=task.split, method=method, params=params,
            max_new_tokens=max_new_tokens, decoding="greedy",
            rank_of="self_attn output (after o_proj) of the visual-token rows at prefill",
        ),
    }
    normalized = {
        **raw,
        "normalized_accuracies": minmax_normalize(raw["accuracies"]).tolist(),
        "normalized_first_layer_ranks": minmax_normalize(raw["first_layer_ranks"]).tolist(),
        "normalized_last_layer_ranks": minmax_normalize(raw["last_layer_ranks"]).tolist(),
    }
    write_json(out_dir / "raw_results.json", raw)
    write_json(out_dir / "normalized_results.json", normalized)
    line_plot(
        {
            "normalized accuracy": (counts, normalized["normalized_accuracies"]),
            f"first-layer rank (layer {layers['first']})": (counts, normalized["normalized_first_layer_ranks"]),
            f"last-layer rank (layer {layers['last']})": (counts, normalized["normalized_last_layer_ranks"]),
        },
        xlabel="visual tokens kept",
        ylabel="min–max normalised value",
        title=f"{method} pruning on {task.name} ({n_samples} samples)",
        path=out_dir / PLOT_STEM,
        invert_x=True,
    )
    return normalized
