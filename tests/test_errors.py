"""Bad input gets a clear error at the edge, naming the valid choices."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS, build_inputs
from transformers import LlamaConfig, LlamaForCausalLM

import vtprune
from vtprune import PruneConfigError


def test_unknown_method_names_valid_ones(tiny):
    model, _, _ = tiny
    with pytest.raises(PruneConfigError, match=r"unknown method 'bogus'; valid methods: .*fastv.*vispruner"):
        vtprune.prune(model, "bogus", keep=8)
    assert not vtprune.is_pruned(model)


@pytest.mark.parametrize("keep", [0, -3])
def test_keep_must_be_positive(tiny, keep):
    model, _, _ = tiny
    with pytest.raises(PruneConfigError, match="must be >= 1"):
        vtprune.prune(model, "random", keep=keep)


def test_keep_larger_than_visual_tokens(tiny):
    model, _, _ = tiny
    with pytest.raises(PruneConfigError, match="larger than the 64 visual tokens"):
        vtprune.prune(model, "vispruner", keep=65)


@pytest.mark.parametrize("keep", [1.5, 2.7])
def test_fraction_outside_unit_interval(tiny, keep):
    model, _, _ = tiny
    with pytest.raises(PruneConfigError, match=r"fraction must be in \(0, 1\]"):
        vtprune.prune(model, "random", keep=keep)


@pytest.mark.parametrize("K", [4, 9])
def test_layer_outside_range(tiny, K):
    model, _, _ = tiny  # 4 decoder layers: valid prune layers 1..3
    with pytest.raises(PruneConfigError, match=r"outside the LLM's layers \(valid: 1\.\.3\)"):
        vtprune.prune(model, "fastv", keep=8, K=K)


def test_unknown_parameter_lists_valid_ones(tiny):
    model, _, _ = tiny
    with pytest.raises(PruneConfigError, match="unknown parameter.*alpha.*valid:.*important_ratio"):
        vtprune.prune(model, "vispruner", keep=8, alpha=3)


def test_unsupported_model_class():
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    with pytest.raises(
        PruneConfigError,
        match=r"unsupported model class LlamaForCausalLM \(model_type 'llama'\); supported: "
        r"llava \(LlavaForConditionalGeneration\)",
    ):
        vtprune.prune(LlamaForCausalLM(config), "fastv", keep=8)


def test_model_without_generation_head(tiny):
    from transformers import LlavaModel

    model, _, _ = tiny
    with pytest.raises(PruneConfigError, match="LlavaModel for the llava family; supported: LlavaForCondition"):
        vtprune.prune(LlavaModel(model.config), "fastv", keep=8)


def test_prompt_without_image_token(tiny):
    model, _, processor = tiny
    inputs = build_inputs(processor, QUESTIONS[:1], [1])
    text_only = processor.tokenizer(["is there a cat ?"], return_tensors="pt")
    with vtprune.pruned(model, "random", keep=8):
        with pytest.raises(PruneConfigError, match="contain no image token"):
            model(input_ids=text_only["input_ids"], pixel_values=inputs["pixel_values"])


def test_image_count_must_match_blocks(tiny):
    model, _, processor = tiny
    inputs = build_inputs(processor, QUESTIONS[:1], [1])
    two_images = torch.cat([inputs["pixel_values"], inputs["pixel_values"]])
    with vtprune.pruned(model, "random", keep=8):
        with pytest.raises(PruneConfigError, match="2 image\\(s\\) were given but the prompts hold \\[1\\]"):
            model(input_ids=inputs["input_ids"], pixel_values=two_images)


def test_method_validates_its_own_fields():
    with pytest.raises(PruneConfigError, match="important_ratio"):
        vtprune.get_method("vispruner", keep=8, important_ratio=1.5)
    with pytest.raises(PruneConfigError, match="query"):
        vtprune.get_method("fastv", keep=8, query="middle")
    with pytest.raises(PruneConfigError, match="unknown head strategy"):
        vtprune.get_method("fastv", keep=8, heads="loudest")
    with pytest.raises(PruneConfigError, match="unknown debias option"):
        vtprune.get_method("fastv", keep=8, debias=["gravity"])


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    from vtprune.testing import random_image, save_tiny_llava

    path = save_tiny_llava(tmp_path / "m")
    random_image(0).save(tmp_path / "i.png")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vtprune.cli",
            "generate",
            "--model",
            str(path),
            "--image",
            str(tmp_path / "i.png"),
            "--prompt",
            "x",
            "--method",
            "bogus",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown method 'bogus'; valid methods:")  # every command: stderr, one line
    assert "Traceback" not in result.stdout + result.stderr
