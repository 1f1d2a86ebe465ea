"""Compiled decoding (`--compile`, vtprune/compiled.py): generate's compiled decode step runs vtprune's decode
hooks without a graph break and gives the uncompiled tokens. Compiled prefill (`compiled_prefill`): the vision
tower and the decoder stack run as one graph each where the method allows, with the eager outputs.

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
from vtprune.api import session_of
from vtprune.compiled import compiled_prefill, generation_kwargs
from vtprune.errors import PruneConfigError
from vtprune.models import adapter_for

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


# --- compiled prefill --------------------------------------------------------------------------------------


def _graph_recorder(graphs: list):
    """A dynamo backend that runs each graph as traced and notes which model part it belongs to."""

    def backend(gm, example_inputs):
        params = " ".join(str(node.target) for node in gm.graph.nodes if node.op == "placeholder")
        graphs.append("tower" if "_modules_encoder_" in params else "llm" if "_modules_layers_" in params else "?")
        return gm.forward

    return backend


@pytest.mark.parametrize("name", NAMES)
def test_compiled_prefill_equals_eager(tiny, batch_inputs, name):
    """Inside `compiled_prefill` every method's prefill gives its eager logits and kept tokens. The tower is one
    graph unless the method merges inside it (vit stage), the decoder stack one graph unless the method prunes
    inside it (LLM stage); no graph break, and a second prefill traces nothing new."""
    from torch._dynamo.utils import counters

    model = tiny[0]
    keep = None if name == "none" else 16
    with vtprune.pruned(model, name, keep=keep, **CASES.get(name, {})), torch.no_grad():
        expected = model(**batch_inputs).logits
        kept = vtprune.last_record(model).stages[-1].kept
        kinds = {stage.kind for stage in session_of(model).stages}
        graphs: list[str] = []
        torch._dynamo.reset()
        counters.clear()
        try:
            with compiled_prefill(model, backend=_graph_recorder(graphs)):
                first = model(**batch_inputs).logits
                traced = counters["frames"]["total"]
                second = model(**batch_inputs).logits
                assert vtprune.last_record(model).stages[-1].kept == kept
        finally:
            torch._dynamo.reset()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert dict(counters["graph_break"]) == {}
    assert counters["frames"]["total"] == traced  # the second prefill reused the graphs
    assert sorted(graphs) == sorted(part for part, stage in (("tower", "vit"), ("llm", "llm")) if stage not in kinds)


def test_compiled_prefill_with_compiled_decode(tiny, batch_inputs):
    """generate() with both: the prefill's graphs and generate's own compiled decode step (which traces the
    decoder stack's eager forward: one-token calls never take the prefill's graph) give the eager tokens."""
    from transformers import CompileConfig

    model = tiny[0]
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True
    with vtprune.pruned(model, "visionzip", keep=16):
        expected = _generate(model, batch_inputs, None, 5)
        try:
            with compiled_prefill(model, backend="eager"):
                out = _generate(model, batch_inputs, config, 5)
        finally:
            torch._dynamo.reset()
    assert torch.equal(out, expected)


def test_compiled_prefill_leaves_the_model_as_it_was(tiny):
    model = tiny[0]
    adapter = adapter_for(model)
    parts = (adapter.vision_tower, adapter.language_model)
    with compiled_prefill(model, backend="eager"):
        assert all("forward" in part.__dict__ for part in parts)
        with pytest.raises(PruneConfigError, match="already compiled"), compiled_prefill(model):
            pass
    assert all("forward" not in part.__dict__ for part in parts)
    assert not hasattr(model, "_vtprune_compiled_prefill")


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_compiled_prefill_other_families(family):
    """LLaVA-NeXT (several crops per image) and Qwen2.5-VL (dynamic resolution): the eager logits. NeXT's
    parts are one graph each; Qwen's tower splits at transformers' own data-dependent window bookkeeping."""
    import test_llava_next
    import test_qwen_vl
    from torch._dynamo.utils import counters

    from vtprune.testing import make_tiny_llava_next, make_tiny_qwen_vl

    if family == "llava_next":
        model, processor = make_tiny_llava_next(seed=0)
        inputs = test_llava_next.next_inputs(processor)
    else:
        model, processor = make_tiny_qwen_vl(family, seed=0)
        inputs = test_qwen_vl.qwen_inputs(processor)
    for name in ("none", "visionzip", "fastv"):
        with vtprune.pruned(model, name, keep=None if name == "none" else 8), torch.no_grad():
            expected = model(**inputs).logits
            torch._dynamo.reset()
            counters.clear()
            try:
                with compiled_prefill(model, backend="eager"):
                    assert torch.equal(model(**inputs).logits, expected), name
            finally:
                torch._dynamo.reset()
        if family == "llava_next":
            assert dict(counters["graph_break"]) == {}, name
