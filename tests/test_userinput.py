"""The one parser of what users type (vtprune/userinput.py) and the one way commands report bad input."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vtprune.errors import PruneConfigError, UserInputError
from vtprune.eval.errors import EvalInputError
from vtprune.userinput import (
    parse_int_list,
    parse_keep,
    parse_keep_option,
    parse_list,
    parse_param,
    parse_params,
    parse_value,
    split_params,
)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("false", False), ("False", False), ("true", True), ("True", True), ("null", None), ("None", None),
        ("3", 3), ("2.5", 2.5), ("1e-3", 1e-3), ("[1, 2]", [1, 2]), ("(1, 2)", (1, 2)), ('["sink"]', ["sink"]),
        ("mean", "mean"), ("none", "none"), ("a=b", "a=b"), (" 4 ", 4),
    ],
)  # fmt: skip
def test_parse_value_reads_json_and_python_spellings_alike(raw, value):
    assert parse_value(raw) == value and type(parse_value(raw)) is type(value)


def test_params_and_their_errors():
    assert parse_param("recycle=false") == parse_param("recycle=False") == ("recycle", False)
    assert parse_params(["K=2", "debias=['sink']", "heads=mean"]) == {"K": 2, "debias": ["sink"], "heads": "mean"}
    for bad in ("novalue", "=3"):
        with pytest.raises(UserInputError, match="name=value"):
            parse_param(bad)


def test_split_params_per_method_and_for_all():
    out = split_params(["fastv.K=3", "important_ratio=0.25"], ["none", "fastv", "vispruner"])
    assert out == {"none": {}, "fastv": {"K": 3, "important_ratio": 0.25}, "vispruner": {"important_ratio": 0.25}}
    with pytest.raises(UserInputError, match="'cdpruner', which is not among"):
        split_params(["cdpruner.theta=0.5"], ["fastv"])


def test_budgets_and_lists():
    assert parse_keep("64") == 64 and parse_keep("1") == 1 and parse_keep("1.0") == 1.0 and parse_keep(0.25) == 0.25
    assert parse_keep("320/2880") == pytest.approx(320 / 2880) and parse_keep("64.0") == 64
    for bad in ("0", "-3", "1.5", "3000/2880", "abc", True):
        with pytest.raises(UserInputError, match="keep must be"):
            parse_keep(bad)
    assert parse_keep_option(None) is None and parse_keep_option("default") is None and parse_keep_option("8") == 8
    assert parse_list(" a, b,,c ") == ["a", "b", "c"]
    assert parse_int_list("576, 64", "--keep") == [576, 64]
    with pytest.raises(UserInputError, match="--batch expects comma-separated integers"):
        parse_int_list("1,x", "--batch")
    with pytest.raises(UserInputError, match="integers >= 1"):
        parse_int_list("0", "--batch")


def test_every_input_error_is_a_user_error():
    assert issubclass(PruneConfigError, UserInputError) and issubclass(EvalInputError, UserInputError)


@pytest.mark.parametrize(
    "args",
    [
        ["methods", "bogus"],
        ["bench", "--arch", "tiny", "--output", "x", "--batch", "1,x"],
        ["bench", "--arch", "tiny", "--output", "x", "--methods", "fastv", "--param", "vispruner.K=2"],
        ["bench", "--arch", "tiny", "--output", "x", "--image-size", "1x2x3"],
    ],
)
def test_commands_report_bad_input_in_one_line(args, tmp_path, monkeypatch):
    from vtprune.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()  # nothing was started


def test_a_param_reaches_the_method_typed_the_same_from_every_spelling():
    import vtprune

    for spelling in ("recycle=false", "recycle=False"):
        assert vtprune.get_method("sparsevlm", **parse_params([spelling])).recycle is False
    with pytest.raises(PruneConfigError, match="recycle='no' must be a bool"):
        vtprune.get_method("sparsevlm", **parse_params(["recycle=no"]))
