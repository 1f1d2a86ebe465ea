"""The eval / sweep / compare / tasks commands: a killed run resumed, clear errors, sweep outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtprune.eval.commands import build_app
from vtprune.eval.store import EXIT_AFTER_ENV
from vtprune.eval.tiny_data import pope_rows, write_pope_hub_folder, write_rows
from vtprune.testing import save_tiny_llava

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_cli")
    return {
        "root": root,
        "model": save_tiny_llava(root / "tiny-llava"),
        "pope": write_pope_hub_folder(root / "pope", n_per_split=2),
    }


def _args(env, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(env["model"]), "--task", "pope", "--dataset-id", str(env["pope"]),
            "--max-new-tokens", "3", "--output", str(out), "--no-progress", *extra]


def _invoke(args: list[str]):
    result = runner.invoke(build_app(), args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _run_dir(out: Path) -> Path:
    (config,) = out.glob("*/*/*/config.json")
    return config.parent


def _lines(run_dir: Path) -> list[str]:
    return (run_dir / "samples.jsonl").read_text().splitlines()


def _without_timing(lines: list[str]) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "timing"} for line in lines]


def test_killed_run_resumes_and_loses_nothing(env, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _args(env, out, "--split", "all", "--batch-size", "2")
    proc = subprocess.run([sys.executable, "-m", "vtprune.eval", *args], env={**os.environ, EXIT_AFTER_ENV: "3"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    run_dir = _run_dir(out)
    written = _lines(run_dir)
    assert len(written) == 3 and not (run_dir / "summary.json").exists()

    resumed = _invoke(args)
    assert resumed.exit_code == 0, resumed.output
    assert "3 already done" in resumed.output
    final = _lines(run_dir)
    assert len(final) == 6 and all(line in final for line in written)  # every written line kept verbatim

    fresh = _invoke(_args(env, tmp_path / "fresh", "--split", "all", "--batch-size", "2"))
    assert fresh.exit_code == 0
    fresh_dir = _run_dir(tmp_path / "fresh")
    assert _without_timing(final) == _without_timing(_lines(fresh_dir))
    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert metrics == json.loads((fresh_dir / "summary.json").read_text())["metrics"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "nosuchtask"], "unknown task 'nosuchtask'; valid tasks:"),
        (["--split", "val"], "valid splits: random, popular, adversarial, all"),
        (["--parser", "fuzzy"], "valid parsers: llava, exact, word"),
        (["--template", "chatml"], "valid templates: hf, vicuna_v1"),
        (["--method", "nosuch", "--keep", "8"], "valid methods:"),
        (["--method", "random", "--keep", "0"], "keep must be"),
        (["--paper-setting", "--template", "hf"], "--paper-setting means"),
        (["--method", "fastv", "--param", "K=2.5"], "fastv: K=2.5 must be an int"),
        (["--method", "sparsevlm", "--param", "recycle=maybe"], "recycle='maybe' must be a bool"),
    ],
)
def test_bad_input_exits_2_with_valid_choices(env, tmp_path: Path, extra: list[str], message: str) -> None:
    result = _invoke([*_args(env, tmp_path), *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert not list(tmp_path.glob("*/*/*/samples.jsonl"))


def test_missing_columns_exit_2(env, tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "question"} for r in pope_rows("random", 2)]
    write_rows(tmp_path / "bad" / "pope.parquet", rows)
    args = _args(env, tmp_path / "out", "--split", "random")
    args[args.index("--dataset-id") + 1] = str(tmp_path / "bad")
    result = _invoke(args)
    assert result.exit_code == 2 and "missing required column(s) ['question']" in result.output


def test_compare_command(env, tmp_path: Path) -> None:
    a = _invoke(_args(env, tmp_path / "a", "--split", "all", "--limit", "1", "--batch-size", "3"))
    b = _invoke(_args(env, tmp_path / "b", "--split", "all", "--limit", "1", "--batch-size", "3", "--paper-setting"))
    assert a.exit_code == 0 and b.exit_code == 0
    json_path = tmp_path / "cmp.json"
    result = _invoke(["compare", str(_run_dir(tmp_path / "a")), str(_run_dir(tmp_path / "b")), "--bootstrap", "200",
                      "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    assert "McNemar p" in result.output and "shared samples | 3" in result.output
    stats = json.loads(json_path.read_text())
    assert stats["n_shared"] == 3 and len(stats["difference_ci95"]) == 2
    missing = _invoke(["compare", str(tmp_path / "a"), str(tmp_path / "nope")])
    assert missing.exit_code == 2


def test_sweep_runs_grid_skips_finished_cells_and_plots(env, tmp_path: Path) -> None:
    args = ["sweep", "--model", str(env["model"]), "--task", "pope", "--split", "adversarial",
            "--dataset-id", str(env["pope"]), "--methods", "none,random", "--keep", "16,4", "--limit", "2",
            "--max-new-tokens", "2", "--batch-size", "2", "--output", str(tmp_path), "--no-progress",
            "--param", "random.seed=1"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    (sweep_dir,) = tmp_path.glob("pope-adversarial/tiny-llava/sweep-*")
    table = json.loads((sweep_dir / "sweep.json").read_text())
    cells = [(r["method"], r["keep"]) for r in table["rows"]]
    assert cells == [("none", None), ("random", 16), ("random", 4)]
    assert [r["tokens_after_pruning"] for r in table["rows"]] == [64, 16, 4]
    assert all(r["n"] == 2 and r["error"] is None for r in table["rows"])
    assert table["rows"][1]["params"] == {"seed": 1}
    for name in ("sweep.md", "accuracy_vs_tokens.png", "accuracy_vs_tokens.pdf"):
        assert (sweep_dir / name).stat().st_size > 0
    assert "| random | 4 |" in (sweep_dir / "sweep.md").read_text()
    again = _invoke(args)
    assert again.exit_code == 0 and again.output.count("2 already done") == 3


def test_tasks_command_lists_builtin_tasks() -> None:
    result = _invoke(["tasks"])
    assert result.exit_code == 0
    assert "pope: data lmms-lab/POPE [Full], split adversarial" in result.output
    assert "scienceqa_img: data lmms-lab/ScienceQA [ScienceQA-IMG]" in result.output
