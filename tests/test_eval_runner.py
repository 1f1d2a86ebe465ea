"""The runner end to end on a tiny random LLaVA checkpoint and tiny POPE / ScienceQA files (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vtprune.eval import EvalConfig, EvalInputError, run_eval
from vtprune.eval.commands import resolve_setting
from vtprune.eval.config import VICUNA_V1_SYSTEM
from vtprune.eval.predictor import Predictor
from vtprune.eval.tiny_data import pope_rows, write_pope_hub_folder, write_rows, write_scienceqa_hub_folder
from vtprune.testing import random_image, save_tiny_llava


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_run")
    return {
        "root": root,
        "model": save_tiny_llava(root / "tiny-llava"),
        "pope": write_pope_hub_folder(root / "pope", n_per_split=3),
        "sqa": write_scienceqa_hub_folder(root / "sqa", n=5),
    }


def _cfg(env, out: Path, **kw) -> EvalConfig:
    base = dict(model=str(env["model"]), task="pope", split="adversarial", dataset_id=str(env["pope"]),
                max_new_tokens=3, batch_size=2, output=str(out), progress=False)
    return EvalConfig(**{**base, **kw})


def _lines(run_dir: Path, drop_timing: bool = True) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "timing"} if drop_timing else r for r in rows]


def test_run_writes_samples_summary_and_config(env, tmp_path: Path) -> None:
    result = run_eval(_cfg(env, tmp_path))
    run_dir = result.run_dir
    assert run_dir.parent == tmp_path / "pope-adversarial" / "tiny-llava"
    assert run_dir.name.startswith("none-kall-")
    rows = _lines(run_dir, drop_timing=False)
    assert [r["id"] for r in rows] == ["adversarial/1", "adversarial/2", "adversarial/3"]
    first = rows[0]
    for key in ("prompt_hash", "prediction", "parsed", "target", "correct", "visual_tokens", "kept_tokens",
                "tokens_after_pruning", "layer_avg_tokens", "timing", "question", "question_id"):
        assert key in first
    assert first["visual_tokens"] == 64 and first["error"] is None
    assert first["parsed"] in ("yes", "no")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == result.summary
    assert summary["counts"] == {"expected": 3, "written": 3, "evaluated": 3, "errors": 0, "missing": 0,
                                 "complete": True}
    metrics = summary["metrics"]
    assert set(metrics["per_split"]) == {"adversarial"} and metrics["f1"] == metrics["paper_summary"]["value"]
    for key in ("vtprune", "torch", "transformers", "device", "attn_implementation", "dtype"):
        assert summary["environment"][key]
    cfg = summary["config"]
    assert cfg["template"] == "hf" and cfg["preprocessing"] == "crop" and cfg["parser"] == "llava"
    assert summary["dataset"][0]["files"] == ["Full/adversarial-00000-of-00001.parquet"]
    stored = json.loads((run_dir / "config.json").read_text())["identity"]
    assert stored["dataset_id"] == str(env["pope"].resolve()) and "batch_size" not in stored
    assert "| adversarial | 3 |" in (run_dir / "summary.md").read_text()


def test_resume_skips_written_ids_and_extends_with_limit(env, tmp_path: Path) -> None:
    first = run_eval(_cfg(env, tmp_path, split="all", limit=1))
    assert first.evaluated_now == 3 and first.summary["counts"]["expected"] == 3
    again = run_eval(_cfg(env, tmp_path, split="all", limit=1, batch_size=1))  # batch size is not identity
    assert again.run_dir == first.run_dir and again.evaluated_now == 0
    full = run_eval(_cfg(env, tmp_path, split="all"))
    assert full.run_dir == first.run_dir and full.evaluated_now == 6
    fresh = run_eval(_cfg(env, tmp_path / "fresh", split="all"))
    assert _lines(full.run_dir) == _lines(fresh.run_dir)
    assert full.summary["metrics"] == fresh.summary["metrics"]
    assert [r["index"] for r in _lines(full.run_dir)] == list(range(9))


def test_different_settings_never_share_a_folder(env, tmp_path: Path) -> None:
    a = run_eval(_cfg(env, tmp_path, limit=1))
    b = run_eval(_cfg(env, tmp_path, limit=1, template="vicuna_v1"))
    c = run_eval(_cfg(env, tmp_path, limit=1, preprocessing="pad"))
    d = run_eval(_cfg(env, tmp_path, limit=1, parser="exact"))
    assert len({a.run_dir, b.run_dir, c.run_dir, d.run_dir}) == 4
    assert b.summary["config"]["template"] == "vicuna_v1"
    assert c.summary["environment"]["preprocessing_impl"].startswith("expand_to_square")


def test_retrained_weights_in_the_same_folder_are_scored_again(env, tmp_path: Path) -> None:
    model = save_tiny_llava(tmp_path / "model", seed=0)
    a = run_eval(_cfg(env, tmp_path / "out", model=str(model), limit=1))
    before = (a.run_dir / "samples.jsonl").read_text()
    save_tiny_llava(model, seed=1)  # other weights, same folder, same name
    b = run_eval(_cfg(env, tmp_path / "out", model=str(model), limit=1))
    assert b.run_dir != a.run_dir and b.evaluated_now == 1
    assert (a.run_dir / "samples.jsonl").read_text() == before  # the old model's results stay as they were
    fingerprints = [json.loads((r / "config.json").read_text())["identity"]["model_fingerprint"]
                    for r in (a.run_dir, b.run_dir)]
    assert None not in fingerprints and fingerprints[0] != fingerprints[1]


def test_stored_config_mismatch_relocates(env, tmp_path: Path) -> None:
    a = run_eval(_cfg(env, tmp_path, limit=1))
    config_path = a.run_dir / "config.json"
    stored = json.loads(config_path.read_text())
    stored["identity"]["max_new_tokens"] = 999  # as if another configuration owned the folder
    config_path.write_text(json.dumps(stored))
    before = (a.run_dir / "samples.jsonl").read_text()
    b = run_eval(_cfg(env, tmp_path, limit=1))
    assert b.run_dir == a.run_dir.with_name(a.run_dir.name + "-1")
    assert (a.run_dir / "samples.jsonl").read_text() == before  # nothing of the other run touched


def test_broken_samples_are_recorded_and_the_run_goes_on(env, tmp_path: Path) -> None:
    rows = pope_rows("random", 4)
    rows[1]["image"] = {"bytes": b"\x89PNG broken", "path": None}
    rows[2]["answer"] = "perhaps"
    write_rows(tmp_path / "data" / "pope.parquet", rows)
    result = run_eval(_cfg(env, tmp_path / "out", split="random", dataset_id=str(tmp_path / "data")))
    lines = _lines(result.run_dir)
    assert [bool(r["error"]) for r in lines] == [False, True, True, False]
    assert lines[1]["error"].startswith("unreadable image") and "bad target" in lines[2]["error"]
    counts = result.summary["counts"]
    assert (counts["evaluated"], counts["errors"], counts["complete"]) == (2, 2, True)
    assert result.summary["metrics"]["n"] == 2
    assert sum(result.summary["error_reasons"].values()) == 2
    assert "| error | count |" in (result.run_dir / "summary.md").read_text()


def test_scienceqa_paper_setting_run(env, tmp_path: Path) -> None:
    template, preprocessing = resolve_setting(None, None, paper_setting=True)
    result = run_eval(_cfg(env, tmp_path, task="scienceqa_img", split=None, dataset_id=str(env["sqa"]),
                           template=template, preprocessing=preprocessing))
    assert result.run_dir.parent.parent.name == "scienceqa_img-test"
    lines = _lines(result.run_dir)
    assert [r["target"] for r in lines] == ["A", "B", "C", "B", "B"]
    assert all(r["subject"] and r["grade"] for r in lines)
    m = result.summary["metrics"]
    assert set(m["per_subject"]) == {"language science", "natural science"} and m["img_n"] == 5
    with pytest.raises(EvalInputError, match="paper-setting"):
        resolve_setting("hf", None, paper_setting=True)


def test_batched_generation_matches_one_by_one(env) -> None:
    predictor = Predictor.from_pretrained(str(env["model"]), device="cpu", max_new_tokens=4)
    questions = ["is there a dog ?", "what colour is the shape in the image ? answer with a single word"]
    images = [random_image(1), random_image(2, 90).resize((90, 60))]
    batched = [g.text for g in predictor.generate(questions, images)]
    single = [predictor.generate([q], [im])[0].text for q, im in zip(questions, images, strict=True)]
    assert batched == single


def test_prompt_templates(env) -> None:
    predictor = Predictor.from_pretrained(str(env["model"]), device="cpu")
    assert predictor.build_prompt("Is it red?") == "USER: <image>\nIs it red? ASSISTANT:"
    predictor.template = "vicuna_v1"
    assert predictor.build_prompt("Is it red?") == f"{VICUNA_V1_SYSTEM} USER: <image>\nIs it red? ASSISTANT:"


def test_pad_preprocessing_equals_llava_image_processor(env) -> None:
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    predictor = Predictor.from_pretrained(str(env["model"]), device="cpu")
    predictor.preprocessing = "pad"
    clip = predictor.processor.image_processor
    llava = LlavaImageProcessorPil(size=clip.size, crop_size=clip.crop_size, image_mean=clip.image_mean,
                                   image_std=clip.image_std)
    image = random_image(4, 120).resize((120, 70))
    ours = clip(predictor.prepare_image(image), return_tensors="pt")["pixel_values"]
    reference = llava(image, do_pad=True, return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape and (ours - reference).abs().max() < 1e-6


def test_bad_settings_fail_before_any_work(env, tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="valid templates: hf, vicuna_v1"):
        run_eval(_cfg(env, tmp_path, template="chatml"))
    with pytest.raises(EvalInputError, match="valid choices: crop, pad"):
        run_eval(_cfg(env, tmp_path, preprocessing="resize"))
    with pytest.raises(EvalInputError, match="keep must be"):
        run_eval(_cfg(env, tmp_path, method="random", keep="-3"))
    with pytest.raises(EvalInputError, match="--param needs a pruning method"):
        run_eval(dataclasses.replace(_cfg(env, tmp_path), params={"x": 1}))
    assert not (tmp_path / "pope-adversarial").exists()


def test_pruned_runs_record_kept_tokens(env, tmp_path: Path) -> None:
    rnd = run_eval(_cfg(env, tmp_path, method="random", keep=16, limit=2))
    assert rnd.run_dir.name.startswith("random-k16-")
    for line in _lines(rnd.run_dir):
        assert list(line["kept_tokens"].values()) == [16]
        assert (line["visual_tokens"], line["tokens_after_pruning"], line["layer_avg_tokens"]) == (64, 16, 16.0)
    assert rnd.summary["config"]["method"] == "random" and rnd.summary["config"]["keep"] == 16
    fastv = run_eval(_cfg(env, tmp_path, method="fastv", keep=8, limit=2))
    tokens = fastv.summary["tokens"]
    assert tokens["tokens_after_pruning"] == 8 and 8 < tokens["layer_avg_tokens"] < 64  # pruned after layer K
    fraction = run_eval(_cfg(env, tmp_path, method="random", keep="0.25", limit=1))
    assert fraction.run_dir.name.startswith("random-k0.25-") and fraction.summary["tokens"]["tokens_after_pruning"] == 16


def test_retry_errors_reruns_only_failed_samples(env, tmp_path: Path) -> None:
    rows = pope_rows("random", 3)
    good = dict(rows[1]["image"])
    rows[1]["image"] = {"bytes": b"broken", "path": None}
    write_rows(tmp_path / "data" / "pope.parquet", rows)
    cfg = _cfg(env, tmp_path / "out", split="random", dataset_id=str(tmp_path / "data"))
    first = run_eval(cfg)
    assert first.summary["counts"]["errors"] == 1
    rows[1]["image"] = good  # the data was repaired
    write_rows(tmp_path / "data" / "pope.parquet", rows)
    assert run_eval(cfg).evaluated_now == 0  # errors count as written unless retried
    retried = run_eval(dataclasses.replace(cfg, retry_errors=True))
    assert retried.run_dir == first.run_dir and retried.evaluated_now == 1
    assert retried.summary["counts"]["errors"] == 0 and len(_lines(retried.run_dir)) == 3
