"""`vtprune reproduce PAPER`: every preset's dry run, the reference data's integrity, a small resumable run on a
tiny model over the tasks with fixtures, and the errors that name the valid choices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtprune.eval.commands import build_app
from vtprune.eval.errors import EvalInputError
from vtprune.eval.reproduce import get_preset, list_presets, task_specs, value_of
from vtprune.eval.tiny_data import write_pope_hub_folder, write_scienceqa_hub_folder
from vtprune.testing import save_tiny_llava

runner = CliRunner()
BENCHMARKS = {"gqa", "textvqa", "mme", "mmbench", "mmbench_cn", "vqav2", "vizwiz", "mmvet", "pope", "scienceqa_img"}
REQUIRED = {"vispruner", "cdpruner", "fastv", "sparsevlm", "pdrop", "visionzip", "dart"}


def _invoke(args: list[str]):
    result = runner.invoke(build_app(), args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_presets_cover_the_papers_and_their_data_is_consistent() -> None:
    assert REQUIRED <= set(list_presets())
    assert set(task_specs()) == BENCHMARKS
    for name in list_presets():
        preset = get_preset(name)
        assert preset.mme in ("perception", "total") and preset.source["table"] and preset.source["provenance"]
        assert set(preset.tasks) <= BENCHMARKS
        assert set(preset.reference) == {"576", *map(str, preset.budgets)}, name
        for budget, row in preset.reference.items():
            assert set(row) <= set(preset.tasks), (name, budget)
            for task, value in row.items():
                if value is None:
                    continue
                # MME totals are near 1,000-2,000 (perception up to 2,000, + cognition up to 800); the rest percent
                assert (800 < value < 2800) if task == "mme" else (0 < value <= 100), (name, budget, task, value)
                if task == "mme" and preset.mme == "perception":
                    assert value <= 2000, (name, budget)


def test_reference_numbers_are_the_papers(capsys) -> None:
    """Spot checks against the tables named in the presets (shared/algorithms.md section 18)."""
    assert get_preset("sparsevlm").reported("pope", 64) == 77.5  # SparseVLM Table 1
    assert get_preset("vispruner").reported("mme", 32) == 1271.0  # VisPruner Table 1, MME perception
    assert get_preset("cdpruner").reported("vizwiz", 128) is None  # not in CDPruner's table: left empty
    assert get_preset("visionzip").reported("mme", None) == 1862  # VisionZip's unpruned MME, perception + cognition
    assert get_preset("fastv").mme == "total" and get_preset("dart").mme == "perception"


@pytest.mark.parametrize("paper", sorted(REQUIRED))
def test_dry_run_prints_the_grid_and_the_reference_table(paper: str) -> None:
    result = _invoke(["reproduce", paper, "--dry-run", "--model", "llava-hf/llava-1.5-7b-hf"])
    assert result.exit_code == 0, result.output
    preset = get_preset(paper)
    assert preset.paper.split(":")[0] in result.output
    assert "template vicuna_v1, preprocessing pad" in result.output
    for task in preset.tasks:
        assert f"{task}: {1 + len(preset.budgets)} runs" in result.output
    # the reference table: its unpruned row, every budget and a number of the paper's first budget
    assert "576 (unpruned)" in result.output
    first = preset.budgets[0]
    some = next(v for v in preset.reference[str(first)].values() if v is not None)
    assert f"{some:.1f}" in result.output
    assert f"MME = {preset.mme}" in result.output.replace("\n", " ")


def test_unknown_preset_and_task_are_named() -> None:
    result = _invoke(["reproduce", "vispruner2", "--dry-run"])
    assert result.exit_code == 2
    assert "unknown paper preset 'vispruner2'; valid presets: cdpruner, dart, fastv" in result.output
    result = _invoke(["reproduce", "sparsevlm", "--dry-run", "--tasks", "pope,vizwiz"])
    assert result.exit_code == 2
    assert "vizwiz not in the sparsevlm grid; its tasks: gqa, mmbench, mme, pope" in result.output


def test_mme_convention_picks_the_metric() -> None:
    metrics = {"perception_score": 1400.0, "cognition_score": 300.0, "total_score": 1700.0, "accuracy": 0.5}
    assert value_of("mme", metrics, "perception") == (1400.0, "perception_score")
    assert value_of("mme", metrics, "total") == (1700.0, "total_score")
    assert value_of("mmvet", {"gpt_score": 31.5, "accuracy": 0.315}, "total") == (31.5, "gpt_score")
    assert value_of("mmbench", {"circular_accuracy": None, "accuracy": None}, "total") == (None, None)  # test split
    assert value_of("pope", {"f1": 0.8512}, "total") == (pytest.approx(85.12), "f1")
    assert value_of("gqa", {"exact": 1.0}, "total") == (None, None)  # never a silent stand-in metric


def test_small_run_resumes_and_prints_vtprune_beside_the_paper(tmp_path: Path) -> None:
    model = save_tiny_llava(tmp_path / "tiny-llava")
    pope = write_pope_hub_folder(tmp_path / "pope", n_per_split=2)
    sqa = write_scienceqa_hub_folder(tmp_path / "sqa", n=3)
    out = tmp_path / "out"
    args = ["reproduce", "vispruner", "--model", str(model), "--tasks", "pope,scienceqa_img", "--keep", "32,16",
            "--limit", "2", "--max-new-tokens", "3", "--data", f"pope={pope}", "--data", f"scienceqa_img={sqa}", "--output", str(out),
            "--no-progress"]
    first = _invoke(args)
    assert first.exit_code == 0, first.output
    (report,) = out.glob("reproduce-vispruner/*/reproduce.json")
    result = json.loads(report.read_text())
    assert result["template"] == "vicuna_v1" and result["preprocessing"] == "pad"
    cells = {(c["task"], c["method"], c["keep"]): c for c in result["cells"]}
    assert set(cells) == {(t, m, k) for t in ("pope", "scienceqa_img")
                          for m, k in (("none", None), ("vispruner", 32), ("vispruner", 16))}
    for (task, method, keep), cell in cells.items():
        assert cell["error"] is None and cell["complete"], cell
        assert 0 <= cell["vtprune"] <= 100
        assert cell["metric"] == ("f1" if task == "pope" else "accuracy")
        if method != "none":
            assert cell["tokens_after_pruning"] == keep
    # the paper's number sits beside vtprune's where the paper has the budget, empty where it has not
    assert cells[("pope", "vispruner", 32)]["paper"] == 72.7
    assert cells[("scienceqa_img", "none", None)]["paper"] == 66.8
    assert cells[("pope", "vispruner", 16)]["paper"] is None
    assert "vtprune / paper" in first.output and "/ 72.7" in first.output
    markdown = report.with_name("reproduce.md").read_text()
    assert "| 32 |" in markdown and "/ 72.7" in markdown

    samples = sorted(out.rglob("samples.jsonl"))
    before = {p: p.read_text() for p in samples}
    again = _invoke(args)  # every cell finished: nothing re-generated, the same numbers
    assert again.exit_code == 0, again.output
    resumed = re.findall(r"(\d+) samples, (\d+) already done", again.output)
    assert len(resumed) == 6 and all(total == done != "0" for total, done in resumed), again.output
    assert {p: p.read_text() for p in samples} == before
    assert json.loads(report.read_text())["cells"] == result["cells"]


def test_run_refuses_tasks_missing_from_this_vtprune(tmp_path: Path) -> None:
    from vtprune.eval.config import EvalConfig
    from vtprune.eval.reproduce import run_reproduce
    from vtprune.eval.tasks import list_tasks

    missing = [t for t in get_preset("fastv").tasks if t not in list_tasks()]
    if not missing:
        pytest.skip("every benchmark of the FastV grid exists here")
    base = EvalConfig(model=str(tmp_path), output=str(tmp_path))
    with pytest.raises(EvalInputError, match=rf"task\(s\) .*{missing[0]}.* not in this vtprune; run the others"):
        run_reproduce(get_preset("fastv"), base, get_preset("fastv").tasks, [64])
