"""Numerical rank against numpy on matrices of known rank; effective rank, normalisation, accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vtprune.analysis.rank import (
    RankAccumulator,
    effective_rank,
    minmax_normalize,
    numerical_rank,
    singular_values,
)


def _low_rank(rng: np.random.Generator, m: int, n: int, r: int) -> np.ndarray:
    # Gaussian factors far from square are well conditioned, so the rank-r spectrum clears 1e-3 and the
    # remaining singular values are at float64 round-off: the "known rank" is unambiguous.
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n))


@pytest.mark.parametrize(
    ("m", "n", "r"), [(20, 30, 1), (20, 30, 7), (64, 48, 30), (40, 40, 25), (6, 100, 3), (100, 8, 5)]
)
def test_numerical_rank_known_rank_matches_numpy(m: int, n: int, r: int) -> None:
    rng = np.random.default_rng(m * 1000 + n * 10 + r)
    a = _low_rank(rng, m, n, r)
    thr = 1e-3
    tol = thr * np.linalg.svd(a, compute_uv=False)[0]
    assert numerical_rank(a, thr) == r
    assert numerical_rank(a, thr) == np.linalg.matrix_rank(a, tol=tol)


def test_numerical_rank_threshold_and_torch_inputs() -> None:
    a = np.diag([10.0, 1.0, 0.05, 0.001])
    assert numerical_rank(a, 1e-3) == 3  # cut at 0.01: 10, 1, 0.05 survive
    assert numerical_rank(a, 1e-2) == 2  # cut at 0.1: 10, 1
    assert numerical_rank(a, 1e-4) == 3  # cut at 0.001 is strict: σ = 0.001 is not counted
    assert numerical_rank(a, 1e-5) == 4
    t = torch.from_numpy(_low_rank(np.random.default_rng(0), 16, 24, 5)).float()
    assert numerical_rank(t) == 5
    # bf16 rounding (relative 2^-8) adds a noise floor near 1e-3·σ1: low-precision inputs need a looser τ.
    assert numerical_rank(t.to(torch.bfloat16), rel_threshold=1e-2) == 5
    assert numerical_rank(t.T) == 5
    with pytest.raises(ValueError, match="2-D"):
        numerical_rank(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        numerical_rank(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="rel_threshold"):
        numerical_rank(a, 0.0)


def test_zero_and_empty_matrices() -> None:
    assert numerical_rank(np.zeros((4, 5))) == 0
    assert numerical_rank(np.zeros((0, 5))) == 0
    assert effective_rank(np.zeros((4, 5))) == 0.0
    assert singular_values(np.zeros((0, 3))).size == 0


def test_effective_rank_by_hand() -> None:
    assert effective_rank(np.eye(6)) == pytest.approx(6.0)
    assert effective_rank(np.outer([1.0, 2.0, 3.0], [4.0, 5.0])) == pytest.approx(1.0)
    # σ = (2, 1, 1) → p = (1/2, 1/4, 1/4), H = ln 2 / 2 + 2 · ln 4 / 4 = 1.5 ln 2 → erank = 2^1.5 = 2√2
    assert effective_rank(np.diag([2.0, 1.0, 1.0])) == pytest.approx(2 * math.sqrt(2))


def test_minmax_normalize() -> None:
    out = minmax_normalize([3.0, 5.0, 4.0, 7.0])
    np.testing.assert_allclose(out, [0.0, 0.5, 0.25, 1.0])
    const = minmax_normalize([2.5, 2.5, 2.5])
    assert np.array_equal(const, np.zeros(3)) and not np.isnan(const).any()
    assert minmax_normalize([]).size == 0
    with pytest.raises(ValueError, match="NaN"):
        minmax_normalize([1.0, float("nan")])


def test_rank_accumulator_averages_per_configuration() -> None:
    rng = np.random.default_rng(1)
    acc = RankAccumulator(rel_threshold=1e-3)
    for r in (3, 5, 7):
        assert acc.add(("fastv", 64), _low_rank(rng, 32, 40, r)) == r
    for r in (10, 10):
        acc.add(("vispruner", 64), _low_rank(rng, 32, 40, r))
    acc.add(("constant", 0), np.zeros((8, 8)))
    assert acc.keys() == [("fastv", 64), ("vispruner", 64), ("constant", 0)]
    assert acc.count(("fastv", 64)) == 3
    assert acc.mean(("fastv", 64)) == 5.0
    assert acc.std(("vispruner", 64)) == 0.0
    np.testing.assert_allclose(acc.means(), [5.0, 10.0, 0.0])
    np.testing.assert_allclose(acc.normalized_means(), [0.5, 1.0, 0.0])
    summary = acc.summary()
    assert [s["n"] for s in summary] == [3, 2, 1]
    assert all(np.isfinite(s["mean_rank"]) and np.isfinite(s["mean_effective_rank"]) for s in summary)
    assert summary[2]["mean_effective_rank"] == 0.0
    with pytest.raises(KeyError, match="no samples"):
        acc.mean("missing")


def test_rank_accumulator_merge_and_values() -> None:
    a, b = RankAccumulator(), RankAccumulator()
    a.add_value("cfg", 4)
    b.add_value("cfg", 6, effective=5.5)
    b.add_value("other", 1)
    a.merge(b)
    assert a.count("cfg") == 2 and a.mean("cfg") == 5.0 and a.mean_effective("cfg") == 5.5
    assert "other" in a and len(a) == 2
    assert a.mean_effective("other") is None
    with pytest.raises(ValueError):
        a.merge(RankAccumulator(rel_threshold=1e-2))
    with pytest.raises(ValueError, match="non-finite"):
        a.add_value("cfg", float("nan"))
