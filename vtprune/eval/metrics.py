"""Metrics computed from per-sample result rows (so a resumed or merged run scores exactly the same).

Kept free of any task or model code: each function takes plain values and returns plain dicts, which makes
them easy to check against hand-computed confusion matrices.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any


def binary_metrics(predictions: Sequence[str | None], targets: Sequence[str], positive: str = "yes") -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with `positive` as the positive class.

    An unparsed prediction (None) is neither positive nor correct: with a positive target it is a false
    negative; with a negative target it counts only in the total. The yes-ratio is over the PREDICTIONS
    (as in LLaVA's eval_pope.py), which is what shows a model's bias -- lmms-eval's counts the targets.
    """
    if len(predictions) != len(targets):
        raise ValueError("predictions and targets differ in length")
    tp = fp = tn = fn = unparsed = 0
    for pred, target in zip(predictions, targets, strict=True):
        if pred is None:
            unparsed += 1
        if target == positive:
            if pred == positive:
                tp += 1
            else:
                fn += 1
        else:
            if pred == positive:
                fp += 1
            elif pred is not None:
                tn += 1
    n = len(targets)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsed": unparsed,
    }


def accuracy(correct: Iterable[bool]) -> dict:
    """Plain accuracy with its count."""
    values = [bool(c) for c in correct]
    return {"n": len(values), "correct": sum(values), "accuracy": sum(values) / len(values) if values else 0.0}


def accuracy_by(rows: Iterable[dict[str, Any]], key: str) -> dict[str, dict]:
    """Accuracy per value of `rows[i][key]` (e.g. per subject, per grade), keys sorted for stable output."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        groups[str(row.get(key))].append(bool(row.get("correct")))
    return {name: accuracy(groups[name]) for name in sorted(groups)}
