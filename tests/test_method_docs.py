"""Every method's documentation lists its deviations from the official code, and `vtprune methods` shows
them (issue 20: "every method's documentation lists its remaining deviations")."""

from __future__ import annotations

import inspect
import json
import re

import pytest
from typer.testing import CliRunner

from vtprune.api import DEVIATIONS_HEADING, deviations_paragraph, list_methods
from vtprune.cli import app
from vtprune.methods.base import METHODS, method_class

runner = CliRunner()
# an official repository named as owner/name, followed (somewhere in the paragraph) by "@ <commit>"
OFFICIAL = re.compile(r"[\w.-]+/[\w.-]+.*@ [0-9a-f]{7}", re.S)


def _names() -> list[str]:
    method_class("none")  # loads the built-in methods
    return sorted(METHODS)


@pytest.mark.parametrize("name", _names())
def test_method_file_has_a_deviations_paragraph(name):
    doc = inspect.getdoc(inspect.getmodule(METHODS[name])) or ""
    paragraph = deviations_paragraph(doc)
    assert paragraph.startswith(DEVIATIONS_HEADING), f"{name}: no '{DEVIATIONS_HEADING}' paragraph"
    # either the official code is named with its commit, or the paragraph says why there is nothing to list
    assert OFFICIAL.search(paragraph) or "none known" in paragraph, paragraph


def test_deviations_paragraph_parsing():
    doc = "Title.\n\nIdea.\n\nDeviations from the official code (a/b @ 1234567):\n* one;\n  more\n* two.\n\nEnd."
    assert deviations_paragraph(doc) == "Deviations from the official code (a/b @ 1234567):\n* one;\n  more\n* two."
    assert deviations_paragraph("No such paragraph.") == ""


def test_methods_command_prints_deviations():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "deviations from the official code" in result.output
    assert "42Shawn/LLaVA-PruMerge" in result.output and "dvlab-research/VisionZip" in result.output
    # PruMerge chooses its own count (issue 20 point 4): said in its summary line
    info = {i.name: i for i in list_methods()}
    assert "chooses its own count" in info["prumerge"].summary
    assert "keep = all tokens is not the unmodified model" in info["prumerge"].summary

    result = runner.invoke(app, ["methods", "--json"])
    data = {entry["name"]: entry for entry in json.loads(result.output)}
    assert set(data) == set(_names())
    assert all(entry["deviations"].startswith(DEVIATIONS_HEADING) for entry in data.values())

    result = runner.invoke(app, ["methods", "prumerge"])
    assert result.exit_code == 0 and "spatial_rule" in result.output and "9d6586e" in result.output
    result = runner.invoke(app, ["methods", "nope"])
    assert result.exit_code != 0 and "unknown method" in result.output
