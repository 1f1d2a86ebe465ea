"""`vtprune demo`: the main job on the embedded default — offline, CPU, under two minutes.

A sweep of a few methods at a few budgets on a sample of `shapes-pope` with the shipped testbed model,
printing the table and writing the accuracy-vs-tokens plot. It is `vtprune sweep` with fixed defaults, so
every cell is an ordinary, resumable evaluation run under `--output`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from vtprune.cli_common import DeviceOpt, MethodsOpt, reports_user_errors
from vtprune.eval.distributed import shutdown

DEMO_METHODS = "none,random,l2norm,vispruner,fastv"
DEMO_KEEP = "64,16"


@reports_user_errors
def demo_command(
    methods: MethodsOpt = DEMO_METHODS,
    keep: Annotated[str, typer.Option("--keep", help="Comma-separated budgets (visual tokens per image).")] = DEMO_KEEP,
    split: Annotated[str, typer.Option("--split", help="random | popular | adversarial | all.")] = "adversarial",
    limit: Annotated[int, typer.Option("--limit", help="Questions per split.")] = 40,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 20,
    output: Annotated[Path, typer.Option("--output", help="Root folder of the results.")] = Path("results/demo"),
    device: DeviceOpt = "cpu",
) -> None:
    """Compare pruning methods on the shipped testbed model and the shapes-pope benchmark (offline)."""
    from vtprune.eval.commands import _log
    from vtprune.eval.config import EvalConfig
    from vtprune.eval.sweep import run_sweep, sweep_markdown
    from vtprune.userinput import parse_list

    start = time.perf_counter()
    try:
        base = EvalConfig(
            model="testbed", task="shapes-pope", split=split, max_new_tokens=3, dtype="float32",
            batch_size=batch_size, limit=limit, output=str(output), device=device,
        )
        table = run_sweep(base, parse_list(methods), parse_list(keep), None, log=_log)
    finally:
        shutdown()
    if not table:
        return
    typer.echo(sweep_markdown(table))
    for plot in table.get("plots", []):
        typer.echo(f"plot: {plot}")
    typer.echo(f"results: {table['dir']}  ({time.perf_counter() - start:.0f} s)")
