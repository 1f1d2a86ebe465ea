"""The result folder of one run: stored configuration, per-sample JSONL, merging of per-rank parts.

Durability rules: every sample line is flushed and fsynced as soon as it is written, so a killed run loses
at most the line being written (a torn last line is cut off before appending again); nothing already
written is ever rewritten except by the final merge, which writes a temporary file and renames it over
`samples.jsonl` atomically. A folder belongs to exactly one configuration: its identity is stored in
`config.json` and a different identity is sent to a sibling folder (`<name>-1`, `-2`, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vtprune.eval.errors import RunDirError

SAMPLES = "samples.jsonl"
CONFIG = "config.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
ENVIRONMENT = "environment.json"
PART_GLOB = "samples.rank*.jsonl"
# Test hook: exit abruptly (no cleanup, like a kill) after this many sample lines were written.
EXIT_AFTER_ENV = "VTPRUNE_EVAL_TEST_EXIT_AFTER"


def to_json(obj: Any) -> str:
    """Canonical one-line JSON (insertion order kept, so equal rows give equal lines)."""
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync, rename: readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_run_dir(base: Path, identity: dict[str, Any]) -> Path:
    """The folder for `identity`: `base` if free or already holding it, else the first matching/free sibling."""
    wanted = json.loads(to_json(identity))
    candidate, attempt = base, 0
    while True:
        config_path = candidate / CONFIG
        if not config_path.exists():
            candidate.mkdir(parents=True, exist_ok=True)
            write_json_atomic(config_path, {"identity": wanted})
            return candidate
        try:
            stored = json.loads(config_path.read_text(encoding="utf-8")).get("identity")
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"cannot read {config_path}: {exc}; move the folder away or fix the file") from exc
        if stored == wanted:
            return candidate
        attempt += 1
        candidate = base.with_name(f"{base.name}-{attempt}")


class RunLock:
    """An advisory lock on a run folder, so two independent launches cannot append to the same files.

    Held by the single process, or by rank 0 of a multi-process run (its ranks write separate parts).
    """

    def __init__(self, root: Path) -> None:
        self.path = root / ".lock"
        self._file = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking, the merge still deduplicates
            return
        handle = open(self.path, "a+")  # noqa: SIM115 -- held open for the lifetime of the lock
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise RunDirError(f"another vtprune eval is writing to {self.path.parent}; wait for it or stop it") from exc
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None


class SampleWriter:
    """Appends one JSON line per sample; each line is on disk (fsync) before `write` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _cut_torn_tail(path)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        self.written = 0
        exit_after = os.environ.get(EXIT_AFTER_ENV)
        self._exit_after = int(exit_after) if exit_after else None

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(to_json(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written += 1
        if self._exit_after is not None and self.written >= self._exit_after:
            os._exit(17)  # simulate a kill: no cleanup, no summary

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """Drop a partial last line left by a kill mid-write, so the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


class RunStore:
    """Reads and writes the sample files of one run folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def samples_path(self) -> Path:
        return self.root / SAMPLES

    def part_path(self, rank: int, world: int) -> Path:
        return self.root / f"samples.rank{rank}-of-{world}.jsonl"

    def writer(self, rank: int, world: int) -> SampleWriter:
        """A single process appends to samples.jsonl directly; ranks of a multi-process run to their part."""
        return SampleWriter(self.samples_path if world == 1 else self.part_path(rank, world))

    def files(self) -> list[Path]:
        parts = sorted(self.root.glob(PART_GLOB))
        return ([self.samples_path] if self.samples_path.exists() else []) + parts

    def read_rows(self) -> list[dict[str, Any]]:
        """Every complete line of every sample file (a torn last line is ignored)."""
        rows = []
        for path in self.files():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
        return rows

    def done_ids(self, include_errors: bool = True) -> set[str]:
        """Ids already written (those with an error only if `include_errors`), i.e. what a resume skips."""
        return {r["id"] for r in self.read_rows() if include_errors or not r.get("error")}

    def merge(self) -> list[dict[str, Any]]:
        """Fold parts into samples.jsonl: one row per id (a success beats an error, later beats earlier),
        ordered by dataset index, written atomically; then remove the parts."""
        rows = canonical_rows(self.read_rows())
        parts = sorted(self.root.glob(PART_GLOB))
        write_text_atomic(self.samples_path, "".join(to_json(r) + "\n" for r in rows))
        for part in parts:
            part.unlink()
        return rows


def canonical_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deduplicate by id (a success beats an error, later beats earlier) and sort by (index, id)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        old = best.get(row["id"])
        if old is None or not (row.get("error") and not old.get("error")):
            best[row["id"]] = row
    return sorted(best.values(), key=lambda r: (r.get("index", 0), str(r["id"])))
