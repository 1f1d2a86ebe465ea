"""Compiled generation: what `--compile` asks of `generate()`, and a compiled prefill.

Decode. transformers compiles a model's decode step (torch.compile, mode "reduce-overhead", i.e. CUDA graphs)
when generate() runs with a compileable (static) cache on a GPU. vtprune's decode hooks run inside the
compiled step in fixed shapes: each step's masks have the cache's length and read the step from the cache's
device-side count, and each layer group's cache is sized for the tokens it kept (vtprune/engine/decode.py).
The step is traced once, without a graph break or a host sync, and gives the eager tokens
(tests/test_compiled.py). Speed on an H200 (benchmarks/results/nvidia-h200-2026-12-03-compiled/): compiled
decode is ~2.7x faster than the dynamic cache, pruned or not, and a pruned batch keeps a smaller KV cache;
batch-1 decode is bound by the weights, not the visual tokens. On the CPU transformers does not compile: the
static cache alone changes nothing but memory layout.

Prefill (`compiled_prefill`). generate() never compiles the prefill, and at batch 1 an eager prefill is
bound by the host launching kernels, not by the tokens: pruning 576 image tokens to 64 barely shortens it.
Inside `compiled_prefill(model)` the prefill's two large forwards run through torch.compile: the vision tower
(always the same image size) and the LLM's decoder stack (the pruned prompt: its length is fixed by the
budget, whatever was kept). The engine's work between them (scoring, selecting, assembling the shorter
input) stays eager. Calls of one token (decode steps) take the eager forward, so generate's own compiled
decode step traces them exactly as before. Where a method's work sits inside those forwards:

* vision-stage methods and the unpruned model: both forwards are one graph each, no graph break
  (tests/test_compiled.py);
* LLM-stage methods (FastV, PDrop, SparseVLM, ...): their decoder stack stays eager (compiled, it would split
  where the method reads its scores and recompile on the cache's per-layer guards past dynamo's limit), their
  tower is compiled;
* vit-stage methods (FlowCut, iLLaVA) merge tokens inside the tower through hooks with data-dependent
  shapes: their tower stays eager, their decoder stack is compiled.

Every method gives its eager outputs (tests/test_compiled.py, every registered method; LLaVA-NeXT and
Qwen2.5-VL too, where Qwen's tower splits into pieces at transformers' data-dependent window bookkeeping). The unmodified model
inside `compiled_prefill` is the matching reference (`vtprune bench --compile-prefill` compiles the unpruned
model, the oracles and the short prompts the same way).

At batch 1 use mode "reduce-overhead" (CUDA graphs): under mode "default" inductor launches every kernel from
Python, and a batch-1 prefill stays host-bound (H200, LLaVA-1.5-7B, 64 tokens: unpruned 27.4 ms, DivPrune
30.5; with CUDA graphs 17.9 and 9.7 ms: benchmarks/results/nvidia-h200-2026-12-03-prefill/).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["STATIC_CACHE", "compiled_parts", "compiled_prefill", "generation_kwargs"]

STATIC_CACHE = "static"
_COMPILED_ATTR = "_vtprune_compiled_prefill"


def generation_kwargs(compile: bool) -> dict:
    """Extra `generate()` keyword arguments: a static cache when compiled decoding is asked for."""
    return {"cache_implementation": STATIC_CACHE} if compile else {}


PARTS = (("vision tower", "vit"), ("decoder stack", "llm"))  # each part, and the stage kind that keeps it eager


def compiled_parts(stage_kinds: set[str]) -> list[str]:
    """The parts `compiled_prefill` compiles for a method whose stages are of `stage_kinds`."""
    return [part for part, kind in PARTS if kind not in stage_kinds]


def _prunes_in(model: torch.nn.Module, kind: str) -> bool:
    """Whether the pruning method applied to `model` (if any) has a stage of `kind` ("vit": inside the
    vision tower, "llm": inside the decoder stack)."""
    from vtprune.api import session_of

    session = session_of(model)
    return session is not None and any(stage.kind == kind for stage in session.stages)


def _is_prompt(args: tuple, kwargs: dict) -> bool:
    """Whether a decoder-stack call holds more than one token (a prefill, not a decode step)."""
    tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
    return tokens is not None and tokens.shape[1] > 1


@contextmanager
def compiled_prefill(
    model: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None
) -> Iterator[torch.nn.Module]:
    """`with compiled_prefill(model): model.generate(...)` — the prefill's vision tower and decoder stack run
    compiled (`torch.compile(backend=, mode=, dynamic=)`); the model's own forwards are back on exit.

    Works with or without a pruning method applied, before or after `vtprune.prune`. The first prefill of
    each prompt shape compiles (untimed in `vtprune bench`); `dynamic=False` compiles each shape on its own
    (what a benchmark of fixed shapes wants), None lets dynamo generalise after a shape changes."""
    from vtprune.errors import PruneConfigError
    from vtprune.models import adapter_for

    if getattr(model, _COMPILED_ATTR, False):
        raise PruneConfigError("this model's prefill is already compiled (nested compiled_prefill)")
    adapter = adapter_for(model)
    modules = {"vision tower": adapter.vision_tower, "decoder stack": adapter.language_model}
    saved = []
    for part, kind in PARTS:
        module = modules[part]

        def compile_call(args: tuple, kwargs: dict, kind: str = kind) -> bool:
            # decode steps (one token) are left to generate; a method pruning inside this part keeps it eager
            return (kind != "llm" or _is_prompt(args, kwargs)) and not _prunes_in(model, kind)

        own = module.__dict__.get("forward")  # an instance-level forward someone installed before us
        eager = module.forward
        compiled = torch.compile(eager, backend=backend, mode=mode, dynamic=dynamic)

        @functools.wraps(eager)
        def forward(*args, _eager=eager, _compiled=compiled, _when=compile_call, **kwargs):
            # inside another compiled region (generate's decode step) dynamo traces the eager forward itself
            if torch.compiler.is_compiling() or not _when(args, kwargs):
                return _eager(*args, **kwargs)
            return _compiled(*args, **kwargs)

        module.forward = forward
        saved.append((module, own))
    setattr(model, _COMPILED_ATTR, True)
    try:
        yield model
    finally:
        for module, own in saved:
            if own is None:
                del module.forward
            else:
                module.forward = own
        delattr(model, _COMPILED_ATTR)
