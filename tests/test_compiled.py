"""Compiled decoding (`--compile`, vtprune/compiled.py): generate's compiled decode step runs vtprune's decode
hooks without a graph break and gives the uncompiled tokens.

transformers compiles only on a GPU; `CompileConfig._compile_all_devices` makes it compile here too, with
dynamo's "eager" backend (the graphs are traced and checked by dynamo, then run without code generation), so
the test sees every graph break and recompilation a GPU run would.
"""

from __future__ import annotations

import cases_llm
import cases_vision
import pytest
import torch
from typer.testing import CliRunner

import vtprune
from vtprune.compiled import generation_kwargs

# every registered method (the engine's invariant cases; methods without one run with their defaults)
CASES = {name: case[0] for name, case in {**cases_vision.CASES, **cases_llm.CASES}.items() if "[" not in name}
CASES.update({"fastv": {"K": 2}, "vispruner": {"important_ratio": 0.5}, "vispruner_nosink": {}})
NAMES = sorted({info.name for info in vtprune.list_methods()} | {"none"})


def _generate(model, inputs, compile_config, new_tokens):
    kwargs = {"compile_config": compile_config} if compile_config is not None else {"disable_compile": True}
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            **generation_kwargs(True),
            **kwargs,
        )


def _traced_frames(model, inputs, config, new_tokens):
    """(tokens, frames dynamo traced in a first compiled generate, frames a second identical one added)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = _generate(model, inputs, config, new_tokens)
    first = counters["frames"]["total"]
    again = _generate(model, inputs, config, new_tokens)
    assert torch.equal(again, out)
    assert dict(counters["graph_break"]) == {}
    return out, first, counters["frames"]["total"] - first


@pytest.mark.parametrize("name", NAMES)
def test_compiled_decode_equals_eager_in_fixed_shapes(tiny, batch_inputs, name):
    """Compiled tokens equal eager ones; the decode step is traced once: not again per step (a longer answer
    traces no more frames than a shorter one), not again per call, and never with a dynamic shape (automatic dynamic shapes are
    off, so a size that changed between steps would retrace; on a GPU each size would record a CUDA graph)."""
    from transformers import CompileConfig

    model = tiny[0]
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True
    keep = None if name == "none" else 16
    with vtprune.pruned(model, name, keep=keep, **CASES.get(name, {})):
        expected = _generate(model, batch_inputs, None, 6)
        try:
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=64):
                out, short_frames, _ = _traced_frames(model, batch_inputs, config, 3)
                out_long, long_frames, repeat_frames = _traced_frames(model, batch_inputs, config, 6)
        finally:
            torch._dynamo.reset()
    assert torch.equal(out_long, expected)
    assert torch.equal(out, expected[:, : out.shape[1]])
    # (<=: a frame of one-time setup, traced in whichever run comes first, may fall in the short run)
    assert long_frames <= short_frames
    assert repeat_frames == 0


def test_generation_kwargs():
    assert generation_kwargs(True) == {"cache_implementation": "static"}
    assert generation_kwargs(False) == {}


def test_eval_compile_flag_reaches_generate(tmp_path):
    """`compile` is an execution option: it sets the static cache and leaves the run's identity alone."""
    from vtprune.eval.config import EvalConfig
    from vtprune.eval.predictor import Predictor
    from vtprune.testing import make_tiny_llava

    model, processor = make_tiny_llava()
    assert Predictor(model, processor, compile=True)._generation_config().cache_implementation == "static"
    assert Predictor(model, processor)._generation_config().cache_implementation != "static"
    assert "compile" in EvalConfig.IDENTITY_EXCLUDED


def test_generate_command_compile(tmp_path):
    from vtprune.cli import app
    from vtprune.testing import random_image, save_tiny_llava

    path = save_tiny_llava(tmp_path / "m")
    random_image(0).save(tmp_path / "i.png")
    args = ["generate", "--model", str(path), "--image", str(tmp_path / "i.png"), "--prompt", "what is it",
            "--method", "visionzip", "--keep", "16", "--max-new-tokens", "4", "--device", "cpu"]
    plain = CliRunner().invoke(app, args)
    compiled = CliRunner().invoke(app, [*args, "--compile"])
    assert plain.exit_code == 0, plain.output
    assert compiled.exit_code == 0, compiled.output
    answer = [line for line in plain.output.splitlines() if line.strip()][0]
    assert answer in compiled.output
