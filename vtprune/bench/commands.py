"""`vtprune bench`: the command-line front of bench/runner.py (registered by vtprune/cli.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from vtprune.cli_common import (
    AttnOpt,
    DeviceOpt,
    DtypeOpt,
    MethodsOpt,
    OutputOpt,
    ParamOpt,
    reports_user_errors,
)
from vtprune.errors import UserInputError
from vtprune.userinput import parse_int_list, parse_list, split_params

__all__ = ["bench_command", "bench_eval_command", "parse_image_size", "parse_keeps"]


def parse_keeps(raw: str) -> list[int | str]:
    """`640,320,160` or `all,640,160`: counts per image, `all` = every token of the image."""
    from vtprune.bench.runner import KEEP_ALL

    keeps: list[int | str] = []
    for item in (raw or "").split(","):
        item = item.strip()
        if item.lower() == KEEP_ALL:
            keeps.append(KEEP_ALL)
        elif item:
            keeps += parse_int_list(item, "--keep")
    if not keeps:
        raise UserInputError("--keep names no value")
    return keeps


def parse_image_size(raw: str | None) -> tuple[int, int] | None:
    """`672x672` (height x width) or `672` (square) -> (672, 672); None stays None (the model's default).
    Whether the numbers are positive is checked with the rest of the configuration."""
    if raw is None:
        return None
    parts = raw.lower().replace("×", "x").split("x")
    try:
        values = [int(part.strip()) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise UserInputError(f"--image-size expects HEIGHTxWIDTH (e.g. 672x672) or one side, got {raw!r}")
    return (values[0], values[-1])


@reports_user_errors
def bench_command(
    model: str = typer.Option(
        None,
        help="Hugging Face id or local folder of a LLaVA-1.5, LLaVA-NeXT (1.6), Qwen2-VL or Qwen2.5-VL "
        "checkpoint.",
    ),
    arch: str = typer.Option(
        None,
        help="Architecture preset instead of a checkpoint: llava-1.5-7b, llava-1.5-13b, llava-1.6-vicuna-7b, "
        "llava-1.6-vicuna-13b, qwen2.5-vl-7b, qwen2-vl-7b (with --random-weights), tiny, tiny-next, "
        "tiny-qwen2.5-vl, tiny-qwen2-vl (tiny test models, CPU).",
    ),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Random weights with the real architecture (no checkpoint needed)."
    ),
    methods: MethodsOpt = "none,fastv,vispruner",
    keep: str = typer.Option(
        "576,192,128,64",
        help="Visual-token budgets per image, comma-separated; `all` = every token of the image. LLaVA-NeXT: "
        "counts per image of --image-size (e.g. 640,320,160 of 2,928).",
    ),
    batch: str = typer.Option("1,16", help="Batch sizes, comma-separated."),
    new_tokens: int = typer.Option(8, help="Tokens generated per sample (greedy, EOS disabled)."),
    attn: AttnOpt = "sdpa",
    cache: str = typer.Option(
        "dynamic", help="generate()'s KV cache: dynamic, or static (preallocated; on a GPU generate compiles decode)."
    ),
    compile_prefill: bool = typer.Option(
        False,
        help="Compile the prefill's vision tower and decoder stack (torch.compile) for every subject, the unpruned "
        "model, oracles and short prompts alike; the compiling calls are not timed.",
    ),
    compile_mode: str = typer.Option(
        "reduce-overhead",
        help="torch.compile mode of --compile-prefill: reduce-overhead (CUDA graphs; at batch 1 the only one that "
        "gains, README: Compiled prefill), default or max-autotune-no-cudagraphs.",
    ),
    repeats: int = typer.Option(5, help="Timed repeats per measurement (medians reported)."),
    warmup: int = typer.Option(1, help="Untimed calls before each measurement."),
    generate_repeats: int = typer.Option(
        None, help="Timed generate() calls per subject (default: --repeats)."
    ),
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    output: Path = typer.Option(..., help="Folder for results.json, results.md and the plots."),
    text_tokens: int = typer.Option(60, help="Text tokens of the synthetic prompt."),
    image_size: str = typer.Option(
        None,
        help="LLaVA-NeXT and Qwen-VL: HEIGHTxWIDTH of the synthetic image. LLaVA-NeXT default: twice the "
        "tower's resolution, square; 672x672 on LLaVA-1.6 = base view + 2x2 tiles = 576 + 48x48 + 48 "
        "newlines = 2,928 tokens, the vision tower on 5 inputs; 112x112 on tiny-next = 88 tokens. Qwen-VL: "
        "sides multiples of 28 px (16 on the tiny ones), default 896x896 = 1,024 tokens (128x128 = 64 on "
        "tiny-qwen*).",
    ),
    param: ParamOpt = None,
    oracle: bool = typer.Option(True, help="Also time each method's oracle (its kept tokens, no scoring)."),
    oracle_generate: bool = typer.Option(
        True, help="Also time the oracle's generate() (e2e and decode overhead)."
    ),
    profile: bool = typer.Option(
        False, help="Profile one prefill per method at the largest batch and smallest budget."
    ),
    time_budget: float = typer.Option(
        None, help="Seconds after which the remaining configurations are skipped."
    ),
    seed: int = typer.Option(0, help="Seed of the random weights and inputs."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Time pruning methods (prefill, decode, memory, FLOPs) against the unpruned model and the oracle
    (`--methods all`: every registered method)."""
    from rich.console import Console

    from vtprune.bench.runner import BenchConfig, expand_methods, run_bench

    console = Console(stderr=True)
    names = expand_methods(parse_list(methods))
    cfg = BenchConfig(
        model=model,
        arch=arch,
        random_weights=random_weights,
        methods=names,
        keeps=parse_keeps(keep),
        batches=parse_int_list(batch, "--batch"),
        new_tokens=new_tokens,
        attn=attn,
        cache=cache,
        compile_prefill=compile_prefill,
        compile_mode=compile_mode,
        repeats=repeats,
        warmup=warmup,
        generate_repeats=generate_repeats,
        dtype=dtype,
        device=device,
        output=output,
        text_tokens=text_tokens,
        image_size=parse_image_size(image_size),
        params=split_params(param, names),
        oracle=oracle,
        oracle_generate=oracle_generate,
        profile=profile,
        time_budget_s=time_budget,
        seed=seed,
        progress=progress,
    )
    results = run_bench(cfg, log=lambda msg: console.log(msg))
    failed = [e for e in results["results"] if e.get("status") != "ok"]
    console.print(f"wrote {output}/results.json, results.md, prefill_vs_tokens.png/pdf, pareto.png/pdf")
    if failed:
        console.print(f"[yellow]{len(failed)} configuration(s) did not run; see results.json[/yellow]")
    print((Path(output) / "results.md").read_text())


@reports_user_errors
def bench_eval_command(
    output: OutputOpt,
    arch: str = typer.Option(
        "llava-1.5-7b",
        help="Architecture: llava-1.5-7b, llava-1.5-13b (with --random-weights), or tiny (the tiny test model, CPU).",
    ),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Random weights with the real architecture (no checkpoint needed)."
    ),
    methods: MethodsOpt = "none,visionzip,vispruner,divprune",
    keep: int = typer.Option(64, help="Visual tokens kept per image by the pruning methods (`none` keeps all)."),
    batch: int = typer.Option(32, help="Batch size of `vtprune eval`."),
    samples: int = typer.Option(128, help="Samples of the POPE-shaped workload (the same on both sides)."),
    new_tokens: int = typer.Option(8, help="Tokens generated per answer on both sides (EOS cannot stop earlier)."),
    image_size: str = typer.Option("480x640", help="HEIGHTxWIDTH of the workload's random JPEG images (COCO-like)."),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    warmup: bool = typer.Option(True, help="Warm up each side untimed (2 batch-1 samples; one eval batch)."),
    target: float = typer.Option(6.0, help="Required speed-up of vtprune eval with pruning over the batch-1 loop."),
    seed: int = typer.Option(0, help="Seed of the random weights and images."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Evaluation throughput: samples/s of `vtprune eval` batched with pruning vs the unpruned model in an
    lmms-eval-style batch-1 loop, on a POPE-shaped workload (one image, a yes/no question, short answers)."""
    from rich.console import Console

    from vtprune.bench.eval_throughput import EvalThroughputConfig, run_eval_throughput, summary_lines

    console = Console(stderr=True)
    size = parse_image_size(image_size)
    cfg = EvalThroughputConfig(
        output=output, arch=arch, random_weights=random_weights, methods=parse_list(methods), keep=keep,
        batch=batch, samples=samples, new_tokens=new_tokens, image_size=size, device=device, dtype=dtype,
        attn=attn, warmup=warmup, seed=seed, target=target, progress=progress,
    )
    results = run_eval_throughput(cfg, log=lambda msg: console.log(msg))
    print((Path(output) / "results.md").read_text())
    for line in summary_lines(results):
        print(line)
    console.print(f"wrote {output}/results.json and results.md")
