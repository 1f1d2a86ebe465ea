"""Every LLaVA-1.5 benchmark task end to end on its tiny fixture: `vtprune eval`, then `vtprune sweep`
(which finds the eval's cell done and adds a pruned one), on a tiny random LLaVA (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtprune.eval.commands import build_app
from vtprune.eval.tiny_data import (
    write_gqa_hub_folder,
    write_mmbench_hub_folder,
    write_mme_hub_folder,
    write_mmvet_hub_folder,
    write_textvqa_hub_folder,
    write_vizwiz_hub_folder,
    write_vqav2_hub_folder,
)
from vtprune.testing import save_tiny_llava

runner = CliRunner()

# task, fixture writer, split, expected samples at --limit 2, metric key that must be a number, output file
CASES = [
    ("gqa", write_gqa_hub_folder, "testdev", 2, "accuracy", None),
    ("textvqa", write_textvqa_hub_folder, "validation", 2, "accuracy", "submission.json"),
    ("textvqa_noocr", write_textvqa_hub_folder, "test", 2, None, "submission.json"),
    ("mme", write_mme_hub_folder, "test", 2, "perception_score", None),
    ("mmbench", write_mmbench_hub_folder, "dev", 7, "circular_accuracy", "submission.tsv"),
    ("mmbench_cn", write_mmbench_hub_folder, "test", 7, None, "submission.tsv"),
    ("vqav2", write_vqav2_hub_folder, "testdev", 2, None, "submission.json"),
    ("vizwiz", write_vizwiz_hub_folder, "val", 2, "accuracy", "submission.json"),
    ("mmvet", write_mmvet_hub_folder, "test", 2, None, "submission.json"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("bench_cli") / "tiny-llava")


def _invoke(args: list[str]):
    result = runner.invoke(build_app(), args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.parametrize(("task", "writer", "split", "n", "metric", "output"), CASES, ids=[c[0] for c in CASES])
def test_task_runs_through_eval_and_sweep(model: Path, tmp_path: Path, monkeypatch, task, writer, split, n,
                                          metric, output) -> None:
    monkeypatch.delenv("VTPRUNE_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("VTPRUNE_JUDGE_MODEL", raising=False)
    data = writer(tmp_path / "data")
    out = tmp_path / "out"
    common = ["--model", str(model), "--task", task, "--split", split, "--dataset-id", str(data), "--limit", "2",
              "--max-new-tokens", "2", "--batch-size", "2", "--output", str(out), "--no-progress"]
    result = _invoke(["eval", *common])
    assert result.exit_code == 0, result.output
    (config,) = out.glob(f"{task}-{split}/tiny-llava/none-kall-*/config.json")
    run_dir = config.parent
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == n and all(s["error"] is None and s["prediction"] is not None for s in samples)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"]["complete"] and summary["primary_metric"] in summary["metrics"]
    if metric is not None:
        assert isinstance(summary["metrics"][metric], float)
    else:  # a test split, or MM-Vet without a judge: no number is made up
        assert summary["metrics"].get(summary["primary_metric"]) is None
    if output is not None:
        assert (run_dir / output).stat().st_size > 0
    samples_before = (run_dir / "samples.jsonl").read_text()

    result = _invoke(["sweep", *common, "--methods", "none,random", "--keep", "4", "--param", "random.seed=1"])
    assert result.exit_code == 0, result.output
    assert f"{n} already done" in result.output  # the eval's cell is reused, not re-run
    assert (run_dir / "samples.jsonl").read_text() == samples_before  # and nothing it wrote was lost
    (sweep_json,) = out.glob(f"{task}-{split}/tiny-llava/sweep-*/sweep.json")
    table = json.loads(sweep_json.read_text())
    assert [(r["method"], r["keep"]) for r in table["rows"]] == [("none", None), ("random", 4)]
    assert all(r["error"] is None and r["n"] == n for r in table["rows"])
    assert table["rows"][1]["tokens_after_pruning"] == 4
    header = (sweep_json.parent / "sweep.md").read_text().splitlines()[2]
    primary = summary["primary_metric"]
    assert header.endswith(f"| {primary} |") == (primary not in ("accuracy", "f1"))  # e.g. MME perception_score
