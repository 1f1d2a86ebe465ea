"""Replay greedy selection loops as CUDA graphs.

The greedy selectors (VisPruner's duplicate removal, the DPP MAP, max–min diversity) run tens of small
steps, each a handful of tiny kernels: on a GPU they are bound by kernel-launch time (~15-20 ms for
576 -> 64 whatever the batch), which is a large share of a pruned prefill. They never synchronise with the
host, so each (function, shapes, options) can be captured once as a CUDA graph and replayed with one launch.
CPU tensors, capture failures and `VTPRUNE_CUDA_GRAPHS=0` fall back to plain calls; results are identical.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable

import torch

_MAX_GRAPHS = 32
_graphs: OrderedDict = OrderedDict()
_not_capturable: set = set()


def _enabled() -> bool:
    return os.environ.get("VTPRUNE_CUDA_GRAPHS", "1") != "0"


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    return ("value", value)


def cuda_graphed(fn: Callable) -> Callable:
    """Decorator: replay `fn` as a CUDA graph when its tensor arguments live on a GPU.

    Tensor arguments are copied into static buffers before each replay; any other argument is part of the
    cache key. Outputs (tensors or tuples of tensors) are cloned, so callers may keep them.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if (
            not _enabled()
            or not tensors
            or not tensors[0].is_cuda
            or torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            or torch.cuda.is_current_stream_capturing()
        ):
            return fn(*args, **kwargs)
        key = (fn.__qualname__, tuple(_signature(a) for a in args), tuple((k, _signature(v)) for k, v in sorted(kwargs.items())))
        if key in _not_capturable:
            return fn(*args, **kwargs)
        entry = _graphs.get(key)
        if entry is None:
            try:
                entry = _capture(fn, args, kwargs)
            except RuntimeError:
                _not_capturable.add(key)  # e.g. a data-dependent host sync: run it plainly from now on
                return fn(*args, **kwargs)
            _graphs[key] = entry
            if len(_graphs) > _MAX_GRAPHS:
                _graphs.popitem(last=False)
        else:
            _graphs.move_to_end(key)
        graph, static_args, static_kwargs, output = entry
        for dst, src in zip(static_args, args, strict=True):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        for name, dst in static_kwargs.items():
            if isinstance(dst, torch.Tensor):
                dst.copy_(kwargs[name])
        graph.replay()
        return _clone(output)

    return wrapper


def _capture(fn, args, kwargs):
    static_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    static_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy kernels)
        fn(*static_args, **static_kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(*static_args, **static_kwargs)
    return graph, static_args, static_kwargs, output


def _clone(output):
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        cloned = [_clone(o) for o in output]
        return type(output)(*cloned) if hasattr(output, "_fields") else tuple(cloned)
    return output
