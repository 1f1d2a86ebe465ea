"""The lmms-eval plugin through the real `lmms-eval` command line: a tiny saved LLaVA, a local task over a tiny
parquet dataset the test writes, a pruning method, and vtprune's record in lmms-eval's per-sample log.

Skipped when lmms-eval is not installed (the `lmms` extra; .ci/run installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

ROOT = Path(__file__).resolve().parents[1]

TASK_YAML = """\
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
task: tiny_yesno
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: !function tiny_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function tiny_utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    post_prompt: " Answer yes or no."
"""

TASK_UTILS = '''\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + (lmms_eval_specific_kwargs or {}).get("post_prompt", "")


def process_results(doc, results):
    return {"exact": float(results[0].strip().lower() == doc["answer"])}
'''


def _write_task(folder: Path) -> Path:
    import datasets

    from vtprune.testing import random_image

    rows = {
        "question_id": [f"q{i}" for i in range(4)],
        "question": ["is there a red square", "is there a blue circle", "is it dark", "is there text"],
        "answer": ["yes", "no", "no", "yes"],
        "image": [random_image(seed) for seed in range(4)],
    }
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    parquet = folder / "tiny_yesno.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "tiny_yesno.yaml").write_text(TASK_YAML.format(parquet=parquet))
    (tasks / "tiny_utils.py").write_text(TASK_UTILS)
    return tasks


def _entry_point_env(folder: Path) -> dict[str, str]:
    """The environment for the subprocess. When the installed vtprune's metadata predates the entry point (an
    older editable install), a dist-info holding the entry point declared in pyproject.toml is put on the path, so
    the test always exercises lmms-eval's own entry-point discovery with what vtprune declares."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(folder / "hf"), "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    paths = [str(ROOT)]
    if not any(ep.name == "vtprune" for ep in metadata.entry_points(group="lmms_eval.models")):
        import tomllib

        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
        info = folder / "shim" / "vtprune_lmms_entry-0.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vtprune-lmms-entry\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(
            "[lmms_eval.models]\n" + "".join(f"{name} = {target}\n" for name, target in declared.items())
        )
        paths.append(str(folder / "shim"))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return env


def _run_lmms_eval(folder: Path, tasks: Path, model_args: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args", model_args,
           "--tasks", "tiny_yesno", "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu",
           "--log_samples", "--output_path", str(out), "--verbosity", "WARNING"]
    return subprocess.run(cmd, cwd=folder, env=_entry_point_env(folder), capture_output=True, text=True,
                          timeout=600)


def _samples(out: Path) -> list[dict]:
    files = sorted(out.rglob("*samples_tiny_yesno.jsonl"))
    assert files, f"no per-sample log under {out}: {[str(p) for p in out.rglob('*')]}"
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def test_lmms_eval_cli_runs_a_vtprune_method_and_logs_the_record(tmp_path: Path) -> None:
    from vtprune.testing import save_tiny_llava

    model = save_tiny_llava(tmp_path / "tiny-llava")
    tasks = _write_task(tmp_path)
    out = tmp_path / "logs"
    proc = _run_lmms_eval(tmp_path, tasks, f"pretrained={model},method=fastv,keep=16,K=1,paper_setting=true", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    samples = _samples(out)
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
    for sample in samples:
        record = sample["token_counts"][0]["vtprune"]
        assert record["method"] == "fastv" and record["keep"] == 16 and record["params"] == {"K": 1}
        assert (record["template"], record["preprocessing"]) == ("vicuna_v1", "pad")  # paper_setting=true
        assert record["visual_tokens"] == 64  # the tiny model's 8 x 8 patches
        assert record["tokens_after_pruning"] == 16
        # FastV (K=1) keeps all 64 in layer 0 and 16 in the tiny model's three later layers
        assert record["layer_avg_tokens"] == pytest.approx((64 + 3 * 16) / 4)
        assert sample["token_counts"][0]["input_tokens"] > 64
        assert sample["exact"] in (0.0, 1.0)
        assert sample["input"].endswith("Answer yes or no.")  # the task's post prompt reached the model
    results = json.loads(sorted(out.rglob("*_results.json"))[-1].read_text())
    assert "exact,none" in results["results"]["tiny_yesno"]


def test_lmms_eval_cli_names_a_bad_method(tmp_path: Path) -> None:
    from vtprune.testing import save_tiny_llava

    model = save_tiny_llava(tmp_path / "tiny-llava")
    tasks = _write_task(tmp_path)
    out = tmp_path / "logs"
    proc = _run_lmms_eval(tmp_path, tasks, f"pretrained={model},method=fastvv,keep=16", out)
    # lmms-eval 0.7 logs a failed evaluation and exits 0; nothing is scored and the error names the methods
    assert not list(out.rglob("*samples_tiny_yesno.jsonl"))
    assert "unknown method 'fastvv'; valid methods:" in proc.stdout + proc.stderr
    assert "vispruner" in proc.stdout + proc.stderr


def test_request_settings_reach_generate() -> None:
    """Sampling / beam settings of a request group go into the generation config; `until` cuts the answer."""
    from vtprune.integrations.lmms_eval import _cut, _RequestPredictor
    from vtprune.testing import make_tiny_llava

    model, processor = make_tiny_llava(seed=0)
    predictor = _RequestPredictor(model, processor)
    predictor.overrides = {"num_beams": 2, "do_sample": True, "temperature": 0.5, "top_p": 0.9}
    config = predictor._generation_config()
    assert (config.num_beams, config.do_sample, config.temperature, config.top_p) == (2, True, 0.5, 0.9)
    assert _cut("yes\n\nUSER: more", ["\n\n", "USER:"]) == "yes"


def test_entry_point_manifest_resolves_the_model_class() -> None:
    from vtprune.integrations.lmms_eval import VTPruneLMM
    from vtprune.integrations.lmms_eval_entry import manifest

    found = manifest()
    module, name = found.simple_class_path.rsplit(".", 1)
    assert (found.model_id, module, name) == ("vtprune", VTPruneLMM.__module__, VTPruneLMM.__name__)
    assert VTPruneLMM.is_simple and found.chat_class_path is None
