"""Typer command functions for `vtprune eval | sweep | compare | reproduce | tasks` (registered by vtprune/cli.py).

They are plain functions so the CLI module owns the app: `register(app)` adds all of them, or register one
by one with `app.command("eval")(eval_command)`. `python -m vtprune.eval` runs them without vtprune/cli.py.
Bad input exits with status 2 and a one-line message naming the valid choices.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any  # noqa: UP035 -- typer reads Optional on 3.10

import typer

from vtprune.cli_common import (
    AttnOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    KeepOpt,
    MethodOpt,
    MethodsOpt,
    ModelOpt,
    ParamOpt,
    PreprocOpt,
    TemplateOpt,
    reports_user_errors,
)
from vtprune.eval.config import EvalConfig
from vtprune.eval.distributed import shutdown
from vtprune.eval.errors import EvalInputError
from vtprune.userinput import parse_list, parse_params

TaskOpt = Annotated[str, typer.Option("--task", help="Task name (see `vtprune tasks`).")]
SplitOpt = Annotated[str | None, typer.Option("--split", help="Split; POPE: random|popular|adversarial|all.")]
DatasetOpt = Annotated[str | None, typer.Option("--dataset-id", help="Hub dataset id or local parquet/folder.")]
DatasetConfigOpt = Annotated[str | None, typer.Option("--dataset-config", help="Dataset config (POPE: Full).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Dataset revision (branch, tag, commit).")]
ParserOpt = Annotated[str | None, typer.Option("--parser", help="Answer parser (POPE: llava|exact|word; SQA: llava|lenient).")]
PaperOpt = Annotated[
    bool, typer.Option("--paper-setting", help="Paper reproduction: vicuna_v1 + pad (LLaVA-NeXT: + AnyRes).")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per generate() call.")]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", help="Generation length (task default if unset).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="First N samples (per split for POPE all).")]
ModelRevOpt = Annotated[str | None, typer.Option("--model-revision", help="Model revision on the Hub.")]
RetryOpt = Annotated[bool, typer.Option("--retry-errors", help="Re-run samples recorded as errors.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]


def _config(
    model: str, task: str, split: str | None, dataset_id: str | None, dataset_config: str | None,
    revision: str | None, parser: str | None, method: str, keep: str | None, param: list[str] | None,
    template: str | None, preprocessing: str | None, paper_setting: bool, batch_size: int,
    max_new_tokens: int | None, limit: int | None, output: Path, dtype: str, device: str,
    attn_implementation: str, model_revision: str | None, retry_errors: bool, progress: bool, compile: bool,
) -> EvalConfig:
    template, preprocessing = resolve_setting(template, preprocessing, paper_setting, model_type_of(model))
    return EvalConfig(
        model=model, task=task, split=split, dataset_id=dataset_id, dataset_config=dataset_config,
        revision=revision, parser=parser, method=method, keep=keep, params=parse_params(param),
        template=template, preprocessing=preprocessing, max_new_tokens=max_new_tokens, dtype=dtype,
        attn_implementation=attn_implementation, model_revision=model_revision, batch_size=batch_size,
        limit=limit, output=str(output), device=device, retry_errors=retry_errors, progress=progress,
        compile=compile,
    )


# The papers' reproduction setting per model family: LLaVA-1.5 pads images to squares (expand2square);
# LLaVA-NeXT's reference code (image_aspect_ratio="anyres") pads nothing, its processor tiles the image.
PAPER_PREPROCESSING = {"llava": "pad", "llava_next": "crop"}


def model_type_of(model: str) -> str:
    """The checkpoint's `model_type` ("llava" when its config cannot be read here, e.g. offline)."""
    from transformers import AutoConfig

    from vtprune.loading import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(model)).model_type
    except (OSError, ValueError):
        return "llava"


def resolve_setting(
    template: str | None, preprocessing: str | None, paper_setting: bool, model_type: str = "llava"
) -> tuple[str, str]:
    """`--paper-setting` = vicuna_v1 + the family's paper preprocessing (LLaVA-1.5: pad; LLaVA-NeXT: its
    processor's AnyRes tiling, "crop"); an explicit contradicting flag is an error, not a silent override."""
    if not paper_setting:
        return template or "hf", preprocessing or "crop"
    paper = PAPER_PREPROCESSING.get(model_type, "pad")
    if template not in (None, "vicuna_v1") or preprocessing not in (None, paper):
        raise EvalInputError(
            f"--paper-setting means --template vicuna_v1 --preprocessing {paper} for a {model_type} model; "
            "drop the other flag"
        )
    return "vicuna_v1", paper


def _log(message: str) -> None:
    typer.echo(message, err=True)


@reports_user_errors
def eval_command(
    model: ModelOpt,
    task: TaskOpt = "pope",
    split: SplitOpt = None,
    dataset_id: DatasetOpt = None,
    dataset_config: DatasetConfigOpt = None,
    revision: RevisionOpt = None,
    parser: ParserOpt = None,
    method: MethodOpt = "none",
    keep: KeepOpt = None,
    param: ParamOpt = None,
    template: TemplateOpt = None,
    preprocessing: PreprocOpt = None,
    paper_setting: PaperOpt = False,
    batch_size: BatchOpt = 1,
    max_new_tokens: MaxNewOpt = None,
    limit: LimitOpt = None,
    output: Annotated[Path, typer.Option("--output", help="Root folder of the results.")] = Path("results"),
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attn_implementation: AttnOpt = "sdpa",
    model_revision: ModelRevOpt = None,
    retry_errors: RetryOpt = False,
    progress: ProgressOpt = True,
    compile: CompileOpt = False,
) -> None:
    """Evaluate one model / method / budget on a task; resumable; shards over ranks under torchrun/accelerate."""
    from vtprune.eval.runner import run_eval
    from vtprune.eval.tasks import get_task

    try:
        cfg = _config(model, task, split, dataset_id, dataset_config, revision, parser, method, keep, param,
                      template, preprocessing, paper_setting, batch_size, max_new_tokens, limit, output, dtype,
                      device, attn_implementation, model_revision, retry_errors, progress, compile)
        result = run_eval(cfg, log=_log)
        if result.summary is not None:
            task_obj = get_task(cfg.task, dataset=cfg.dataset_id, split=cfg.split, config=cfg.dataset_config,
                                revision=cfg.revision, parser=cfg.parser)
            typer.echo(task_obj.summary_table(result.summary["metrics"]))
            counts = result.summary["counts"]
            typer.echo(f"\n{counts['evaluated']} evaluated, {counts['errors']} errors -> {result.run_dir}")
    finally:
        shutdown()


@reports_user_errors
def sweep_command(
    model: ModelOpt,
    task: TaskOpt = "pope",
    split: SplitOpt = None,
    methods: MethodsOpt = "none",
    keep: Annotated[str, typer.Option("--keep", help="Comma-separated budgets, e.g. 576,192,128,64 or 0.25,320/2880.")] = "",
    param: ParamOpt = None,
    dataset_id: DatasetOpt = None,
    dataset_config: DatasetConfigOpt = None,
    revision: RevisionOpt = None,
    parser: ParserOpt = None,
    template: TemplateOpt = None,
    preprocessing: PreprocOpt = None,
    paper_setting: PaperOpt = False,
    batch_size: BatchOpt = 1,
    max_new_tokens: MaxNewOpt = None,
    limit: LimitOpt = None,
    output: Annotated[Path, typer.Option("--output", help="Root folder of the results.")] = Path("results"),
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attn_implementation: AttnOpt = "sdpa",
    model_revision: ModelRevOpt = None,
    retry_errors: RetryOpt = False,
    progress: ProgressOpt = True,
    compile: CompileOpt = False,
) -> None:
    """Run methods x budgets (finished cells skipped), then a combined table and accuracy-vs-tokens plots."""
    from vtprune.eval.sweep import run_sweep, sweep_markdown

    try:
        base = _config(model, task, split, dataset_id, dataset_config, revision, parser, "none", None, None,
                       template, preprocessing, paper_setting, batch_size, max_new_tokens, limit, output, dtype,
                       device, attn_implementation, model_revision, retry_errors, progress, compile)
        table = run_sweep(base, parse_list(methods), parse_list(keep), param, log=_log)
        if table:
            typer.echo(sweep_markdown(table))
            typer.echo(f"-> {table['dir']}")
    finally:
        shutdown()


@reports_user_errors
def reproduce_command(
    paper: Annotated[str, typer.Argument(help="Paper preset: vispruner, cdpruner, fastv, sparsevlm, pdrop, visionzip, dart.")],
    model: Annotated[str, typer.Option("--model", help="Hub id or local folder of a LLaVA-1.5 checkpoint.")] = (
        "llava-hf/llava-1.5-7b-hf"),
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated subset of the paper's tasks.")] = None,
    keep: Annotated[str | None, typer.Option("--keep", help="Comma-separated budgets (default: the paper's).")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="task=dataset (Hub id or local folder), repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the grid and the paper's table; run nothing.")] = False,
    batch_size: BatchOpt = 1,
    max_new_tokens: MaxNewOpt = None,
    limit: LimitOpt = None,
    output: Annotated[Path, typer.Option("--output", help="Root folder of the results.")] = Path("results"),
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attn_implementation: AttnOpt = "sdpa",
    model_revision: ModelRevOpt = None,
    retry_errors: RetryOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """A paper's benchmark x budget grid with its settings (vicuna_v1 + pad), vtprune beside the paper; resumable."""
    from vtprune.eval.reproduce import get_preset, print_plan, print_table, run_reproduce, select

    try:
        preset = get_preset(paper)
        chosen, keeps = select(preset, parse_list(tasks or ""), parse_list(keep or ""))
        datasets = dict(_task_value(item) for item in data or [])
        # the presets are LLaVA-1.5 grids: a dry run reads no checkpoint config (it may be a Hub id, offline)
        template, preprocessing = resolve_setting(None, None, True, "llava" if dry_run else model_type_of(model))
        base = EvalConfig(model=model, task=chosen[0], template=template, preprocessing=preprocessing, dtype=dtype,
                          attn_implementation=attn_implementation, model_revision=model_revision,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, output=str(output), device=device,
                          retry_errors=retry_errors, progress=progress)
        if dry_run:
            print_plan(preset, base, chosen, keeps)
            return
        result = run_reproduce(preset, base, chosen, keeps, datasets, log=_log)
        if result["dir"]:
            print_table(preset, chosen, keeps, result["cells"])
            typer.echo(f"-> {result['dir']}")
    finally:
        shutdown()


def _task_value(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise EvalInputError(f"--data expects task=dataset, got {item!r}")
    task, value = item.split("=", 1)
    return task.strip(), value.strip()


@reports_user_errors
def compare_command(
    run_a: Annotated[Path, typer.Argument(help="Result folder (or samples.jsonl) of run A, the reference.")],
    run_b: Annotated[Path, typer.Argument(help="Result folder (or samples.jsonl) of run B.")],
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples.")] = 10_000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the statistics to this file.")] = None,
) -> None:
    """Paired comparison of two runs: agreement, McNemar p-value, bootstrap 95% CI of the accuracy difference."""
    from vtprune.eval.compare import compare_runs, comparison_markdown

    result = compare_runs(run_a, run_b, n_boot=bootstrap, seed=seed)
    typer.echo(comparison_markdown(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


@reports_user_errors
def tasks_command() -> None:
    """List the evaluation tasks with their default data, split, parser and metric."""
    from vtprune.eval.tasks import get_task, list_tasks

    for name in list_tasks():
        try:
            t = get_task(name)
        except Exception as exc:  # a plugin task whose default data is missing still gets listed
            typer.echo(f"{name}: ({exc})")
            continue
        splits = ", ".join(t.valid_splits) if t.valid_splits else "any"
        typer.echo(f"{name}: data {t.dataset} [{t.config}], split {t.split} (valid: {splits}), "
                   f"parsers {', '.join(t.parsers)} (default {t.default_parser}), metric {t.primary_metric}")


COMMANDS: dict[str, Callable[..., Any]] = {
    "eval": eval_command,
    "sweep": sweep_command,
    "compare": compare_command,
    "reproduce": reproduce_command,
    "tasks": tasks_command,
}


def register(app: typer.Typer) -> typer.Typer:
    """Add `eval`, `sweep`, `compare`, `reproduce` and `tasks` to a Typer app."""
    for name, func in COMMANDS.items():
        app.command(name)(func)
    return app


def build_app() -> typer.Typer:
    """A stand-alone app with the evaluation commands (`python -m vtprune.eval ...`)."""
    return register(typer.Typer(add_completion=False, no_args_is_help=True, help="vtprune evaluation"))


def main(argv: list[str] | None = None) -> None:
    build_app()(args=argv if argv is not None else sys.argv[1:], prog_name="vtprune")
