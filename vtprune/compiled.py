"""Compiled decoding: what `--compile` asks of `generate()`.

transformers compiles a model's decode step (torch.compile, mode "reduce-overhead", i.e. CUDA graphs) when
generate() runs with a compileable (static) cache on a GPU. vtprune's decode hooks run inside the compiled
step without a host sync, a graph break or a per-step recompilation (vtprune/engine/decode.py;
tests/test_compiled.py), so every method decodes compiled with the eager tokens. Speed: the unpruned model's
compiled decode is 2.8x faster on an H200, a pruned model's is not faster yet: its per-layer-group key masks
grow by one key per step, so CUDA graphs re-record each step (benchmarks/results/nvidia-h200-2026-12-02-speed/).
On the CPU transformers does not compile: the static cache alone changes nothing but memory layout.
"""

from __future__ import annotations

__all__ = ["STATIC_CACHE", "generation_kwargs"]

STATIC_CACHE = "static"


def generation_kwargs(compile: bool) -> dict:
    """Extra `generate()` keyword arguments: a static cache when compiled decoding is asked for."""
    return {"cache_implementation": STATIC_CACHE} if compile else {}
