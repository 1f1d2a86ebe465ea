"""`vtprune reproduce PAPER`: a paper's benchmark x budget grid for LLaVA-1.5-7B, run with its settings, and
vtprune's numbers printed beside the ones the paper reports.

The presets and the reference numbers live in `reproduce_presets.json` beside this file, each table with its
source (paper, table number, provenance: read in the paper or reprinted elsewhere) and its MME convention
(perception score or perception + cognition total: published copies mix them). An unknown cell stays empty.

Running is `vtprune sweep` once per task (vtprune/eval/sweep.py): the unpruned model plus the method at every
budget, the paper setting (vicuna_v1 prompt, pad-to-square), every cell resumable because the runner skips
finished samples. Then `reproduce.json` and `reproduce.md` hold both numbers per cell.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from vtprune.eval.config import EvalConfig, model_name
from vtprune.eval.distributed import DistContext
from vtprune.eval.errors import EvalInputError
from vtprune.eval.store import write_json_atomic, write_text_atomic
from vtprune.userinput import parse_keep

PRESETS_FILE = "reproduce_presets.json"
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


@dataclasses.dataclass
class Preset:
    """One paper's grid: the method with its settings, the budgets, the tasks and the reported numbers."""

    name: str
    paper: str
    method: str
    params: dict[str, Any]
    settings: str
    budgets: list[int]
    tasks: list[str]
    source: dict[str, str]  # table, provenance, mme
    baseline_source: dict[str, str]
    reference: dict[str, dict[str, float | None]]  # budget ("576" = unpruned) -> task -> number

    @property
    def mme(self) -> str:
        return self.source["mme"]

    def reported(self, task: str, budget: int | str | None) -> float | None:
        """The paper's number for a cell (budget None = the unpruned model), None when not reported."""
        key = "576" if budget is None else str(budget)
        return self.reference.get(key, {}).get(task)


def _data() -> dict[str, Any]:
    return json.loads(resources.files("vtprune.eval").joinpath(PRESETS_FILE).read_text(encoding="utf-8"))


def task_specs() -> dict[str, dict[str, Any]]:
    """How each benchmark's number is read from a vtprune summary (metric names, scale, paper split)."""
    return _data()["tasks"]


def list_presets() -> list[str]:
    return sorted(_data()["presets"])


def get_preset(name: str) -> Preset:
    data = _data()
    presets = data["presets"]
    key = name.lower().replace("-", "").replace("_", "")
    if key not in presets:
        raise EvalInputError(f"unknown paper preset {name!r}; valid presets: {', '.join(sorted(presets))}")
    raw = presets[key]
    sources = data["sources"]
    return Preset(
        name=key, paper=raw["paper"], method=raw["method"], params=dict(raw["params"]), settings=raw["settings"],
        budgets=list(raw["budgets"]), tasks=list(raw["tasks"]), source=sources[raw["source"]],
        baseline_source=sources[raw["baseline_source"]], reference=raw["reference"],
    )


def select(preset: Preset, tasks: list[str] | None, budgets: list[str] | None) -> tuple[list[str], list[Any]]:
    """The grid after `--tasks` (a subset of the preset's) and `--keep` (any budgets; the paper's by default)."""
    chosen = preset.tasks
    if tasks:
        unknown = [t for t in tasks if t not in preset.tasks]
        if unknown:
            raise EvalInputError(
                f"{', '.join(unknown)} not in the {preset.name} grid; its tasks: {', '.join(preset.tasks)}"
            )
        chosen = [t for t in preset.tasks if t in tasks]
    keeps = [parse_keep(k) for k in budgets] if budgets else list(preset.budgets)
    return chosen, keeps


def value_of(task: str, metrics: dict[str, Any], mme: str) -> tuple[float | None, str | None]:
    """(the benchmark's number on the paper's scale, the metric it came from); (None, None) when the summary
    holds none of the metric names the preset file lists for the task."""
    spec = task_specs()[task]
    names = spec["metric"][mme] if isinstance(spec["metric"], dict) else spec["metric"]
    for name in names:
        value = metrics.get(name)
        if isinstance(value, int | float):
            return float(value) * spec["scale"], name
    return None, None


def run_reproduce(
    preset: Preset,
    base: EvalConfig,
    tasks: list[str],
    keeps: list[Any],
    data: dict[str, str] | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the grid (each task through `run_sweep`, finished cells skipped) and write the comparison."""
    from vtprune.eval.sweep import run_sweep
    from vtprune.eval.tasks import list_tasks

    data = data or {}
    missing = [t for t in tasks if t not in list_tasks()]
    if missing:
        raise EvalInputError(
            f"task(s) {', '.join(missing)} of the {preset.name} grid are not in this vtprune; "
            f"run the others with --tasks (available: {', '.join(t for t in tasks if t not in missing) or 'none'})"
        )
    stray = sorted(set(data) - set(tasks))
    if stray:
        raise EvalInputError(f"--data names {', '.join(stray)}, not in the grid's tasks: {', '.join(tasks)}")
    params = [f"{name}={json.dumps(value)}" for name, value in preset.params.items()]
    rows: list[dict[str, Any]] = []
    for task in tasks:
        cfg = dataclasses.replace(base, task=task, split=task_specs()[task].get("split"), dataset_id=data.get(task))
        table = run_sweep(cfg, ["none", preset.method], keeps, params, log=log)
        for row in table.get("rows", []):
            rows.append(_cell(preset, task, row))
    if not DistContext.from_env().is_main:  # under torchrun / accelerate rank 0 merges and writes
        return {"cells": [], "dir": None}
    result = {
        "preset": preset.name, "paper": preset.paper, "method": preset.method, "params": preset.params,
        "settings": preset.settings, "source": preset.source, "baseline_source": preset.baseline_source,
        "mme": preset.mme, "model": base.model, "template": base.template, "preprocessing": base.preprocessing,
        "limit": base.limit, "tasks": tasks, "budgets": keeps, "cells": rows,
    }
    out_dir = Path(base.output) / f"reproduce-{preset.name}" / model_name(base.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "reproduce.json", result)
    write_text_atomic(out_dir / "reproduce.md", reproduce_markdown(preset, tasks, keeps, rows))
    result["dir"] = str(out_dir)
    return result


def _cell(preset: Preset, task: str, row: dict[str, Any]) -> dict[str, Any]:
    budget = None if row["method"] == "none" else row["keep"]
    cell = {"task": task, "method": row["method"], "keep": budget, "paper": preset.reported(task, budget),
            "vtprune": None, "metric": None, "n": row.get("n"), "complete": row.get("complete"),
            "tokens_after_pruning": row.get("tokens_after_pruning"), "layer_avg_tokens": row.get("layer_avg_tokens"),
            "run_dir": row.get("run_dir"), "error": row.get("error")}
    summary_file = Path(row["run_dir"]) / "summary.json" if row.get("run_dir") else None
    if summary_file and summary_file.exists():
        metrics = json.loads(summary_file.read_text(encoding="utf-8")).get("metrics", {})
        cell["vtprune"], cell["metric"] = value_of(task, metrics, preset.mme)
        if cell["metric"] is None:
            cell["error"] = f"no metric among {task_specs()[task]['metric']} in {summary_file}"
    return cell


# ------------------------------------------------------------------------------------------ tables


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _label(budget: Any) -> str:
    return "576 (unpruned)" if budget is None else str(budget)


def grid_rows(preset: Preset, tasks: list[str], keeps: list[Any],
              cells: list[dict[str, Any]] | None = None) -> list[list[str]]:
    """One row per budget (the unpruned model first), per task "vtprune / paper" (or the paper's alone)."""
    found = {(c["task"], c["keep"]): c for c in cells or []}
    rows = []
    for budget in [None, *keeps]:
        row = [_label(budget)]
        for task in tasks:
            paper = _num(preset.reported(task, budget))
            if cells is None:
                row.append(paper)
                continue
            ours = _num(found.get((task, budget), {}).get("vtprune"))
            row.append(f"{ours or '-'} / {paper or '-'}")
        rows.append(row)
    return rows


def _headers(tasks: list[str], preset: Preset) -> list[str]:
    specs = task_specs()
    return ["tokens", *[specs[t]["column"] + (f" ({preset.mme})" if t == "mme" else "") for t in tasks]]


def reproduce_markdown(preset: Preset, tasks: list[str], keeps: list[Any],
                       cells: list[dict[str, Any]] | None = None) -> str:
    lines = [f"# {preset.paper}", "", f"method `{preset.method}` {preset.params}; {preset.settings}", "",
             f"Reported numbers: {preset.source['table']} ({preset.source['provenance']}); unpruned row: "
             f"{preset.baseline_source['table']}. MME = {preset.mme}.", ""]
    header = _headers(tasks, preset)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in grid_rows(preset, tasks, keeps, cells)]
    if cells is not None:
        lines += ["", "Cells: vtprune / paper; empty = not run or not reported."]
    return "\n".join(lines) + "\n"


def _console():
    from rich.console import Console

    width = Console().width
    return Console(width=max(width, 160))  # ten benchmark columns do not fit 80 characters


def print_table(preset: Preset, tasks: list[str], keeps: list[Any],
                cells: list[dict[str, Any]] | None = None, console: Any = None) -> None:
    """The grid as a rich table: the paper's numbers (dry run), or vtprune / paper per cell."""
    from rich.table import Table

    console = console or _console()
    title = f"{preset.name}: {'vtprune / paper' if cells is not None else 'reported numbers'}"
    table = Table(title=title)
    for header in _headers(tasks, preset):
        table.add_column(header, overflow="fold")
    for row in grid_rows(preset, tasks, keeps, cells):
        table.add_row(*row)
    console.print(table)
    console.print(f"MME = {preset.mme}. Reported: {preset.source['table']} ({preset.source['provenance']}); "
                  f"unpruned row: {preset.baseline_source['table']}. Empty: not reported.", soft_wrap=True)


def print_plan(preset: Preset, base: EvalConfig, tasks: list[str], keeps: list[Any], console: Any = None) -> None:
    """`--dry-run`: what would run (one sweep per task) and the paper's table."""
    from vtprune.eval.tasks import list_tasks

    console = console or _console()
    available = set(list_tasks())
    console.print(f"[bold]{preset.paper}[/bold]")
    console.print(f"method {preset.method} {preset.params}: {preset.settings}")
    console.print(f"model {base.model}, template {base.template}, preprocessing {base.preprocessing}, "
                  f"budgets {', '.join(str(k) for k in keeps)} + the unpruned model")
    specs = task_specs()
    for task in tasks:
        state = "" if task in available else "  [red](task not in this vtprune)[/red]"
        console.print(f"  {task}: {1 + len(keeps)} runs, paper split: {specs[task]['paper_split']}{state}")
    print_table(preset, tasks, keeps, None, console)
