"""Compiled decoding: what `--compile` asks of `generate()`.

transformers compiles a model's decode step (torch.compile, mode "reduce-overhead", i.e. CUDA graphs) when
generate() runs with a compileable cache on a GPU. After pruning, every decode step has the same shapes, so a
preallocated (static) cache is all it takes; vtprune's decode hooks run inside the compiled step without a
host sync or a graph break (vtprune/engine/decode.py). On the CPU transformers does not compile: the static
cache alone changes nothing but memory layout.
"""

from __future__ import annotations

__all__ = ["STATIC_CACHE", "generation_kwargs"]

STATIC_CACHE = "static"


def generation_kwargs(compile: bool) -> dict:
    """Extra `generate()` keyword arguments: a static cache when compiled decoding is asked for."""
    return {"cache_implementation": STATIC_CACHE} if compile else {}
