"""Paired comparison of two runs on the samples both evaluated: agreement, McNemar, bootstrap CI.

Accuracy differences between pruning settings are often a point or less; whether that is noise can only
be judged on the same samples (paired). McNemar's test uses the discordant pairs (b: only A right, c:
only B right): exact two-sided binomial when b + c < 25, else the chi-squared statistic with continuity
correction. The bootstrap resamples shared samples with a fixed seed, so the interval is reproducible.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from vtprune.eval.errors import EvalInputError
from vtprune.eval.store import CONFIG, RunStore, canonical_rows

EXACT_BELOW = 25


def load_run(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Rows by id (errors excluded) and the stored identity of a run folder or a samples JSONL file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "samples.jsonl").exists() and not list(path.glob("samples.rank*.jsonl")):
            raise EvalInputError(f"{path} holds no samples.jsonl (is it a vtprune eval result folder?)")
        rows = RunStore(path).read_rows()
        identity = json.loads((path / CONFIG).read_text()).get("identity", {}) if (path / CONFIG).exists() else {}
    elif path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        identity = {}
    else:
        raise EvalInputError(f"no such run folder or file: {path}")
    return {r["id"]: r for r in canonical_rows(rows) if not r.get("error")}, identity


def mcnemar(b: int, c: int) -> tuple[float, str]:
    """Two-sided McNemar p-value from the discordant counts and the name of the test used."""
    n = b + c
    if n == 0:
        return 1.0, "none (no discordant pairs)"
    if n < EXACT_BELOW:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
        return min(1.0, 2 * tail / 2**n), "exact binomial"
    stat = (abs(b - c) - 1) ** 2 / n
    return math.erfc(math.sqrt(stat / 2)), "chi-squared with continuity correction"


def bootstrap_diff_ci(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(b) - mean(a) over paired samples (resampled in chunks: bounded memory)."""
    n = len(a)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    diff = b.astype(float) - a.astype(float)
    stats = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // max(n, 1)))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(size, n))
        stats[start : start + size] = diff[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def compare_runs(run_a: str | Path, run_b: str | Path, *, n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """All paired statistics of B against A on their shared, successfully evaluated samples."""
    rows_a, identity_a = load_run(run_a)
    rows_b, identity_b = load_run(run_b)
    shared = sorted(set(rows_a) & set(rows_b), key=lambda i: (rows_a[i].get("index", 0), i))
    if not shared:
        raise EvalInputError(f"{run_a} and {run_b} share no successfully evaluated sample ids")
    a = np.array([bool(rows_a[i]["correct"]) for i in shared])
    b = np.array([bool(rows_b[i]["correct"]) for i in shared])
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    p_value, test = mcnemar(only_a, only_b)
    low, high = bootstrap_diff_ci(a, b, n_boot=n_boot, seed=seed)
    agree = sum(rows_a[i].get("parsed") == rows_b[i].get("parsed") for i in shared)
    doc_mismatch = sum(
        1 for i in shared
        if rows_a[i].get("doc_hash") and rows_b[i].get("doc_hash") and rows_a[i]["doc_hash"] != rows_b[i]["doc_hash"]
    )
    return {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "n_shared": len(shared),
        "n_only_in_a": len(set(rows_a) - set(rows_b)),
        "n_only_in_b": len(set(rows_b) - set(rows_a)),
        "accuracy_a": float(a.mean()),
        "accuracy_b": float(b.mean()),
        "difference": float(b.mean() - a.mean()),
        "difference_ci95": [low, high],
        "bootstrap": {"resamples": n_boot, "seed": seed},
        "agreement": agree / len(shared),
        "both_correct": int(np.sum(a & b)),
        "only_a_correct": only_a,
        "only_b_correct": only_b,
        "both_wrong": int(np.sum(~a & ~b)),
        "mcnemar_p": p_value,
        "mcnemar_test": test,
        "doc_hash_mismatches": doc_mismatch,
        "method_a": identity_a.get("method"),
        "method_b": identity_b.get("method"),
    }


def comparison_markdown(result: dict[str, Any]) -> str:
    low, high = result["difference_ci95"]
    lines = [
        f"A = `{result['run_a']}` ({result.get('method_a')}), B = `{result['run_b']}` ({result.get('method_b')})",
        "",
        "| statistic | value |",
        "|---|---|",
        f"| shared samples | {result['n_shared']} |",
        f"| accuracy A | {result['accuracy_a']:.4f} |",
        f"| accuracy B | {result['accuracy_b']:.4f} |",
        f"| B - A | {result['difference']:+.4f} (95% CI {low:+.4f} .. {high:+.4f}) |",
        f"| answer agreement | {result['agreement']:.4f} |",
        f"| only A correct / only B correct | {result['only_a_correct']} / {result['only_b_correct']} |",
        f"| McNemar p | {result['mcnemar_p']:.4g} ({result['mcnemar_test']}) |",
    ]
    if result["doc_hash_mismatches"]:
        lines.append(f"| WARNING: samples whose content differs | {result['doc_hash_mismatches']} |")
    return "\n".join(lines)
