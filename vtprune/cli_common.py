"""What every `vtprune` command shares: the options a user meets everywhere (model, method, keep, params,
device, dtype, attention, output, prompt setting) and the one place where bad input becomes a message.

Commands declare an option with the alias here (`model: ModelOpt`) and give the default at the parameter when
it differs per command. Values are parsed by vtprune/userinput.py. A command wrapped by `reports_user_errors`
turns a `UserInputError` (or a missing file) into `error: ...` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from vtprune.errors import UserInputError

ModelOpt = Annotated[
    str,
    typer.Option("--model", help="Hugging Face id or local folder of a checkpoint (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL), or 'testbed'."),
]
MethodOpt = Annotated[str, typer.Option("--method", help="Pruning method (`vtprune methods`), or none.")]
MethodsOpt = Annotated[str, typer.Option("--methods", help="Comma-separated pruning methods (`vtprune methods`).")]
KeepOpt = Annotated[
    str | None,
    typer.Option("--keep", help="Visual tokens kept per image: a count (64), a fraction (0.25) or a paper budget (320/2880)."),
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        help="Method parameter name=value (JSON or Python literal: 3, 0.1, true, [1,2]); method.name=value for "
        "one of several methods (repeatable).",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (the GPU of this process, else CPU), cpu, cuda or cuda:1.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")]
AttnOpt = Annotated[
    str, typer.Option("--attn", "--attn-implementation", help="Attention implementation: sdpa, eager or flash_attention_2.")
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="Compiled decoding: generate() with a static KV cache, whose decode step transformers compiles with "
        "torch.compile (CUDA graphs) on a GPU; the same tokens, about 2.7x faster per token at batch 1, pruned or "
        "not (README, Compiled decoding). No effect on the CPU.",
    ),
]
OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="Where the results are written.")]
TemplateOpt = Annotated[
    str | None,
    typer.Option("--template", help="Prompt template: hf (the processor's chat template) or vicuna_v1 (LLaVA's, with system prompt)."),
]
PreprocOpt = Annotated[
    str | None,
    typer.Option("--preprocessing", help="Image preprocessing: crop (the processor's default) or pad (LLaVA's expand2square)."),
]

Command = TypeVar("Command", bound=Callable[..., Any])


def reports_user_errors(command: Command) -> Command:
    """Run `command`; bad input ends it with a one-line `error: ...` on stderr and exit status 2."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (UserInputError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from exc

    return run  # type: ignore[return-value]
