"""Accuracy guard: the shipped testbed model, every demo method x budget, a fixed shapes-pope sample.

The table in tests/data/testbed_regression.json was recorded by running this file with `--update`
(`python tests/test_testbed_regression.py --update`). A cell that moves by more than TOLERANCE fails the test:
a method broke silently (or the engine did). Never tune a method to this table; re-record it only for a
deliberate change, and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TABLE = Path(__file__).parent / "data" / "testbed_regression.json"
METHODS = "none,random,l2norm,vispruner,fastv,divprune,visionzip"
KEEP = "64,16"
LIMIT = 40  # adversarial questions
TOLERANCE = 0.05  # absolute accuracy: two answers of 40 may flip on another BLAS


def measure(output: Path) -> dict[str, float]:
    from vtprune.eval.config import EvalConfig
    from vtprune.eval.sweep import run_sweep
    from vtprune.userinput import parse_list

    base = EvalConfig(
        model="testbed", task="shapes-pope", split="adversarial", max_new_tokens=3, dtype="float32",
        batch_size=20, limit=LIMIT, output=str(output), device="cpu", progress=False,
    )
    table = run_sweep(base, parse_list(METHODS), parse_list(KEEP), None)
    return {f"{row['method']}@{row['keep'] or 'all'}": row["accuracy"] for row in table["rows"]}


@pytest.mark.slow
def test_accuracy_table_is_stable(tmp_path):
    recorded = json.loads(TABLE.read_text())
    measured = measure(tmp_path)
    assert set(measured) == set(recorded["accuracy"])
    moved = {
        cell: (recorded["accuracy"][cell], value)
        for cell, value in measured.items()
        if abs(value - recorded["accuracy"][cell]) > recorded["tolerance"]
    }
    assert not moved, f"accuracy moved beyond ±{recorded['tolerance']}: {moved}"


if __name__ == "__main__" and "--update" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table = measure(Path(tmp))
    TABLE.write_text(json.dumps({
        "task": "shapes-pope", "split": "adversarial", "limit": LIMIT, "model": "testbed",
        "tolerance": TOLERANCE, "accuracy": table,
    }, indent=1) + "\n")
    print(json.dumps(table, indent=1))
