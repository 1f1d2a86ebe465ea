"""The `vtprune` command line (Typer). Each command lives with its subsystem; this file wires them."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Visual token pruning for vision-language models (LLaVA-1.5 on Hugging Face transformers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def parse_params(items: list[str] | None) -> dict:
    """`--param name=value` pairs; values are Python literals when they parse as one (0.1, 3, [1,2], None)."""
    params: dict = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"--param expects name=value, got {item!r}")
        name, raw = item.split("=", 1)
        try:
            params[name.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            params[name.strip()] = raw
    return params


def parse_keep(raw: str | None) -> int | float | None:
    """`--keep 64` (count) or `--keep 0.25` (fraction)."""
    if raw is None or raw == "":
        return None
    value = float(raw)
    return int(value) if value.is_integer() and value > 1 else value


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
def methods_command(
    name: str = typer.Argument(None, help="Print this method's full documentation instead of the table."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List every pruning method: name, stage, paper, parameters with defaults, deviations from the
    official code. With a NAME, print that method's whole documentation."""
    from vtprune.api import list_methods

    infos = list_methods()
    if name is not None:
        known = {info.name: info for info in infos}
        if name not in known:
            raise typer.BadParameter(f"unknown method {name!r}; valid: {', '.join(sorted(known))}")
        infos = [known[name]]
        if not as_json:
            print(infos[0].doc)
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
    console.print("`vtprune methods NAME` prints a method's whole documentation.")


@app.command("generate")
def generate_command(
    model: str = typer.Option(
        ..., help="Hugging Face id or local folder of a LLaVA checkpoint (or 'testbed')."
    ),
    image: Path = typer.Option(..., exists=True, dir_okay=False, help="Image file."),
    prompt: str = typer.Option(..., help="Question / instruction."),
    method: str = typer.Option("none", help="Pruning method (see `vtprune methods`)."),
    keep: str = typer.Option(None, help="Visual tokens kept per image: a count (64) or a fraction (0.25)."),
    param: list[str] = typer.Option(None, help="Method parameter name=value (repeatable)."),
    max_new_tokens: int = typer.Option(64),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1 or auto."),
    dtype: str = typer.Option("auto", help="float32, float16, bfloat16 or auto (bf16 on GPU, fp32 on CPU)."),
    attn: str = typer.Option("sdpa", help="Attention implementation: sdpa, eager or flash_attention_2."),
    system_prompt: bool = typer.Option(False, help="Prepend the LLaVA vicuna_v1 system prompt."),
) -> None:
    """Answer one question about one image with a pruned model; print the answer, kept tokens and timings."""
    import torch
    from PIL import Image

    import vtprune
    from vtprune.loading import load_model, resolve_device_dtype

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
    vtprune.prune(llava, method, keep=parse_keep(keep), timing=True, **parse_params(param))
    t1 = time.perf_counter()
    with torch.no_grad():
        out = llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
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


# --- commands of the other subsystems (registered here so `vtprune --help` lists them) -----------------------
def _register_optional() -> None:
    import importlib

    for module, names in (
        (
            "vtprune.eval.commands",
            (("eval", "eval_command"), ("sweep", "sweep_command"), ("compare", "compare_command"), ("tasks", "tasks_command"),
             ("reproduce", "reproduce_command")),
        ),
        ("vtprune.testbed.commands", (("demo", "demo_command"),)),
        ("vtprune.bench.commands", (("bench", "bench_command"),)),
        ("vtprune.analysis.commands", (("show", "show_command"),)),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        for command, attr in names:
            if hasattr(mod, attr):
                app.command(command)(getattr(mod, attr))
    try:
        analysis = importlib.import_module("vtprune.analysis.commands")
    except ModuleNotFoundError:
        return
    if hasattr(analysis, "analyze_app"):
        app.add_typer(analysis.analyze_app, name="analyze")


_register_optional()


def main() -> None:
    """Console entry point: bad input ends with a one-line error naming the valid choices (exit code 2)."""
    from vtprune.methods.base import PruneConfigError

    try:
        app()
    except (PruneConfigError, FileNotFoundError) as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
