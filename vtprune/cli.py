"""The `vtprune` command line (Typer). Each command lives with its subsystem; this file wires them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vtprune.analysis.commands import analyze_app, show_command
from vtprune.bench.commands import bench_command, bench_eval_command
from vtprune.cli_common import (
    AttnOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    KeepOpt,
    MethodOpt,
    ModelOpt,
    ParamOpt,
    reports_user_errors,
)
from vtprune.errors import UserInputError
from vtprune.eval.commands import register as register_eval_commands
from vtprune.testbed.commands import demo_command

app = typer.Typer(
    help="Visual token pruning for vision-language models (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL on Hugging Face transformers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _reflow(text: str) -> str:
    """Docstring prose for a table cell: wrapped lines joined, one line per "* " bullet."""
    items: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not items or line.startswith("* "):
            items.append(line)
        elif line:
            items[-1] += " " + line
    return "\n".join(items)


@app.command("methods")
@reports_user_errors
def methods_command(
    name: str = typer.Argument(None, help="Print this method's page (docs/methods/) instead of the table."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List every pruning method: name, stage, paper, parameters with defaults, deviations from the
    official code. With a NAME, print that method's page: paper, idea, parameters, official code, deviations."""
    from vtprune.api import list_methods

    infos = list_methods()
    if name is not None:
        known = {info.name: info for info in infos}
        if name not in known:
            raise UserInputError(f"unknown method {name!r}; valid methods: {', '.join(sorted(known))}")
        infos = [known[name]]
        if not as_json:
            from rich.markdown import Markdown

            from vtprune.method_docs import method_page

            page = method_page(name)
            if page is None:  # a method registered outside vtprune, or an install without docs/methods/
                print(infos[0].doc)
            else:
                console.print(Markdown(page))
            return
    if as_json:
        print(
            json.dumps(
                [
                    {
                        **info.__dict__,
                        "params": {k: {"type": t, "default": d} for k, (t, d) in info.params.items()},
                    }
                    for info in infos
                ],
                default=str,
                indent=1,
            )
        )
        return
    table = Table(title="vtprune methods", show_lines=True)
    for col in ("method", "stage", "idea", "paper", "parameters (default)", "deviations from the official code"):
        table.add_column(col, overflow="fold")
    for info in infos:
        params = ", ".join(f"{k}={d!r}" for k, (_, d) in info.params.items())
        deviations = _reflow(info.deviations.removeprefix("Deviations from the official code").lstrip(" :"))
        table.add_row(info.name, info.stage, info.summary, info.paper, params, deviations)
    console.print(table)
    console.print("`vtprune methods NAME` prints a method's page (docs/methods/NAME.md).")


@app.command("generate")
@reports_user_errors
def generate_command(
    model: ModelOpt,
    image: Annotated[Path, typer.Option("--image", exists=True, dir_okay=False, help="Image file.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Question / instruction.")],
    method: MethodOpt = "none",
    keep: KeepOpt = None,
    param: ParamOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    compile: CompileOpt = False,
    system_prompt: Annotated[
        bool, typer.Option("--system-prompt/--no-system-prompt", help="Prepend the LLaVA vicuna_v1 system prompt.")
    ] = False,
) -> None:
    """Answer one question about one image with a pruned model; print the answer, kept tokens and timings."""
    import torch
    from PIL import Image

    import vtprune
    from vtprune.compiled import generation_kwargs
    from vtprune.loading import load_model, resolve_device_dtype
    from vtprune.userinput import parse_keep_option, parse_params

    pruning = vtprune.get_method(method, keep=parse_keep_option(keep), **parse_params(param))  # before the load
    dev, dt = resolve_device_dtype(device, dtype)
    t0 = time.perf_counter()
    llava, processor = load_model(model, device=dev, dtype=dt, attn_implementation=attn)
    load_s = time.perf_counter() - t0
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        from vtprune.loading import VICUNA_SYSTEM

        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": VICUNA_SYSTEM}]})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[text], return_tensors="pt").to(dev)
    inputs["pixel_values"] = inputs["pixel_values"].to(dt)
    # hooks removed on return: the command can run inside a Python process that goes on (a notebook, a test)
    with vtprune.pruned(llava, pruning, timing=True), torch.no_grad():
        t1 = time.perf_counter()
        out = llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generation_kwargs(compile))
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        total_s = time.perf_counter() - t1
        record = vtprune.last_record(llava)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    console.print(f"[bold]answer:[/bold] {answer}")
    for stage in record.stages:
        where = "before the LLM" if stage.kind == "vision" else f"from layer {stage.prune_layer}"
        console.print(
            f"  stage {stage.name}: {stage.counts[0]} of {record.visual_tokens} visual tokens ({where})"
        )
    console.print(
        f"  tokens after pruning: {record.tokens_after_pruning[0]}, layer-averaged: {record.layer_avg_tokens[0]:.1f}"
    )
    timings = ", ".join(f"{k} {v:.1f} ms" for k, v in record.timings_ms.items())
    console.print(f"  timings: load {load_s:.1f} s, generate {total_s * 1e3:.1f} ms ({timings})")


# --- the commands of the other subsystems, registered here so that `vtprune --help` lists them ------------
register_eval_commands(app)
app.command("demo")(demo_command)
app.command("bench")(bench_command)
app.command("bench-eval")(bench_eval_command)
app.command("show")(show_command)
app.add_typer(analyze_app, name="analyze")


def main() -> None:
    """Console entry point (each command reports bad input itself: vtprune/cli_common.py)."""
    app()


if __name__ == "__main__":
    main()
