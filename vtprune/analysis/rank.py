"""Numerical rank, effective rank and their per-configuration averages (docs/ANALYSIS.md).

Rank analysis asks how much independent information the kept visual tokens still carry at a layer (e.g.
the hidden states or attention output of the kept tokens, or SparseVLM's raters × visual attention block).
Singular values are computed in float64 on the CPU, whatever the input dtype and device: fp16/bf16 SVDs
flatten the small singular values that decide the rank, and a relative threshold only means something if
the spectrum itself is accurate.

Two measures:

* `numerical_rank`: #{i : σ_i > τ·σ_1} with an explicit relative τ (default 1e-3). `torch.linalg.matrix_rank`
  instead uses τ = max(m, n)·eps(dtype), which makes fp32 and fp64 inputs disagree; analysis should fix τ.
* `effective_rank` (Roy & Vetterli, 2007): exp of the entropy of p_i = σ_i / Σσ, a smooth count that does
  not jump when one singular value crosses a threshold (AgilePruner's diversity measure).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "RankAccumulator",
    "effective_rank",
    "minmax_normalize",
    "numerical_rank",
    "singular_values",
]


def _as_float64_matrix(matrix: Any) -> np.ndarray:
    if hasattr(matrix, "detach"):  # torch tensor on any device and dtype (bf16 has no numpy dtype)
        import torch

        matrix = matrix.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(matrix, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"rank needs a 2-D matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("matrix contains NaN or inf; its rank is undefined")
    return arr


def singular_values(matrix: Any) -> np.ndarray:
    """Singular values in descending order, computed in float64 on the CPU (empty for an empty matrix)."""
    arr = _as_float64_matrix(matrix)
    if arr.size == 0:
        return np.zeros(0)
    return np.linalg.svd(arr, compute_uv=False)


def numerical_rank(matrix: Any, rel_threshold: float = 1e-3) -> int:
    """Number of singular values above `rel_threshold` × the largest one, rank_τ(M) = #{i : σ_i > τ·σ_1}.

    A zero (or empty) matrix has rank 0. Accepts numpy arrays and torch tensors of any dtype and device.
    """
    if not 0.0 < rel_threshold <= 1.0:
        raise ValueError(f"rel_threshold must lie in (0, 1], got {rel_threshold}")
    s = singular_values(matrix)
    if s.size == 0 or s[0] == 0.0:
        return 0
    return int(np.count_nonzero(s > rel_threshold * s[0]))


def effective_rank(matrix: Any) -> float:
    """exp(−Σ p_i log p_i) with p_i = σ_i / Σσ: between 1 and min(m, n) for a nonzero matrix.

    Zero singular values contribute nothing (0·log 0 = 0). A zero or empty matrix gets 0.0 rather than
    NaN, matching `numerical_rank`, so averages over samples stay finite.
    """
    s = singular_values(matrix)
    total = s.sum()
    if s.size == 0 or total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def minmax_normalize(series: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rescale to [0, 1] by (x − min) / (max − min), e.g. to overlay rank curves of different sizes.

    A constant series has no range to rescale; it maps to all zeros (not NaN from 0/0), read as "no
    variation". Non-finite input is rejected, since one NaN would silently blank the whole curve.
    """
    arr = np.asarray(series, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        return arr
    if not np.all(np.isfinite(arr)):
        raise ValueError("series contains NaN or inf")
    lo, hi = arr.min(), arr.max()
    if hi == lo:
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


@dataclass
class _Samples:
    ranks: list[float] = field(default_factory=list)
    effective: list[float] = field(default_factory=list)


class RankAccumulator:
    """Averages ranks over samples, per configuration (any hashable key, e.g. (method, keep, layer)).

    `add(key, matrix)` computes both measures; `add_value` takes ranks computed elsewhere. Keys keep
    insertion order, so `means()` lines up with the order the sweep ran. Shards from several processes
    combine with `merge`.
    """

    def __init__(self, rel_threshold: float = 1e-3) -> None:
        if not 0.0 < rel_threshold <= 1.0:
            raise ValueError(f"rel_threshold must lie in (0, 1], got {rel_threshold}")
        self.rel_threshold = rel_threshold
        self._data: dict[Hashable, _Samples] = {}

    def add(self, key: Hashable, matrix: Any) -> int:
        """Record the numerical and effective rank of one sample's matrix; returns the numerical rank."""
        rank = numerical_rank(matrix, self.rel_threshold)
        self.add_value(key, rank, effective_rank(matrix))
        return rank

    def add_value(self, key: Hashable, rank: float, effective: float | None = None) -> None:
        """Record an already computed rank (and optionally effective rank) for `key`."""
        if not np.isfinite(rank) or (effective is not None and not np.isfinite(effective)):
            raise ValueError(f"non-finite rank for {key!r}")
        samples = self._data.setdefault(key, _Samples())
        samples.ranks.append(float(rank))
        if effective is not None:
            samples.effective.append(float(effective))

    def merge(self, other: RankAccumulator) -> RankAccumulator:
        """Fold another accumulator's samples into this one (same threshold required); returns self."""
        if other.rel_threshold != self.rel_threshold:
            raise ValueError("cannot merge accumulators with different rel_threshold")
        for key, samples in other._data.items():
            mine = self._data.setdefault(key, _Samples())
            mine.ranks.extend(samples.ranks)
            mine.effective.extend(samples.effective)
        return self

    def keys(self) -> list[Hashable]:
        return list(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def count(self, key: Hashable) -> int:
        return len(self._get(key).ranks)

    def mean(self, key: Hashable) -> float:
        return float(np.mean(self._get(key).ranks))

    def std(self, key: Hashable) -> float:
        """Population standard deviation of the ranks (0.0 for a single sample)."""
        return float(np.std(self._get(key).ranks))

    def mean_effective(self, key: Hashable) -> float | None:
        eff = self._get(key).effective
        return float(np.mean(eff)) if eff else None

    def means(self, keys: Iterable[Hashable] | None = None) -> np.ndarray:
        """Mean rank per key, in `keys` order (default: insertion order)."""
        return np.array([self.mean(k) for k in (self.keys() if keys is None else keys)], dtype=np.float64)

    def normalized_means(self, keys: Iterable[Hashable] | None = None) -> np.ndarray:
        """`minmax_normalize` of `means(keys)`: the curve shape, comparable across matrix sizes."""
        return minmax_normalize(self.means(keys))

    def summary(self) -> list[dict[str, Any]]:
        """One JSON-ready record per configuration: key, sample count, mean/std rank, mean effective rank."""
        return [
            {
                "config": key,
                "n": self.count(key),
                "mean_rank": self.mean(key),
                "std_rank": self.std(key),
                "mean_effective_rank": self.mean_effective(key),
                "rel_threshold": self.rel_threshold,
            }
            for key in self._data
        ]

    def _get(self, key: Hashable) -> _Samples:
        try:
            return self._data[key]
        except KeyError:
            raise KeyError(f"no samples recorded for configuration {key!r}") from None
