"""`vtprune analyze heads`: which LLM heads look at the image (FinePruner's head strategies,
docs/methods/attention_options.md).

1. **Head map.** For every sample, the unpruned prefill runs with a capture on every decoder layer's
   attention (post-RoPE q/k, `signals.attention.add_capture`, removed afterwards); the last prompt token's
   attention to the visual tokens gives, per layer, an (H, V) block. Each head-selection strategy of
   `signals/heads.py` (`strategy_scores`: sparsity, graph_based, hierarchical, top_k_sum, max_attention,
   multi_objective, attention_range, image_mass) turns it into one score per head; the scores are averaged
   over samples into a layers × heads matrix per strategy (`heads_map.png/.pdf`, `heads_map.json`).
2. **Head ablation.** FastV (`heads=<strategy>, num_heads=<n>`, the given keep budget; other FastV
   parameters through `--param`) is evaluated on the samples for every strategy × head count × budget,
   next to FastV with the mean of all heads. Accuracy per cell goes to `heads_ablation.json`, with one
   plot per budget of accuracy against the head count (`heads_ablation.png/.pdf`) and the whole grid as a
   heat map (`heads_ablation_grid.png/.pdf`). Head counts are clipped to the model's heads and budgets to
   its visual tokens per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vtprune.analysis.common import (
    AnalysisModel,
    Sample,
    capture_last_token_attention,
    settings,
    write_json,
)
from vtprune.analysis.plots import heatmap, save_figure
from vtprune.eval.errors import EvalInputError
from vtprune.signals.heads import HEAD_STRATEGIES, strategy_scores

ABLATION_METHOD = "fastv"


def check_strategies(strategies: list[str], for_ablation: bool) -> None:
    extra = ("auto",) if for_ablation else ()
    bad = [s for s in strategies if s not in HEAD_STRATEGIES and s not in extra]
    if bad or not strategies:
        valid = ", ".join((*HEAD_STRATEGIES, *extra))
        raise EvalInputError(f"unknown head strategy {bad or strategies!r}; valid: {valid}")


def head_map(am: AnalysisModel, samples: list[Sample], strategies: list[str], log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """{strategy: (layers, heads) mean score}, plus the mean image mass of the last token per layer × head."""
    check_strategies(strategies, for_ablation=False)
    layers = list(range(am.num_layers))
    sums = {s: np.zeros((am.num_layers, am.num_heads)) for s in strategies}
    mass = np.zeros((am.num_layers, am.num_heads))
    for n, sample in enumerate(samples, start=1):
        inputs = am.encode(sample.example.question, sample.images)
        visual = am.visual_positions(inputs["input_ids"])
        with capture_last_token_attention(am, layers, visual) as found:
            am.prefill(inputs)
        for layer in layers:
            attn = found[layer][None, :, None, :]  # (1, H, 1, V)
            mass[layer] += attn[0, :, 0].sum(-1).numpy()
            for s in strategies:
                sums[s][layer] += strategy_scores(attn, s)[0].double().numpy()
        if log:
            log(f"head map: sample {n}/{len(samples)}")
    k = len(samples)
    return {
        "layers": layers,
        "heads": list(range(am.num_heads)),
        "query": "last prompt token -> visual tokens",
        "scores": {s: (v / k) for s, v in sums.items()},
        "image_mass": mass / k,
        "num_samples": k,
    }


def _draw_head_map(result: dict[str, Any], path: Path) -> list[Path]:
    names = list(result["scores"])
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    for ax, name in zip(axes, names, strict=False):
        matrix = np.asarray(result["scores"][name])
        shown = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
        fig.colorbar(shown, ax=ax, shrink=0.85)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    fig.suptitle(f"head-selection scores of the last token's image attention ({result['num_samples']} samples)")
    return save_figure(fig, path)


def head_ablation(
    am: AnalysisModel,
    task: Any,
    samples: list[Sample],
    strategies: list[str],
    head_counts: list[int],
    budgets: list[int],
    params: dict[str, Any],
    max_new_tokens: int,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy of FastV for every (strategy, head count, budget) cell and of all-head FastV per budget."""
    import vtprune

    check_strategies(strategies, for_ablation=True)
    cells = []
    for budget in budgets:
        cells.append({"strategy": "mean", "num_heads": None, "keep": budget})
        cells += [{"strategy": s, "num_heads": n, "keep": budget} for s in strategies for n in head_counts]
    for cell in cells:
        vtprune.get_method(ABLATION_METHOD, keep=cell["keep"], heads=cell["strategy"], num_heads=cell["num_heads"], **params)
    rows: list[list[dict[str, Any]]] = [[] for _ in cells]
    for n, sample in enumerate(samples, start=1):
        ex = sample.example
        inputs = am.encode(ex.question, sample.images)
        for i, cell in enumerate(cells):
            vtprune.prune(am.model, ABLATION_METHOD, keep=cell["keep"], heads=cell["strategy"], num_heads=cell["num_heads"], **params)
            try:
                text = am.generate(inputs, max_new_tokens)
            finally:
                vtprune.unprune(am.model)
            parsed = task.parse(text, ex)
            rows[i].append({**ex.fields, "id": ex.uid, "prediction": text, "parsed": parsed, "target": ex.target,
                            "correct": bool(task.is_correct(parsed, ex))})
        if log:
            log(f"head ablation: sample {n}/{len(samples)} ({len(cells)} cells)")
    out = []
    for cell, cell_rows in zip(cells, rows, strict=True):
        result = {**cell, "method": ABLATION_METHOD, "params": params, "n": len(cell_rows),
                  "accuracy": sum(r["correct"] for r in cell_rows) / len(cell_rows)}
        try:
            metrics = task.summarize(cell_rows)
            result[task.primary_metric] = metrics.get(task.primary_metric)
        except Exception:  # a task whose summary needs fields these rows lack: accuracy is still there
            pass
        out.append(result)
    return out


def _draw_ablation(results: list[dict[str, Any]], strategies: list[str], head_counts: list[int], budgets: list[int], out_dir: Path) -> list[Path]:
    ncols = len(budgets)
    fig = Figure(figsize=(4.6 * ncols, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, ncols, squeeze=False)).reshape(-1)

    def acc(strategy, n, budget):
        for r in results:
            if r["strategy"] == strategy and r["num_heads"] == n and r["keep"] == budget:
                return r["accuracy"]
        return np.nan

    for ax, budget in zip(axes, budgets, strict=True):
        for s in strategies:
            ax.plot(head_counts, [acc(s, n, budget) for n in head_counts], marker="o", label=s)
        ax.axhline(acc("mean", None, budget), color="grey", linestyle="--", label="all heads (mean)")
        ax.set(title=f"FastV, keep {budget}", xlabel="selected heads", ylabel="accuracy")
        ax.set_xticks(head_counts)
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    files = save_figure(fig, out_dir / "heads_ablation")
    labels = [f"{b}/{n}" for b in budgets for n in head_counts]
    matrix = [[acc(s, n, b) for b in budgets for n in head_counts] for s in strategies]
    matrix.append([acc("mean", None, b) for b in budgets for _ in head_counts])
    files += heatmap(
        matrix, [*strategies, "all heads"], labels, out_dir / "heads_ablation_grid",
        title="FastV accuracy: head strategy × (keep, heads)", xlabel="keep budget / selected heads",
        ylabel="strategy", colorbar_label="accuracy", annotate=len(labels) * len(matrix) <= 300, vmin=0.0, vmax=1.0,
        figsize=(min(3.5 + 0.75 * len(labels), 30.0), min(2.0 + 0.45 * len(matrix), 16.0)),
    )
    return files


def run_heads(
    am: AnalysisModel,
    task: Any,
    samples: list[Sample],
    output: str | Path,
    *,
    strategies: list[str],
    head_counts: list[int],
    budgets: list[int],
    params: dict[str, Any] | None = None,
    ablation: bool = True,
    max_new_tokens: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    params = dict(params or {})
    for reserved in ("heads", "num_heads", "keep"):
        if reserved in params:
            raise EvalInputError(f"--param {reserved}=... is set by the ablation grid; use --strategies/--head-counts/--budgets")
    map_strategies = [s for s in strategies if s in HEAD_STRATEGIES]
    check_strategies(strategies, for_ablation=True)
    out_dir = Path(output)
    head_counts = list(dict.fromkeys(min(n, am.num_heads) for n in head_counts))
    budgets = list(dict.fromkeys(min(b, am.tokens_per_image) for b in budgets))
    max_new_tokens = int(max_new_tokens or task.default_max_new_tokens)
    if ablation:  # validate the grid before the (cheaper) map runs
        import vtprune

        for b in budgets:
            vtprune.get_method(ABLATION_METHOD, keep=b, **params)
    data: dict[str, Any] = {
        "settings": settings(am, task=task.name, dataset=task.dataset, split=task.split, strategies=strategies,
                             head_counts=head_counts, budgets=budgets, method=ABLATION_METHOD, params=params,
                             max_new_tokens=max_new_tokens, decoding="greedy"),
    }
    figures: list[Path] = []
    if map_strategies:
        result = head_map(am, samples, map_strategies, log)
        figures += _draw_head_map(result, out_dir / "heads_map")
        write_json(out_dir / "heads_map.json", {"settings": data["settings"], **result})
        data["map"] = result
    if ablation:
        results = head_ablation(am, task, samples, strategies, head_counts, budgets, params, max_new_tokens, log)
        figures += _draw_ablation(results, strategies, head_counts, budgets, out_dir)
        write_json(out_dir / "heads_ablation.json", {"settings": data["settings"], "metric": "accuracy",
                                                     "primary_metric": task.primary_metric, "results": results})
        data["ablation"] = results
    data["figures"] = [str(f) for f in figures]
    return data


__all__ = ["head_ablation", "head_map", "run_heads"]
