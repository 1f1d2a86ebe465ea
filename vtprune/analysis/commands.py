"""Command-line entry points of the analysis subsystem (registered by vtprune/cli.py).

`show_command` becomes `vtprune show`; `analyze_app` becomes `vtprune analyze` with the commands `rank`,
`sinks`, `heads` and `overlap`. The work is done by the modules next to this one (show, rank_study, sinks,
heads_map, overlap); docs/ANALYSIS.md describes every output. Bad input ends with `error: ...` on stderr
and exit status 2.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vtprune.cli_common import (
    AttnOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    ParamOpt,
    PreprocOpt,
    TemplateOpt,
    reports_user_errors,
)
from vtprune.errors import UserInputError
from vtprune.userinput import parse_int_list, parse_keep_option, parse_list, parse_params, split_params

analyze_app = typer.Typer(
    help="Analyses with pictures: rank study, attention sinks, head maps, kept-set overlap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

DEFAULT_HEAD_STRATEGIES = "sparsity,graph_based,hierarchical,top_k_sum,max_attention,multi_objective,attention_range,image_mass"

# Help of the options the analysis commands share (the others: vtprune/cli_common.py).
_TASK_HELP = "Task of `vtprune tasks` whose samples are used (pope, scienceqa_img, ...)."
_DATA_HELP = "Local parquet file or folder in the task's schema (default: the task's Hub dataset)."
_SPLIT_HELP = "Split (task default if unset; POPE: random|popular|adversarial|all)."
_NUM_HELP = "First N samples of the task (-1 = all); samples without a readable image are skipped."


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _load(model: str, device: str, dtype: str, attn: str, template: str, preprocessing: str):
    from vtprune.analysis.common import load_analysis_model

    return load_analysis_model(
        model, device=device, dtype=dtype, attn_implementation=attn, template=template, preprocessing=preprocessing
    )


def _methods_and_params(methods: str, param: list[str] | None, keep) -> tuple[list[str], dict]:
    """Method names and per-method parameters, each configuration validated before any model is loaded."""
    import vtprune

    names = parse_list(methods)
    if not names:
        raise UserInputError("--methods is empty")
    params = split_params(param, names)
    for name in names:
        vtprune.get_method(name, keep=keep, **params[name])
    return names, params


def _samples(task: str, dataset_path: str | None, split: str | None, num_samples: int):
    from vtprune.analysis.common import load_samples, load_task

    task_obj = load_task(task, dataset_path, split)
    return task_obj, load_samples(task_obj, num_samples, _log)


# ------------------------------------------------------------------------------------------ show


@reports_user_errors
def show_command(
    model: ModelOpt,
    image: list[Path] = typer.Option(..., "--image", exists=True, dir_okay=False, help="Image file (repeat for several images; the first is drawn)."),
    prompt: str = typer.Option(..., "--prompt", help="Question / instruction."),
    methods: str = typer.Option("vispruner,fastv,random", "--methods", help="Comma-separated methods, one panel each."),
    keep: str = typer.Option("64", "--keep", help="Visual tokens kept per image: a count (64), a fraction (0.25) or 'default'."),
    param: ParamOpt = None,
    output: Path = typer.Option(Path("kept.png"), "-o", "--output", help="PNG to write (numbers go to <stem>.json)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Answer length (greedy decoding)."),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    template: TemplateOpt = "hf",
    preprocessing: PreprocOpt = "crop",
) -> None:
    """Draw the patches each method keeps on one image, side by side, plus the [CLS]-attention map and answers."""
    from PIL import Image

    from vtprune.analysis.show import run_show

    budget = parse_keep_option(keep)
    names, params = _methods_and_params(methods, param, budget)
    images = [Image.open(path).convert("RGB") for path in image]
    am = _load(model, device, dtype, attn, template, preprocessing)
    data = run_show(am, images, prompt, names, budget, params, output, max_new_tokens=max_new_tokens, log=_log)
    typer.echo(f"unpruned: {data['unpruned_answer']}")
    for name, result in data["methods"].items():
        typer.echo(f"{name}: {result['answer']}  ({len(result['kept'])} visual tokens kept)")
    typer.echo(f"-> {data['figure']}")


# ------------------------------------------------------------------------------------------ analyze


@analyze_app.command("rank")
@reports_user_errors
def rank_command(
    model: ModelOpt,
    task: str = typer.Option("scienceqa_img", "--task", help=_TASK_HELP),
    dataset_path: str = typer.Option(None, "--dataset-path", help=_DATA_HELP),
    split: str = typer.Option(None, "--split", help=_SPLIT_HELP),
    num_samples: int = typer.Option(-1, "--num-samples", help=_NUM_HELP),
    method: str = typer.Option("l2norm", "--method", help="Pruning method swept over the kept count."),
    param: ParamOpt = None,
    start: int = typer.Option(576, "--start", help="Largest kept count (clipped to the model's visual tokens)."),
    stop: int = typer.Option(20, "--stop", help="Smallest kept count (always included)."),
    step: int = typer.Option(10, "--step", help="Decrement of the kept count."),
    rank_threshold: float = typer.Option(1e-3, "--rank-threshold", help="Relative threshold τ: rank = #{σ_i > τ·σ_1}."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Answer length (task default if unset)."),
    output: Path = typer.Option(Path("analysis/rank"), "-o", "--output", help="Output folder."),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    template: TemplateOpt = "hf",
    preprocessing: PreprocOpt = "crop",
) -> None:
    """Seed 001: accuracy and first/last-layer attention-output rank of the visual tokens vs. kept count."""
    import vtprune
    from vtprune.analysis.rank_study import run_rank_study, token_counts

    params = parse_params(param)
    vtprune.get_method(method, keep=stop, **params)
    token_counts(start, stop, step, start)  # the sweep itself is valid
    task_obj, samples = _samples(task, dataset_path, split, num_samples)
    am = _load(model, device, dtype, attn, template, preprocessing)
    counts = token_counts(start, stop, step, am.tokens_per_image)
    _log(f"{len(samples)} samples x {len(counts)} kept counts ({counts[0]} .. {counts[-1]})")
    data = run_rank_study(am, task_obj, samples, counts, output, method=method, params=params,
                          rank_threshold=rank_threshold, max_new_tokens=max_new_tokens, log=_log)
    typer.echo("kept  accuracy  first-layer rank  last-layer rank")
    for k, a, f, last in zip(data["token_counts"], data["accuracies"], data["first_layer_ranks"],
                             data["last_layer_ranks"], strict=True):
        typer.echo(f"{k:>4}  {a:8.4f}  {f:16.2f}  {last:15.2f}")
    typer.echo(f"-> {output}")


@analyze_app.command("sinks")
@reports_user_errors
def sinks_command(
    model: ModelOpt,
    task: str = typer.Option("pope", "--task", help=_TASK_HELP),
    dataset_path: str = typer.Option(None, "--dataset-path", help=_DATA_HELP),
    split: str = typer.Option(None, "--split", help=_SPLIT_HELP),
    num_samples: int = typer.Option(100, "--num-samples", help=_NUM_HELP),
    methods: str = typer.Option("vispruner,fastv,random", "--methods", help="Methods whose keeping of sinks is counted."),
    keep: str = typer.Option("64", "--keep", help="Visual tokens kept per image by those methods."),
    param: ParamOpt = None,
    vision_threshold: float = typer.Option(0.02, "--vision-threshold", help="[CLS] attention above which a patch is a vision sink."),
    layer: int = typer.Option(2, "--layer", help="LLM layer whose input hidden states (φ) and attention are read."),
    tau: float = typer.Option(20.0, "--tau", help="φ threshold of the massive-activation rule."),
    sink_dims: str = typer.Option("auto", "--sink-dims", help="auto, detect, llama-2-7b, llama-2-13b or d1,d2."),
    output: Path = typer.Option(Path("analysis/sinks"), "-o", "--output", help="Output folder."),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    template: TemplateOpt = "hf",
    preprocessing: PreprocOpt = "crop",
) -> None:
    """Attention sinks over a dataset: vision ([CLS] attention) and LLM (massive activations): count, place, kept."""
    from vtprune.analysis.sinks import run_sinks

    budget = parse_keep_option(keep)
    names, params = _methods_and_params(methods, param, budget)
    _, samples = _samples(task, dataset_path, split, num_samples)
    am = _load(model, device, dtype, attn, template, preprocessing)
    data = run_sinks(am, samples, output, methods=names, keep=budget, params=params,
                     vision_threshold=vision_threshold, layer=layer, tau=tau, sink_dims=sink_dims, log=_log)
    typer.echo(f"{data['num_images']} images: {data['vision']['mean_count']:.2f} vision sinks and "
               f"{data['llm']['mean_count']:.2f} LLM sinks per image")
    for name, stats in data["methods"].items():
        rates = ", ".join(
            f"{label} {stats[key]:.3f}" if stats[key] is not None else f"{label} -"
            for label, key in (("vision sinks", "vision_sink_keep_rate"), ("LLM sinks", "llm_sink_keep_rate"),
                               ("all", "overall_keep_rate"))
        )
        typer.echo(f"{name}: kept {rates}")
    typer.echo(f"-> {output}")


@analyze_app.command("heads")
@reports_user_errors
def heads_command(
    model: ModelOpt,
    task: str = typer.Option("pope", "--task", help=_TASK_HELP),
    dataset_path: str = typer.Option(None, "--dataset-path", help=_DATA_HELP),
    split: str = typer.Option(None, "--split", help=_SPLIT_HELP),
    num_samples: int = typer.Option(100, "--num-samples", help=_NUM_HELP),
    strategies: str = typer.Option(DEFAULT_HEAD_STRATEGIES, "--strategies", help="Head strategies (signals/heads.py); 'auto' only in the ablation."),
    head_counts: str = typer.Option("8,16,24,32", "--head-counts", help="Selected-head counts of the ablation (clipped to the model's heads)."),
    budgets: str = typer.Option("64,128,192", "--budgets", help="FastV keep budgets of the ablation (clipped to the visual tokens)."),
    param: list[str] = typer.Option(None, "--param", help="Other FastV parameter name=value, e.g. K=3 (repeatable)."),
    ablation: bool = typer.Option(True, "--ablation/--no-ablation", help="Run the strategy x heads x budget evaluation."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Answer length in the ablation (task default if unset)."),
    output: Path = typer.Option(Path("analysis/heads"), "-o", "--output", help="Output folder."),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    template: TemplateOpt = "hf",
    preprocessing: PreprocOpt = "crop",
) -> None:
    """Layer x head map of head-selection scores, and the FastV head-selection ablation grid."""
    from vtprune.analysis.heads_map import check_strategies, run_heads

    names = parse_list(strategies)
    counts = parse_int_list(head_counts, "--head-counts")
    keeps = parse_int_list(budgets, "--budgets")
    params = parse_params(param)
    check_strategies(names, for_ablation=True)
    task_obj, samples = _samples(task, dataset_path, split, num_samples)
    am = _load(model, device, dtype, attn, template, preprocessing)
    data = run_heads(am, task_obj, samples, output, strategies=names, head_counts=counts, budgets=keeps,
                     params=params, ablation=ablation, max_new_tokens=max_new_tokens, log=_log)
    for result in data.get("ablation", []):
        heads = "all" if result["num_heads"] is None else result["num_heads"]
        typer.echo(f"keep {result['keep']:>4}  {result['strategy']:<16} heads {heads!s:>4}  accuracy {result['accuracy']:.4f}")
    typer.echo(f"-> {output}")


@analyze_app.command("overlap")
@reports_user_errors
def overlap_command(
    model: ModelOpt,
    task: str = typer.Option("pope", "--task", help=_TASK_HELP),
    dataset_path: str = typer.Option(None, "--dataset-path", help=_DATA_HELP),
    split: str = typer.Option(None, "--split", help=_SPLIT_HELP),
    num_samples: int = typer.Option(100, "--num-samples", help=_NUM_HELP),
    methods: str = typer.Option("vispruner,fastv,l2norm,random", "--methods", help="Comma-separated methods (two or more)."),
    keep: str = typer.Option("64", "--keep", help="Visual tokens kept per image by every method."),
    param: ParamOpt = None,
    output: Path = typer.Option(Path("analysis/overlap"), "-o", "--output", help="Output folder."),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    template: TemplateOpt = "hf",
    preprocessing: PreprocOpt = "crop",
) -> None:
    """Mean Jaccard overlap of the kept token sets of several methods on the same samples."""
    from vtprune.analysis.overlap import run_overlap

    budget = parse_keep_option(keep)
    names, params = _methods_and_params(methods, param, budget)
    _, samples = _samples(task, dataset_path, split, num_samples)
    am = _load(model, device, dtype, attn, template, preprocessing)
    data = run_overlap(am, samples, output, methods=names, keep=budget, params=params, log=_log)
    width = max(len(n) for n in names)
    typer.echo(" " * width + "  " + "  ".join(f"{n:>{max(6, len(n))}}" for n in names))
    for name, row in zip(names, data["matrix"], strict=True):
        typer.echo(f"{name:<{width}}  " + "  ".join(f"{v:>{max(6, len(n))}.3f}" for n, v in zip(names, row, strict=True)))
    typer.echo(f"-> {output}")
