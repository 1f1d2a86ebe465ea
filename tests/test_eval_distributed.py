"""Two CPU processes under torchrun (gloo) shard the samples and rank 0 merges: same files as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vtprune.eval import EvalConfig, run_eval
from vtprune.eval.tiny_data import write_pope_hub_folder
from vtprune.testing import save_tiny_llava


def _without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "timing"} for line in path.read_text().splitlines()]


def test_torchrun_two_ranks_equals_single_process(tmp_path: Path) -> None:
    model = save_tiny_llava(tmp_path / "tiny-llava")
    data = write_pope_hub_folder(tmp_path / "pope", n_per_split=2)
    common = dict(model=str(model), task="pope", split="all", dataset_id=str(data), max_new_tokens=3, batch_size=1)
    single = run_eval(EvalConfig(**common, output=str(tmp_path / "single"), progress=False))

    out = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vtprune.eval", "eval", "--model", str(model), "--task", "pope", "--split", "all",
           "--dataset-id", str(data), "--max-new-tokens", "3", "--batch-size", "1", "--output", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi_dir = out / single.run_dir.relative_to(tmp_path / "single")
    assert sorted(p.name for p in multi_dir.iterdir()) == sorted(p.name for p in single.run_dir.iterdir())
    assert _without_timing(multi_dir / "samples.jsonl") == _without_timing(single.run_dir / "samples.jsonl")
    ranks = {json.loads(line)["timing"]["rank"] for line in (multi_dir / "samples.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}
    summary = json.loads((multi_dir / "summary.json").read_text())
    assert summary["metrics"] == single.summary["metrics"]
    assert summary["counts"] == single.summary["counts"]
    assert summary["environment"]["world_size"] == 2
