"""The testbed LLaVA: a real `LlavaForConditionalGeneration` shaped like llava-1.5, only small.

CLIP vision tower at 336 px / patch 14 (576 visual tokens), `vision_feature_layer=-2`, strategy `default`,
a two-layer GELU projector and a small Llama, with a word-level tokenizer that knows every word the shapes
questions and the LLaVA prompts use.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vtprune.testbed.questions import LETTERS, MCQ_POST_PROMPT, POPE_POST_PROMPT, SYSTEM_PROMPT
from vtprune.testbed.render import IMAGE_SIZE, PATCH_SIZE, REGIONS
from vtprune.testbed.world import COLOURS, SHAPE_PLURALS, SHAPES
from vtprune.testing import BASIC_WORDS, IMAGE_TOKEN, make_tiny_processor, tiny_llava_config

_QUESTION_WORDS = (
    "Is there a an in the image ? How many are objects object Which colour is shape What Context : - ' s "
    "Describe this ."
).split()

# Architecture of the shipped model (see weights/README.md).
MODEL_CONFIG: dict[str, int] = {
    "vision_hidden": 256,
    "vision_layers": 6,
    "vision_heads": 4,
    "text_hidden": 256,
    "text_layers": 6,
    "text_heads": 4,
    "intermediate_size": 768,
}


def _words_of(text: str) -> list[str]:
    """Words and punctuation marks, split the way the word-level tokenizer splits them."""
    out: list[str] = []
    for chunk in text.split():
        word = ""
        for ch in chunk:
            if ch.isalnum():
                word += ch
            else:
                if word:
                    out.append(word)
                out.append(ch)
                word = ""
        if word:
            out.append(word)
    return out


def testbed_words() -> list[str]:
    """The tokenizer's vocabulary: the tiny-model basics plus every word of the testbed prompts."""
    words = list(BASIC_WORDS) + _QUESTION_WORDS + list(COLOURS) + list(SHAPES) + list(SHAPE_PLURALS.values())
    words += [w for region in REGIONS for w in _words_of(region)]
    words += list(LETTERS) + [str(i) for i in range(10)]
    for text in (POPE_POST_PROMPT, MCQ_POST_PROMPT, SYSTEM_PROMPT):
        words += _words_of(text)
    return list(dict.fromkeys(words))


def build_processor() -> LlavaProcessor:
    """A `LlavaProcessor` (CLIP image processor at 336 px, word-level tokenizer, llava-hf chat template)."""
    return make_tiny_processor(testbed_words(), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


def build_model(processor: LlavaProcessor, seed: int = 0, **overrides: int) -> LlavaForConditionalGeneration:
    """A freshly initialised testbed LLaVA (float32). `overrides` change `MODEL_CONFIG` entries."""
    tok = processor.tokenizer
    kwargs = {**MODEL_CONFIG, **overrides}
    config = tiny_llava_config(
        len(tok),
        tok.convert_tokens_to_ids(IMAGE_TOKEN),
        tok.pad_token_id,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        **kwargs,
    )
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)
