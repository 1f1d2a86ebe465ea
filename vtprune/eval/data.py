"""Load a benchmark split as a pyarrow Table: from the Hugging Face Hub, or from local files in the same schema.

Everything becomes an Arrow table so tasks see one shape of data whatever the source: parquet read with
pyarrow (works without `datasets`, e.g. on a GPU image that lacks it), a `save_to_disk` folder, JSONL with
image file names, or `datasets.load_dataset` for Hub ids (imported lazily). Image columns stay encoded
(`{"bytes", "path"}` structs) until a sample is actually evaluated, so loading 9,000 POPE rows costs no
image decoding and a corrupt image only breaks its own sample.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vtprune.eval.errors import DatasetError

_HF_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}$")


@dataclass
class LoadedSplit:
    """One split of a dataset: the rows, where they came from, and whether files already selected the split."""

    table: pa.Table
    source: dict[str, Any]
    base_dir: Path | None = None  # for image paths relative to a local JSONL file
    split_by_files: bool = True  # False: the caller must select the split itself (e.g. by a column)
    available_splits: list[str] = field(default_factory=list)
    rows: list[int] | None = None  # a selection of table rows (None: all), set by a task filtering by column


def is_local(dataset: str) -> bool:
    """A dataset argument naming an existing file or folder is local; anything else is a Hub id."""
    return Path(dataset).expanduser().exists()


def load_split(dataset: str, *, split: str, config: str | None = None, revision: str | None = None) -> LoadedSplit:
    """Load `split` of `dataset` (local path or Hub id)."""
    if is_local(dataset):
        return load_local_split(Path(dataset).expanduser(), split=split, config=config)
    return load_hub_split(dataset, split=split, config=config, revision=revision)


# ------------------------------------------------------------------------------------------------- hub


def load_hub_split(dataset_id: str, *, split: str, config: str | None, revision: str | None) -> LoadedSplit:
    """`datasets.load_dataset(dataset_id, config, split=split, revision=revision)` as an Arrow table."""
    try:
        import datasets
    except ImportError as exc:  # the GPU image may not ship `datasets`
        raise DatasetError(
            f"loading {dataset_id!r} from the Hugging Face Hub needs the `datasets` package; install it or "
            "pass a local parquet file/folder with --dataset-id PATH"
        ) from exc
    try:
        ds = datasets.load_dataset(dataset_id, name=config, split=split, revision=revision)
    except (ValueError, FileNotFoundError) as exc:
        raise DatasetError(
            f"cannot load split {split!r} (config {config!r}, revision {revision!r}) of {dataset_id!r}: {exc}"
        ) from exc
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    table = ds.data.table
    source = {
        "kind": "hub",
        "id": dataset_id,
        "config": config,
        "split": split,
        "revision": revision,
        "resolved_revision": _resolve_hub_revision(dataset_id, revision),
        "fingerprint": getattr(ds, "_fingerprint", None),
        "rows": table.num_rows,
    }
    return LoadedSplit(table=table, source=source)


def _resolve_hub_revision(dataset_id: str, revision: str | None) -> str | None:
    """The commit sha the Hub resolves `revision` to, so results pin the exact data; None when offline."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(dataset_id, revision=revision, timeout=10).sha
    except Exception:  # offline, no network, gated: the revision string itself is still recorded
        return None


# ----------------------------------------------------------------------------------------------- local


def load_local_split(path: Path, *, split: str, config: str | None = None) -> LoadedSplit:
    """Read a local parquet/JSONL file, a folder of them (Hub snapshot layout), or a `save_to_disk` folder.

    Split selection by file layout: files under a folder named `config` are preferred; then files whose
    name is `<split>.*`, `<split>-00000-of-00001.*` or that sit under a folder named `<split>`. If no file
    names the split, all files are returned with `split_by_files=False` so the task can filter by a column
    (POPE's `category`).
    """
    path = path.resolve()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _load_saved_dataset(path, split=split)
    if path.is_file():
        files = [path]
        root = path.parent
    else:
        root = path
        files = sorted(p for p in path.rglob("*.parquet"))
        if not files:
            files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json") and p.is_file())
            files = [p for p in files if p.name not in ("dataset_info.json", "config.json", "state.json")]
        if not files:
            raise DatasetError(f"no .parquet or .jsonl files found under {path}")
    rel = {f: f.relative_to(root) if f.is_relative_to(root) else Path(f.name) for f in files}
    if config:
        # Hub snapshots keep a named config in a folder of that name and the default config in `data/`.
        folder = "data" if config == "default" else config
        in_config = [f for f in files if folder in rel[f].parts[:-1]]
        if in_config:
            files = in_config
    available = sorted({name for f in files if (name := _split_name(rel[f])) is not None})
    matching = [f for f in files if _names_split(rel[f], split)]
    split_by_files = bool(matching)
    chosen = matching if matching else files
    table = _read_files(chosen)
    source = {
        "kind": "local",
        "path": str(path),
        "config": config,
        "split": split,
        "files": [str(rel[f]) for f in chosen],
        "fingerprint": _files_fingerprint(chosen),
        "rows": table.num_rows,
    }
    return LoadedSplit(
        table=table,
        source=source,
        base_dir=chosen[0].parent,
        split_by_files=split_by_files,
        available_splits=available,
    )


def _split_name(rel: Path) -> str | None:
    match = _HF_SHARD.match(rel.name.split(".")[0])
    return match.group("split") if match else None


def _names_split(rel: Path, split: str) -> bool:
    stem = rel.name.split(".")[0]
    if split in rel.parts[:-1]:
        return True
    if stem == split:
        return True
    match = _HF_SHARD.match(stem)
    return bool(match and match.group("split") == split)


def _read_files(files: list[Path]) -> pa.Table:
    tables = []
    for f in files:
        try:
            if f.suffix == ".parquet":
                tables.append(pq.read_table(f, memory_map=True))
            else:
                tables.append(pa.Table.from_pylist(_read_json_rows(f)))
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"cannot read {f}: {type(exc).__name__}: {exc}") from exc
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="default")
    except Exception as exc:
        raise DatasetError(f"files {[str(f) for f in files]} do not share one schema: {exc}") from exc


def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        rows = data if isinstance(data, list) else list(data.values())
    if not rows:
        raise DatasetError(f"{path} holds no rows")
    # `file_name` is the Hugging Face imagefolder convention for the image column of a metadata file.
    for row in rows:
        if "image" not in row and "file_name" in row:
            row["image"] = row["file_name"]
    return rows


def _load_saved_dataset(path: Path, *, split: str) -> LoadedSplit:
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError(f"{path} is a `save_to_disk` folder; reading it needs the `datasets` package") from exc
    obj = datasets.load_from_disk(str(path))
    available: list[str] = []
    split_by_files = True
    if isinstance(obj, datasets.DatasetDict):
        available = sorted(obj.keys())
        if split in obj:
            ds = obj[split]
        elif len(obj) == 1:
            ds = next(iter(obj.values()))
            split_by_files = False
        else:
            ds = datasets.concatenate_datasets(list(obj.values()))
            split_by_files = False
    else:
        ds = obj
        split_by_files = False
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    table = ds.data.table
    source = {"kind": "local", "path": str(path), "split": split, "fingerprint": getattr(ds, "_fingerprint", None),
              "rows": table.num_rows}
    return LoadedSplit(table=table, source=source, base_dir=path, split_by_files=split_by_files,
                      available_splits=available)


def _files_fingerprint(files: list[Path]) -> str:
    """Cheap identity of local data (names, sizes, mtimes): hashing gigabytes of images on every start is not."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- columns


def require_columns(table: pa.Table, required: tuple[str, ...] | list[str], what: str) -> None:
    """Fail before any work starts when the data lacks a column the task reads."""
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DatasetError(
            f"{what} is missing required column(s) {missing}; it has {sorted(table.column_names)}"
        )


def column_values(table: pa.Table, name: str) -> list[Any]:
    """A non-image column as Python values (None for a column the table lacks)."""
    if name not in table.column_names:
        return [None] * table.num_rows
    return table.column(name).to_pylist()


def cell(table: pa.Table, name: str, row: int) -> Any:
    """One cell, decoded lazily (used for the image column)."""
    return table.column(name)[row].as_py()
