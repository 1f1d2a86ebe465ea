"""Shared fixtures: tiny random LLaVA models (sdpa and eager, same weights) and a left-padded batch."""

from __future__ import annotations

import copy

import pytest
import torch

from vtprune.testing import make_tiny_llava, random_image

QUESTIONS = [
    "is there a red circle ?",
    "what colour is the shape in the image ?",
    "how many",
]


@pytest.fixture(scope="session")
def tiny():
    """(sdpa model, eager model with the same weights, processor)."""
    model, processor = make_tiny_llava(seed=0)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return model, eager, processor


def build_inputs(processor, questions, seeds, images_per_prompt=1):
    prompts = []
    images = []
    for q, s in zip(questions, seeds, strict=False):
        content = [{"type": "image"}] * images_per_prompt + [{"type": "text", "text": q}]
        prompts.append(
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        )
        images.extend(random_image(s * 10 + i) for i in range(images_per_prompt))
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"]
    inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0).masked_fill(mask == 0, 0)
    return inputs


def sized_image_inputs(processor, questions, sizes, seeds, side):
    """One chat prompt per question with one random image each (`random_image(seed, side)` resized to the
    size's (width, height)), in one left-padded batch: images of different token counts (LLaVA-NeXT, Qwen-VL)."""
    prompts, images = [], []
    for question, size, seed in zip(questions, sizes, seeds, strict=True):
        content = [{"type": "image"}, {"type": "text", "text": question}]
        prompts.append(
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        )
        images.append(random_image(seed, side).resize(size))
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


@pytest.fixture(scope="session")
def batch_inputs(tiny):
    _, _, processor = tiny
    return build_inputs(processor, QUESTIONS, [1, 2, 3])


def hook_snapshot(model: torch.nn.Module) -> list:
    """Every forward (pre-)hook on the model. transformers registers some of its own (output capturing)."""
    return [(name, tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()]
