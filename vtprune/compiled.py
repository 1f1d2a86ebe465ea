"""Compiled decoding: what `--compile` asks of `generate()`.

transformers compiles a model's decode step (torch.compile, mode "reduce-overhead", i.e. CUDA graphs) when
generate() runs with a compileable (static) cache on a GPU. vtprune's decode hooks run inside the compiled
step in fixed shapes: each step's masks have the cache's length and read the step from the cache's device-side
count, and each layer group's cache is sized for the tokens it kept (vtprune/engine/decode.py). The step is
traced once, without a graph break or a host sync, and gives the eager tokens (tests/test_compiled.py). Speed
on an H200 (benchmarks/results/nvidia-h200-2026-12-03-compiled/): compiled decode is ~2.7x faster than the
dynamic cache, pruned or not, and a pruned batch keeps a smaller KV cache; batch-1 decode is bound by the
weights, not the visual tokens. On the CPU transformers does not compile: the static cache alone changes
nothing but memory layout.
"""

from __future__ import annotations

__all__ = ["STATIC_CACHE", "generation_kwargs"]

STATIC_CACHE = "static"


def generation_kwargs(compile: bool) -> dict:
    """Extra `generate()` keyword arguments: a static cache when compiled decoding is asked for."""
    return {"cache_implementation": STATIC_CACHE} if compile else {}
