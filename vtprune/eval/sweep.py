"""Methods x budgets grid: one eval run per cell (finished cells are skipped by the runner), then a table
(JSON + Markdown) and the accuracy-vs-tokens (and, when FLOPs were recorded, accuracy-vs-TFLOPs) plots.

The model is loaded once for the whole grid; each cell only switches the pruning method. The x axis is the
layer-averaged number of visual tokens read from the pruning records, the quantity that makes vision-stage
and in-LLM methods comparable (docs/methods/README.md); "tokens after pruning" is in the table too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtprune.eval.config import EvalConfig, config_hash, model_name
from vtprune.eval.distributed import DistContext
from vtprune.eval.errors import EvalInputError
from vtprune.eval.predictor import Predictor, resolve_device
from vtprune.eval.runner import _load_predictor, prepare_task, run_eval
from vtprune.eval.store import write_json_atomic, write_text_atomic
from vtprune.userinput import parse_keep, split_params


@dataclasses.dataclass
class Cell:
    method: str
    keep: int | float | None
    params: dict[str, Any]


def plan_cells(methods: list[str], keeps: list[str | int | float], params: dict[str, dict[str, Any]]) -> list[Cell]:
    """`none` runs once (all tokens); every other method runs at every budget."""
    if not methods:
        raise EvalInputError("--methods is empty")
    budgets = [parse_keep(k) for k in keeps]
    cells = []
    for method in methods:
        if method == "none":
            cells.append(Cell("none", None, {}))
        else:
            if not budgets:
                raise EvalInputError(f"method {method!r} needs at least one --keep budget")
            cells += [Cell(method, k, dict(params.get(method, {}))) for k in budgets]
    return cells


def run_sweep(
    base: EvalConfig,
    methods: list[str],
    keeps: list[str | int | float],
    param_items: list[str] | None = None,
    *,
    dist: DistContext | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the grid and write `sweep.json`, `sweep.md` and the plots; returns the combined table."""
    dist = dist or DistContext.from_env()
    cells = plan_cells(methods, keeps, split_params(param_items, methods))
    configs = [dataclasses.replace(base, method=c.method, keep=c.keep, params=c.params) for c in cells]
    for cfg in configs:  # every cell's input checked before the first one runs
        prepare_task(cfg)
    predictor: list[Predictor] = []

    def shared_predictor() -> Predictor:
        if not predictor:
            predictor.append(_load_predictor(configs[0], resolve_device(base.device, dist.local_rank)))
        return predictor[0]

    rows = []
    for cell, cfg in zip(cells, configs, strict=True):
        try:
            result = run_eval(cfg, predictor_factory=shared_predictor, dist=dist, log=log)
        except ValueError as exc:  # e.g. a budget above the model's visual tokens, found at prune() time
            if log and dist.is_main:
                log(f"cell {cell.method} keep={cell.keep} failed: {exc}")
            rows.append({"method": cell.method, "keep": cell.keep, "params": cell.params, "error": str(exc)})
            continue
        if dist.is_main:
            rows.append(_table_row(cell, result.summary, result.run_dir))
    if not dist.is_main:
        return {}
    sweep_identity = {
        "base": {k: v for k, v in dataclasses.asdict(configs[0]).items()
                 if k not in ("method", "keep", "params", *EvalConfig.IDENTITY_EXCLUDED)},
        "cells": [dataclasses.asdict(c) for c in cells],
    }
    out_dir = (Path(base.output) / f"{base.task}-{configs[0].split}" / model_name(base.model)
               / f"sweep-{config_hash(sweep_identity)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = {"task": base.task, "split": configs[0].split, "model": base.model, "metric": "accuracy",
             "identity": sweep_identity, "rows": rows}
    write_json_atomic(out_dir / "sweep.json", table)
    write_text_atomic(out_dir / "sweep.md", sweep_markdown(table))
    table["plots"] = plot_sweep(table, out_dir)
    table["dir"] = str(out_dir)
    write_json_atomic(out_dir / "sweep.json", table)
    return table


def _table_row(cell: Cell, summary: dict[str, Any] | None, run_dir: Path) -> dict[str, Any]:
    summary = summary or {}
    metrics = summary.get("metrics", {})
    tokens = summary.get("tokens", {})
    counts = summary.get("counts", {})
    return {
        "method": cell.method,
        "keep": cell.keep,
        "params": cell.params,
        "accuracy": metrics.get("accuracy"),
        "f1": metrics.get("f1"),
        "primary_metric": summary.get("primary_metric"),
        "primary": metrics.get(summary.get("primary_metric", "accuracy")),
        "visual_tokens": tokens.get("visual_tokens"),
        "tokens_after_pruning": tokens.get("tokens_after_pruning"),
        "layer_avg_tokens": tokens.get("layer_avg_tokens"),
        "prefill_tflops": tokens.get("prefill_tflops"),
        "n": counts.get("evaluated"),
        "errors": counts.get("errors"),
        "complete": counts.get("complete"),
        "samples_per_s": (summary.get("timing") or {}).get("samples_per_s"),
        "run_dir": str(run_dir),
        "error": None,
    }


def sweep_markdown(table: dict[str, Any]) -> str:
    # A task whose headline number is neither accuracy nor F1 (MME's perception score, MMBench's CircularEval
    # accuracy, MM-Vet's judge score) gets it as an extra column.
    extra = next((r["primary_metric"] for r in table["rows"]
                  if r.get("primary_metric") not in (None, "accuracy", "f1")), None)
    lines = [
        f"# Sweep: {table['task']} / {table['split']} -- `{table['model']}`",
        "",
        "| method | keep | accuracy | F1 | tokens after pruning | layer-avg tokens | prefill TFLOPs | n | errors |"
        + (f" {extra} |" if extra else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""),
    ]
    for r in table["rows"]:
        keep = "all" if r["method"] == "none" else r["keep"]
        if r.get("error"):
            lines.append(f"| {r['method']} | {keep} | failed: {r['error']} | | | | | | |" + (" |" if extra else ""))
            continue
        lines.append(
            f"| {r['method']} | {keep} | {_f(r['accuracy'])} | {_f(r['f1'])} | {_f(r['tokens_after_pruning'], 1)} "
            f"| {_f(r['layer_avg_tokens'], 1)} | {_g(r['prefill_tflops'])} | {r['n']} | {r['errors']} |"
            + (f" {_g(r.get('primary'))} |" if extra else "")
        )
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def plot_sweep(table: dict[str, Any], out_dir: Path) -> list[str]:
    """accuracy_vs_tokens.{png,pdf}; accuracy_vs_tflops.{png,pdf} when FLOPs were recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if not r.get("error") and r.get("accuracy") is not None]
    written: list[str] = []
    for x_key, x_label, stem in (
        ("layer_avg_tokens", "visual tokens (average over LLM layers)", "accuracy_vs_tokens"),
        ("prefill_tflops", "prefill TFLOPs per sample", "accuracy_vs_tflops"),
    ):
        if not rows or any(r.get(x_key) is None for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r[x_key], r["accuracy"]) for r in rows if r["method"] == method)
            xs, ys = zip(*points, strict=True)
            if method == "none":
                ax.axhline(ys[0], color="grey", linestyle="--", linewidth=1, label=f"none ({xs[0]:.0f} tokens)"
                           if x_key == "layer_avg_tokens" else "none")
                ax.plot(xs, ys, "o", color="grey")
            else:
                ax.plot(xs, ys, "o-", label=method)
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{table['task']} / {table['split']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            path = out_dir / f"{stem}.{ext}"
            fig.savefig(path, dpi=150)
            written.append(str(path))
        plt.close(fig)
    return written
