"""Result-folder durability: fsynced lines, torn tails, merging rank parts, folder ownership, compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtprune.eval.compare import compare_runs
from vtprune.eval.config import config_hash, run_folder_name
from vtprune.eval.errors import EvalInputError, RunDirError
from vtprune.eval.store import RunLock, RunStore, canonical_rows, resolve_run_dir


def _row(i: int, correct: bool = True, error: str | None = None, parsed: str = "yes") -> dict:
    return {"id": f"s/{i}", "index": i, "parsed": parsed, "target": "yes", "correct": correct, "error": error}


def test_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with store.writer(0, 1) as w:
        w.write(_row(0))
    with open(store.samples_path, "a") as f:
        f.write('{"id": "s/1", "ind')  # killed mid-write
    assert [r["id"] for r in store.read_rows()] == ["s/0"]
    with store.writer(0, 1) as w:
        w.write(_row(1))
    assert [json.loads(line)["id"] for line in store.samples_path.read_text().splitlines()] == ["s/0", "s/1"]


def test_merge_parts_dedupes_and_orders_by_index(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with store.writer(0, 1) as w:  # an earlier single-process session
        w.write(_row(0))
        w.write(_row(3, error="unreadable image"))
    with store.writer(1, 2) as w:
        w.write(_row(3))  # retried successfully on rank 1
        w.write(_row(1))
    with store.writer(0, 2) as w:
        w.write(_row(2))
    assert store.done_ids() == {"s/0", "s/1", "s/2", "s/3"}
    rows = store.merge()
    assert [r["id"] for r in rows] == ["s/0", "s/1", "s/2", "s/3"]
    assert rows[3]["error"] is None  # success beats error
    assert not list(tmp_path.glob("samples.rank*"))
    assert [json.loads(x)["id"] for x in store.samples_path.read_text().splitlines()] == ["s/0", "s/1", "s/2", "s/3"]


def test_error_never_replaces_success() -> None:
    rows = canonical_rows([_row(0), _row(0, correct=False, error="boom")])
    assert rows == [_row(0)]


def test_resolve_run_dir_owns_folder_by_identity(tmp_path: Path) -> None:
    identity = {"task": "pope", "split": "random", "model": "m", "method": "none", "keep": None}
    base = tmp_path / run_folder_name(identity)
    assert base.name == f"none-kall-{config_hash(identity)}"
    assert resolve_run_dir(base, identity) == base
    assert resolve_run_dir(base, identity) == base  # same identity, same folder
    other = {**identity, "max_new_tokens": 8}
    assert resolve_run_dir(base, other) == base.with_name(base.name + "-1")
    assert resolve_run_dir(base, other) == base.with_name(base.name + "-1")


def test_folder_names() -> None:
    ident = {"task": "pope", "split": "adversarial", "model": "llava-hf/llava-1.5-7b-hf", "method": "vispruner",
             "keep": 32}
    assert str(run_folder_name(ident)).startswith("pope-adversarial/llava-1.5-7b-hf/vispruner-k32-")
    assert "-k0.25-" in str(run_folder_name({**ident, "keep": 0.25}))


def test_compare_runs_paired_statistics(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    # 10 shared samples: A right on 0-7, B right on 0-5 and 8-9 -> only A: 6,7; only B: 8,9
    for root, right in ((a, set(range(8))), (b, set(range(6)) | {8, 9})):
        store = RunStore(root)
        root.mkdir()
        with store.writer(0, 1) as w:
            for i in range(10):
                w.write(_row(i, correct=i in right, parsed="yes" if i in right else "no"))
            w.write(_row(99 if root == a else 98))  # not shared
    result = compare_runs(a, b, n_boot=500, seed=1)
    assert result["n_shared"] == 10 and result["n_only_in_a"] == 1
    assert (result["only_a_correct"], result["only_b_correct"], result["both_correct"]) == (2, 2, 6)
    assert result["difference"] == 0.0 and result["mcnemar_p"] == 1.0
    assert result["agreement"] == pytest.approx(0.6)
    assert result == compare_runs(a, b, n_boot=500, seed=1)  # seeded
    with pytest.raises(EvalInputError, match="no such run"):
        compare_runs(a, tmp_path / "missing")


def test_run_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirError, match="another vtprune eval is writing"):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path)
    second.acquire()
    second.release()
