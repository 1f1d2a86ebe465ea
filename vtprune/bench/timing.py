"""Clocks and summary statistics for `vtprune bench`.

On a GPU, work is timed with CUDA events recorded on the current stream: marking a point costs no host
synchronisation, so the timed region runs exactly as it would in production (the CPU may run ahead of the
GPU). The events are read once, after one `synchronize()` at the end of a repeat. On a CPU the host clock is
the device clock. Summaries are medians with the spread (min, max, quartiles) of the repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

__all__ = ["Clock", "summarize"]


class Clock:
    """`mark()` a point in the device's timeline; `ms(a, b)` the time between two marks (after `sync()`)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, start, end) -> float:
        """Milliseconds from mark `start` to mark `end`; call `sync()` first on a GPU."""
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> dict | None:
    """{median, min, max, p25, p75, n} of the repeats (None when there are none)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return None
    return {
        "median": float(statistics.median(vals)),
        "min": vals[0],
        "max": vals[-1],
        "p25": _quantile(vals, 0.25),
        "p75": _quantile(vals, 0.75),
        "n": len(vals),
    }
