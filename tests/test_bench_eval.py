"""`vtprune bench-eval` on the tiny LLaVA (CPU, seconds): the lmms-eval-style batch-1 loop against `vtprune eval`
batched, equal work on both sides, the files it writes, and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from vtprune.cli import app

SAMPLES, BATCH, NEW_TOKENS, KEEP = 6, 3, 4, 16


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("bench_eval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "datasets", None)  # the GPU image has no `datasets`: the path must not need it
        result = CliRunner().invoke(app, [
            "bench-eval", "--arch", "tiny", "--methods", "none,visionzip", "--keep", str(KEEP),
            "--batch", str(BATCH), "--samples", str(SAMPLES), "--new-tokens", str(NEW_TOKENS),
            "--image-size", "48x64", "--no-progress", "--output", str(out),
        ])
    return SimpleNamespace(result=result, out=out)


def test_runs_end_to_end_and_writes_results(run) -> None:
    assert run.result.exit_code == 0, run.result.output
    results = json.loads((run.out / "results.json").read_text())
    assert (run.out / "results.md").read_text().startswith("# Eval throughput: tiny")
    base, batched = results["baseline"], results["batched"]
    assert [e["method"] for e in batched] == ["none", "visionzip"]
    assert base["batch"] == 1 and base["generate_calls"] == SAMPLES
    for entry in batched:
        assert entry["status"] == "ok", entry
        assert entry["batch"] == BATCH and entry["generate_calls"] == SAMPLES // BATCH
        assert entry["ratio"] == pytest.approx(entry["samples_per_s"] / base["samples_per_s"])
        assert entry["evaluated"] == SAMPLES and entry["errors"] == 0
        lines = (Path(entry["run_dir"]) / "samples.jsonl").read_text().splitlines()
        assert len(lines) == SAMPLES
    # the pruning really ran in the eval path: 16 of the tiny model's 64 visual tokens
    assert [e["kept_visual_tokens"] for e in batched] == [64, KEEP]
    assert results["meta"]["visual_tokens"] == 64 and "min_new_tokens = max_new_tokens" in results["meta"]["forced_length"]


def test_both_sides_do_equal_work(run) -> None:
    results = json.loads((run.out / "results.json").read_text())
    expected = (SAMPLES, SAMPLES * NEW_TOKENS)
    assert (results["baseline"]["samples"], results["baseline"]["generated_tokens"]) == expected
    for entry in results["batched"]:
        assert (entry["samples"], entry["generated_tokens"]) == expected and entry["equal_work"] is True


def test_prints_rates_ratio_and_verdict(run) -> None:
    results = json.loads((run.out / "results.json").read_text())
    output = run.result.output
    assert "samples/s" in output and "the baseline" in output and "answer length forced" in output
    zip_entry = results["batched"][1]
    assert zip_entry["target_met"] == (zip_entry["ratio"] >= 6.0)
    assert results["batched"][0].get("target_met") is None  # `none` separates batching from pruning
    verdict = results["target"]["verdict"]
    assert verdict in ("target met", "MISSED") and f"6x at {KEEP} visual tokens): {verdict}" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "none,nosuchmethod"], "unknown method 'nosuchmethod'"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--arch", "llava-9b"], "unknown --arch"),
        (["--arch", "llava-1.5-7b"], "add --random-weights"),
        (["--keep", "100"], "more than the 64 visual tokens"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench-eval", "--arch", "tiny", *args, "--no-progress", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output and "Traceback" not in result.output
    assert not out.exists()  # nothing was written


def test_processor_matches_the_llava_1_5_7b_config() -> None:
    """The locally built processor fits the random-weights 7B model: its vocabulary, special ids and 576 image
    tokens for a COCO-sized image at 336 px."""
    from PIL import Image

    from vtprune.bench.eval_throughput import processor_for
    from vtprune.bench.flops import arch_config

    config = arch_config("llava-1.5-7b")
    processor = processor_for(SimpleNamespace(config=config))
    tok = processor.tokenizer
    assert len(tok) == config.text_config.vocab_size == 32064
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 32001)
    assert tok.convert_tokens_to_ids("<image>") == config.image_token_id == 32000
    content = [{"type": "image"}, {"type": "text", "text": "Is there a dog in the image?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (640, 480))], text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == 32000).sum()) == 576
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert 0 not in inputs["input_ids"][0].tolist()  # no <unk>: the prompt's words have ids
