"""The method pages, `docs/methods/<name>.md`: where they are, which registered names each one documents,
and the defaults its parameter table states.

A page names the methods it documents on a line `**Registered as:** `fastv`, `fastv_finepruner``, so a
variant shares its base method's page. Its "## Parameters" section starts with a table whose first column
is the parameter, whose last column is its meaning, and whose middle columns are either one "default"
column (every name of the page) or one column per registered name; a default cell starts with the value as
a Python literal in backticks. `vtprune methods NAME` prints the page; `tests/test_method_docs.py` checks
every page against the method dataclasses.

The pages live in the repository (`docs/methods/`, beside the `vtprune` package of a source checkout or an
editable install). Where they are missing (a wheel built without the repository), `method_page` returns
None and the command line falls back to the method file's docstring.
"""

from __future__ import annotations

import re
from pathlib import Path

PAGES_DIR = Path(__file__).resolve().parent.parent / "docs" / "methods"

_REGISTERED = re.compile(r"^\*\*Registered as:\*\*(?P<names>.*)$", re.MULTILINE)
_CODE = re.compile(r"`([^`]*)`")
_SECTION = re.compile(r"^## (?P<title>.+)$", re.MULTILINE)


def page_names(text: str) -> list[str]:
    """The registered method names a page documents (its `**Registered as:**` line), [] when it has none."""
    match = _REGISTERED.search(text)
    return _CODE.findall(match.group("names")) if match else []


def pages(directory: Path | None = None) -> dict[str, Path]:
    """Registered name -> the page that documents it, for every page of `directory` (default PAGES_DIR)."""
    directory = PAGES_DIR if directory is None else directory
    out: dict[str, Path] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.md")):
        for name in page_names(path.read_text(encoding="utf-8")):
            out.setdefault(name, path)
    return out


def method_page(name: str, directory: Path | None = None) -> str | None:
    """The Markdown page of a registered method, or None when no page documents it (a method registered
    outside vtprune, or an installation without the repository's docs/)."""
    path = pages(directory).get(name)
    return path.read_text(encoding="utf-8") if path is not None else None


def sections(text: str) -> dict[str, str]:
    """"## Title" -> the text under it, up to the next "## " heading."""
    found = list(_SECTION.finditer(text))
    return {
        m.group("title").strip(): text[m.end() : found[i + 1].start() if i + 1 < len(found) else len(text)]
        for i, m in enumerate(found)
    }


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parameter_defaults(text: str) -> dict[str, dict[str, str]]:
    """{registered name: {parameter: default as written (the first backticked span of its cell)}} from the
    first table of the page's "## Parameters" section."""
    body = sections(text).get("Parameters", "")
    rows = [line for line in body.splitlines() if line.strip().startswith("|")]
    if len(rows) < 2:
        return {}
    header = _cells(rows[0])
    columns = header[1:-1]
    names = page_names(text)
    owners = [names if column == "default" else [column.strip("`")] for column in columns]
    out: dict[str, dict[str, str]] = {name: {} for group in owners for name in group}
    for line in rows[2:]:
        cells = _cells(line)
        parameter = _CODE.findall(cells[0])
        if not parameter or len(cells) != len(header):
            continue
        for group, cell in zip(owners, cells[1:-1], strict=True):
            value = _CODE.findall(cell)
            for name in group:
                out[name][parameter[0]] = value[0] if value else cell
    return out
