"""Metrics and paired statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtprune.eval.compare import bootstrap_diff_ci, mcnemar
from vtprune.eval.metrics import accuracy_by, binary_metrics


def test_binary_metrics_hand_computed() -> None:
    # targets: 4 yes, 4 no. predictions: TP=3, FN=1, FP=1, TN=3
    targets = ["yes"] * 4 + ["no"] * 4
    preds = ["yes", "yes", "yes", "no", "yes", "no", "no", "no"]
    m = binary_metrics(preds, targets)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    assert m["yes_ratio"] == pytest.approx(4 / 8)  # over predictions, not targets


def test_binary_metrics_biased_model() -> None:
    # always "yes": TP=2, FP=3 -> precision 0.4, recall 1, F1 = 2*0.4/1.4, yes-ratio 1 (target yes-ratio 0.4)
    targets = ["yes", "yes", "no", "no", "no"]
    m = binary_metrics(["yes"] * 5, targets)
    assert m["precision"] == pytest.approx(0.4)
    assert m["recall"] == 1.0
    assert m["f1"] == pytest.approx(0.8 / 1.4)
    assert m["yes_ratio"] == 1.0
    assert m["accuracy"] == pytest.approx(0.4)


def test_binary_metrics_unparsed_counts_wrong() -> None:
    m = binary_metrics([None, None, "no"], ["yes", "no", "no"])
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["unparsed"]) == (0, 1, 0, 1, 2)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["precision"] == 0.0 and m["f1"] == 0.0


def test_accuracy_by_group() -> None:
    rows = [{"subject": "a", "correct": True}, {"subject": "a", "correct": False}, {"subject": "b", "correct": True}]
    groups = accuracy_by(rows, "subject")
    assert groups == {"a": {"n": 2, "correct": 1, "accuracy": 0.5}, "b": {"n": 1, "correct": 1, "accuracy": 1.0}}


def test_mcnemar_exact_small_counts() -> None:
    # b=1, c=5: n=6, P(X<=1) = (1+6)/64 -> two-sided 14/64
    p, test = mcnemar(1, 5)
    assert test == "exact binomial"
    assert p == pytest.approx(14 / 64)
    assert mcnemar(3, 3)[0] == 1.0
    assert mcnemar(0, 0)[0] == 1.0


def test_mcnemar_chi_squared_large_counts() -> None:
    # b=10, c=30: (|10-30|-1)^2/40 = 9.025 -> p = erfc(sqrt(9.025/2))
    p, test = mcnemar(10, 30)
    assert test.startswith("chi-squared")
    assert p == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    assert 0.002 < p < 0.003


def test_bootstrap_is_seeded_and_brackets_the_difference() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(200) < 0.6
    b = rng.random(200) < 0.7
    ci1 = bootstrap_diff_ci(a, b, n_boot=2000, seed=0)
    ci2 = bootstrap_diff_ci(a, b, n_boot=2000, seed=0)
    assert ci1 == ci2
    diff = b.mean() - a.mean()
    assert ci1[0] < diff < ci1[1]
    same = bootstrap_diff_ci(a, a, n_boot=100, seed=0)
    assert same == (0.0, 0.0)


@given(st.lists(st.tuples(st.sampled_from(["yes", "no", None]), st.sampled_from(["yes", "no"])), max_size=40))
def test_binary_metrics_properties(pairs: list[tuple[str | None, str]]) -> None:
    preds = [p for p, _ in pairs]
    targets = [t for _, t in pairs]
    m = binary_metrics(preds, targets)
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] + sum(1 for p, t in pairs if p is None and t == "no") == len(pairs)
    correct = sum(p == t for p, t in pairs)
    assert m["accuracy"] == pytest.approx(correct / len(pairs) if pairs else 0.0)
    assert m["yes_ratio"] == pytest.approx(preds.count("yes") / len(pairs) if pairs else 0.0)
    assert 0.0 <= m["f1"] <= 1.0
