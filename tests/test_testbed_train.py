"""The testbed training code: prompts identical to the processor's, the written-out loss equals LLaVA's, smoke."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vtprune.testbed import evaluate as ev
from vtprune.testbed import train
from vtprune.testbed.model import build_model, build_processor
from vtprune.testbed.questions import SYSTEM_PROMPT, caption, sample_training_example
from vtprune.testbed.render import render, sample_scene


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def pool():
    return train.build_pool(6, seed=0, workers=1)


def _batches(processor, pool, **overrides):
    cfg = train.parse_args(["--smoke"])
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return train.QuestionBatches(pool.scenes, processor, cfg, image_seq_length=576)


def test_training_prompt_ids_match_processor(processor, pool):
    batches = _batches(processor, pool)
    image = Image.fromarray(render(pool.scenes[0])[0])
    for text in ("Is there a red circle in the image?\nAnswer the question using a single word or phrase.",
                 "Describe this image."):  # fmt: skip
        for system in (None, SYSTEM_PROMPT):
            prompt = ev.chat_prompt(processor, text, system)
            expected = processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
            assert batches.prompt_ids(text, system) == expected


def test_batch_labels_cover_answer_and_eos_only(processor, pool):
    batches = _batches(processor, pool, batch_size=24, caption_fraction=0.3)
    batch = batches.make_batch(np.random.default_rng(0))
    tok = processor.tokenizer
    assert {0, 1, 2} <= set(batch["kind"].tolist()) <= {0, 1, 2, 4}  # 4: a position MCQ, logged apart
    for ids, labels, index, kind in zip(
        batch["input_ids"], batch["labels"], batch["index"], batch["kind"], strict=True
    ):
        answer = labels[labels != -100].tolist()
        assert answer[-1] == tok.eos_token_id
        words = tok.convert_ids_to_tokens(answer[:-1])
        if kind == 0:
            assert words in (["yes"], ["no"])
        elif kind in (1, 4):
            assert words[0] in "ABCD" and len(words) == 1
        else:
            assert " ".join(words) == caption(pool.scenes[int(index)])
        real = ids[ids != tok.pad_token_id]
        assert real[-len(answer) :].tolist() == answer  # right padding: the answer ends the real tokens


def test_written_out_loss_equals_llava_loss(processor, pool):
    model = build_model(processor, seed=0, **train.TINY_MODEL).eval()
    batch = _batches(processor, pool, batch_size=3).make_batch(np.random.default_rng(1))
    pixels = train.PixelNormaliser(processor, torch.device("cpu"))(pool.pixels[batch["index"]])
    with torch.no_grad():
        features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        loss, _ = train.answer_loss(model, features, batch["input_ids"], batch["labels"])
        reference = model(input_ids=batch["input_ids"], pixel_values=pixels, labels=batch["labels"]).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_per_example_loss_is_the_mean_of_row_losses(processor, pool):
    model = build_model(processor, seed=0, **train.TINY_MODEL).eval()
    batch = _batches(processor, pool, batch_size=4, caption_fraction=0.5).make_batch(np.random.default_rng(3))
    pixels = train.PixelNormaliser(processor, torch.device("cpu"))(pool.pixels[batch["index"]])
    with torch.no_grad():
        features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got, _ = train.answer_loss(model, features, batch["input_ids"], batch["labels"], per_example=True)
        rows = [
            train.answer_loss(
                model, features[i : i + 1], batch["input_ids"][i : i + 1], batch["labels"][i : i + 1]
            )[0]
            for i in range(4)
        ]
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


def test_trained_tower_layers_reproduce_the_features(processor, pool):
    from contextlib import nullcontext

    model = build_model(processor, seed=0, **train.TINY_MODEL).eval()
    normalise = train.PixelNormaliser(processor, torch.device("cpu"))
    with torch.no_grad():
        expected = model.model.vision_tower(normalise(pool.pixels), output_hidden_states=True).hidden_states[
            -2
        ][:, 1:]
        cached = train.precompute_features(
            model, pool, normalise, torch.device("cpu"), nullcontext, tower_layers=1
        )
        _, layers = train.tower_top_layers(model, 1)
        torch.testing.assert_close(train.run_tower_layers(layers, cached), expected)
        stats = train.centre_projector(model, cached, tower_layers=1)
        projected = model.model.multi_modal_projector.linear_1(expected.flatten(0, 1))
    centred = (expected.flatten(0, 1) - expected.flatten(0, 1).mean(0)).pow(2).mean().sqrt()
    assert stats["centred_rms"] == pytest.approx(centred.item(), rel=1e-4)
    assert projected.mean(0).abs().max() < 1e-4  # the centred features' mean maps to the bias of 0
    with pytest.raises(ValueError, match="tower_layers"):
        train.tower_top_layers(model, 2)


def test_pixel_normaliser_matches_processor(processor):
    pixels = render(sample_scene(np.random.default_rng(2)))[0]
    expected = processor.image_processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    got = train.PixelNormaliser(processor, torch.device("cpu"))(torch.from_numpy(pixels)[None])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smoke_run_saves_a_loadable_model(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    report = train.main(["--out", str(tmp_path), "--smoke", "--position-weight", "1"])
    assert report["train"]["llm"]["steps"] == 4 and "position" in report["train"]["vision"]
    options = ["--position-loss", "mse", "--tower-layers", "1", "--per-example-loss", "--centre-projector",
               "--binding-fraction", "0.5", "--attribute-fraction", "0.5", "--no-eval-sample"]  # fmt: skip
    report = train.main(["--out", str(tmp_path / "new"), "--smoke", "--position-weight", "1", *options])
    assert report["train"]["llm"]["steps"] == 4 and "position" in report["train"]["vision"]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["heldout"]["pope"]["all"]["n"] > 0 and (tmp_path / "model.tar").is_file()
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert model.dtype == torch.float32
    AutoProcessor.from_pretrained(tmp_path / "model")


def test_position_fraction_sets_the_share_of_position_mcqs(processor, pool):
    rng = np.random.default_rng(5)
    kinds = []
    for _ in range(300):
        ex = sample_training_example(pool.scenes[int(rng.integers(len(pool.scenes)))], rng, mcq_fraction=1.0,
                                     position_fraction=1.0)  # fmt: skip
        kinds.append(ex.qtype if ex.kind == "mcq" else ex.kind)
    # every MCQ asks about position; a scene without an object alone in a quadrant falls back to a yes/no probe
    assert set(kinds) <= {"colour_at", "shape_at", "pope", "attribute"}
    assert kinds.count("colour_at") > 50 and kinds.count("shape_at") > 50


def test_quadrant_head_learns_object_patches_only():
    heads = train.AuxHeads(8, quadrant=True)
    features = torch.zeros(1, 577, 8)
    labels = torch.full((1, 576), 64)
    labels[0, [0, 23, 24 * 23, 575]] = 5  # one object patch in each corner
    out = heads.losses(
        type("Out", (), {"pooler_output": features[:, 0], "hidden_states": [features, features]})(),
        torch.zeros(1, 64), labels,
    )  # fmt: skip
    # all-zero features: the head outputs its bias for the four object patches, whose quadrants are 0, 1, 2, 3
    logp = torch.log_softmax(heads.quadrant.bias.detach(), -1)
    assert out["quadrant"].item() == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert train.patch_quadrants()[[0, 23, 24 * 23, 575]].tolist() == [0, 1, 2, 3]
    assert train.patch_quadrants()[[11, 12, 24 * 11, 24 * 12]].tolist() == [0, 1, 0, 2]


def test_region_probe_names_the_object_alone_in_its_quadrant(pool):
    from vtprune.testbed.questions import region_probe
    from vtprune.testbed.world import class_name

    rng = np.random.default_rng(0)
    seen = 0
    for scene in pool.scenes:
        probe = region_probe(scene, rng)
        if probe is None:
            continue
        seen += 1
        region = probe.text.split("What is in the ")[1].split("?")[0]
        inside = [o for o in scene.objects if o.region() == region]
        assert len(inside) == 1 and probe.answer == class_name(inside[0].cls) and probe.kind == "region"
    assert seen >= 3


def test_region_check_asks_about_the_object_alone_in_its_quadrant(pool, processor):
    from vtprune.testbed.questions import region_check, sample_training_example
    from vtprune.testbed.world import COLOURS, SHAPES

    rng = np.random.default_rng(0)
    answers = []
    for scene in pool.scenes * 4:
        check = region_check(scene, rng)
        if check is None:
            continue
        question = check.text.split("?")[0]
        region = question.split(" in the ")[1]
        (target,) = [o for o in scene.objects if o.region() == region]
        asked = question.split("Is there ")[1].split(" in the ")[0].split()[1]  # "red" (object) or "star"
        truth = asked == (COLOURS[target.colour] if asked in COLOURS else SHAPES[target.shape])
        assert check.answer == ("yes" if truth else "no") and check.kind == "region_check"
        assert processor.tokenizer.unk_token_id not in processor.tokenizer(check.text)["input_ids"]
        answers.append(check.answer)
    assert 0.3 < answers.count("yes") / len(answers) < 0.7
    kinds = {sample_training_example(s, rng, 0.4, region_check_fraction=0.5).kind for s in pool.scenes * 4}
    assert "region_check" in kinds


def test_open_position_question_is_the_mcq_without_its_options(pool, processor):
    from vtprune.testbed.questions import POPE_POST_PROMPT, open_position_question, sample_training_example
    from vtprune.testbed.world import COLOURS, SHAPES

    rng = np.random.default_rng(0)
    qtypes = set()
    for scene in pool.scenes * 4:
        question = open_position_question(scene, rng)
        if question is None:
            continue
        assert question.kind == "position_open" and question.text.endswith(POPE_POST_PROMPT)
        region = question.text.split(" in the ")[1].split("?")[0]
        (target,) = [o for o in scene.objects if o.region() == region]
        if question.qtype == "colour_at":
            assert question.text.startswith("Which colour is the shape in the ")
            assert question.answer == COLOURS[target.colour]
        else:
            assert (
                question.text.startswith("Which shape is in the ") and question.answer == SHAPES[target.shape]
            )
        assert processor.tokenizer.unk_token_id not in processor.tokenizer(question.text)["input_ids"]
        qtypes.add(question.qtype)
    assert qtypes == {"colour_at", "shape_at"}
    drawn = [sample_training_example(s, rng, 0.4, open_position_fraction=0.5) for s in pool.scenes * 4]
    assert "position_open" in {ex.kind for ex in drawn}
    # the MCQ log counts real MCQs only: an open question carries a position qtype but is not an "mcq"
    cfg = train.parse_args(["--smoke", "--open-position-fraction", "1.0"])
    batch = train.QuestionBatches(pool.scenes, processor, cfg, 576).make_batch(np.random.default_rng(0))
    assert train.KINDS.index("mcq_position") not in batch["kind"].tolist()
    assert train.KINDS.index("position_open") in batch["kind"].tolist()


def test_compile_pads_batches_to_a_fixed_multiple(processor, pool):
    cfg = train.parse_args(["--smoke", "--compile"])
    batch = train.QuestionBatches(pool.scenes, processor, cfg, 576).make_batch(np.random.default_rng(0))
    plain = train.QuestionBatches(pool.scenes, processor, train.parse_args(["--smoke"]), 576).make_batch(
        np.random.default_rng(0)
    )
    width = plain["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] == -(-width // train.PAD_MULTIPLE) * train.PAD_MULTIPLE
    assert torch.equal(batch["input_ids"][:, :width], plain["input_ids"])
    assert (batch["labels"][:, width:] == -100).all()


def test_text_only_batches_are_hinted_mcqs_without_the_image(processor, pool):
    from vtprune.testbed.questions import LETTERS

    batches = _batches(processor, pool, batch_size=32)
    batches.text_only = True
    rng = np.random.default_rng(0)
    kinds, qtypes = set(), set()
    for _ in range(3):
        scene = pool.scenes[int(rng.integers(len(pool.scenes)))]
        example = batches.draw_example(scene, rng)
        kinds.add(example.kind)
        qtypes.add(example.qtype)
        # the context gives the answer: the option that the answer letter names
        hint = example.text.split("Context: The answer is ")[1].split(".\n")[0]
        assert f"\n{example.answer}. {hint}\n" in example.text and example.answer in LETTERS
    assert kinds == {"mcq_hinted"}
    batch = batches.make_batch(rng)
    assert batches.image_id not in batch["input_ids"] and batch["input_ids"].shape[1] < 100
    assert set(batch["kind"].tolist()) == {train.KINDS.index("mcq_hinted")}


def test_text_steps_and_init_from_go_on_training_a_saved_model(tmp_path):
    first = train.main(["--out", str(tmp_path / "a"), "--smoke", "--text-steps", "3", "--no-eval-sample"])
    assert first["train"]["text"]["steps"] == 3 and first["train"]["llm"]["steps"] == 4
    report = train.main(["--out", str(tmp_path / "b"), "--smoke", "--init-from", str(tmp_path / "a" / "model"),
                         "--no-eval-sample"])  # fmt: skip
    assert report["train"]["vision"]["steps"] == 0 and report["train"]["llm"]["steps"] == 4
    assert report["model_config"] == first["model_config"]
    assert report["model_config"]["text_layers"] == train.TINY_MODEL["text_layers"]
    with pytest.raises(FileNotFoundError, match="no saved model"):
        train.main(["--out", str(tmp_path / "c"), "--smoke", "--init-from", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="keeps the saved model's shape"):
        train.main(["--out", str(tmp_path / "c"), "--smoke", "--init-from", str(tmp_path / "a" / "model"),
                    "--text-layers", "3"])  # fmt: skip


def test_model_overrides_change_the_llm_shape(processor):
    cfg = train.parse_args(["--smoke", "--text-layers", "3", "--text-heads", "2"])
    model = build_model(processor, seed=0, **train.model_overrides(cfg))
    assert (
        model.config.text_config.num_hidden_layers == 3 and model.config.text_config.num_attention_heads == 2
    )
    assert train.model_overrides(train.parse_args([])) == {}


def test_ranks_draw_their_own_questions(processor, pool):
    cfg = train.parse_args(["--smoke"])
    first = [next(iter(train.QuestionBatches(pool.scenes, processor, cfg, 576, rank=r))) for r in (0, 1)]
    assert not torch.equal(first[0]["index"], first[1]["index"]) or not torch.equal(
        first[0]["input_ids"], first[1]["input_ids"]
    )
    # rank 0 draws exactly what a single process drew before data parallelism existed
    legacy = train.QuestionBatches(pool.scenes, processor, cfg, 576).make_batch(
        np.random.default_rng([0, 99, 0])
    )
    assert torch.equal(first[0]["input_ids"], legacy["input_ids"])


def test_data_parallel_gradient_equals_whole_batch(tmp_path):
    """Two processes under torchrun, each with half a batch: DDP's averaged gradient is the whole batch's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ddp_answer_gradient.py")
    flag = tmp_path / "ok"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(flag),
    ]
    proc = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert flag.read_text() == "ok"


def test_training_under_torchrun_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vtprune.testbed.train", "--out", str(out), "--smoke", "--tower-layers", "1"]  # fmt: skip
    proc = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())  # written only when the replicas ended identical
    assert report["config"]["processes"] == 2 and report["command"].startswith("torchrun --nproc-per-node 2")
    assert report["train"]["llm"]["steps"] == 4 and (out / "model" / "model.safetensors").is_file()
    assert proc.stdout.count("llm 4/4") == 1  # only process 0 logs
