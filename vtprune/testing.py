"""Tiny LLaVA models and processors built from configs, for tests, CPU benchmarks and examples.

Nothing here downloads: the tokenizer is a word-level `tokenizers` model built from a word list, the image
processor is a `CLIPImageProcessor` and the model is a randomly initialised `LlavaForConditionalGeneration`.
`save_tiny_llava` writes everything with `save_pretrained`, so loading goes through the same
`from_pretrained` code path as a llava-hf checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vtprune import compat

IMAGE_TOKEN = "<image>"

# A llava-hf style template: "USER: <image>\n{text} ASSISTANT:". An optional system message is printed first,
# which is how the LLaVA `vicuna_v1` prompt is reproduced.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

BASIC_WORDS = (
    "USER ASSISTANT : ? . , is there a an the in image picture yes no not what which how many colour color "
    "shape of A B C D E answer question using single word or phrase with option letter from given choices "
    "directly describe this 0 1 2 3 4 5 6 7 8 9 red green blue yellow circle square triangle cat dog chair"
).split()


def build_word_tokenizer(
    words: list[str], vision_tokens: tuple[str, ...] = (IMAGE_TOKEN,), named: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: one id per word or punctuation mark, the `vision_tokens` (LLaVA: `<image>`)
    as special tokens right after <unk> <pad> <s> </s>; `named` gives the processor's token attributes."""
    vocab: dict[str, int] = {}
    for token in ["<unk>", "<pad>", "<s>", "</s>", *vision_tokens, *words]:
        vocab.setdefault(token, len(vocab))
    return _word_level_tokenizer(vocab, vision_tokens, named)


def build_word_tokenizer_for_ids(
    vocab_size: int, special_ids: dict[str, int], words: list[str] | tuple[str, ...] = BASIC_WORDS
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer of exactly `vocab_size` ids whose special tokens sit at the ids a model's
    config names (`special_ids`: `<unk>`, `<s>`, `</s>`, `<pad>`, `<image>` -> id; llava-hf: 0, 1, 2, 32001,
    32000 of 32,064), so a random-weights model of a real architecture gets a processor without a download.
    The other ids hold `words`, then fillers (`tok123`) up to the vocabulary size."""
    if len(set(special_ids.values())) != len(special_ids) or max(special_ids.values()) >= vocab_size:
        raise ValueError(f"special ids {special_ids} must be distinct and below the vocabulary size {vocab_size}")
    vocab = dict(special_ids)
    free = (i for i in range(vocab_size) if i not in set(special_ids.values()))
    fillers = (f"tok{i}" for i in range(vocab_size))
    for token in [*dict.fromkeys(words), *fillers]:
        if token in vocab:
            continue
        index = next(free, None)
        if index is None:
            break
        vocab[token] = index
    return _word_level_tokenizer(vocab, (IMAGE_TOKEN,), None)


def _word_level_tokenizer(
    vocab: dict[str, int], vision_tokens: tuple[str, ...], named: dict[str, str] | None
) -> PreTrainedTokenizerFast:
    """`vocab` (holding <unk> <pad> <s> </s> and the vision tokens) as a fast tokenizer that splits on spaces
    and punctuation and puts BOS first."""
    from tokenizers import processors

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=named or {"image_token": IMAGE_TOKEN},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(vision_tokens)})
    # Word-level tokenizers have no post-processor adding BOS; the prompts start with BOS.
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return tokenizer


def _spread_random_model(model_cls, config, seed: int):
    """`model_cls(config)` in eval mode, its matrices drawn with std 0.08: the default random init gives
    near-uniform attention, a larger spread makes selections (and the tests) discriminative."""
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def build_clip_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level, lower-casing tokenizer with CLIP's special tokens (`<|startoftext|>` = 0,
    `<|endoftext|>` = 1, also pad and unk), for small CLIP text towers saved next to it."""
    vocab: dict[str, int] = {}
    for word in ["<|startoftext|>", "<|endoftext|>", *(w.lower() for w in words)]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=77,
    )


def tiny_llava_config(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    *,
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    attn_implementation: str = "sdpa",
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=intermediate_size or text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads or text_heads,
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return compat.set_attention_implementation(config, attn_implementation)


def make_tiny_processor(words: list[str] | None = None, image_size: int = 112, patch_size: int = 14) -> LlavaProcessor:
    tokenizer = build_word_tokenizer(list(words) if words is not None else BASIC_WORDS)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_llava(
    seed: int = 0, attn_implementation: str = "sdpa", processor: LlavaProcessor | None = None, **config_kwargs
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA and its processor. Extra kwargs go to `tiny_llava_config`."""
    image_size = config_kwargs.get("image_size", 112)
    patch_size = config_kwargs.get("patch_size", 14)
    processor = processor or make_tiny_processor(image_size=image_size, patch_size=patch_size)
    tok = processor.tokenizer
    config = tiny_llava_config(
        len(tok),
        tok.convert_tokens_to_ids(IMAGE_TOKEN),
        tok.pad_token_id,
        attn_implementation=attn_implementation,
        **config_kwargs,
    )
    return _spread_random_model(LlavaForConditionalGeneration, config, seed), processor


# LLaVA-NeXT in miniature: 56 px crops of 4 x 4 patches; a wide image gets 1 x 2 tiles, a square-ish one 2 x 2.
TINY_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def make_tiny_llava_next(
    seed: int = 0, attn_implementation: str = "sdpa", crop_size: int = 56, patch_size: int = 14
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random tiny LLaVA-NeXT (AnyRes: base view + tiles, unpadded, `image_newline` per row) and its
    processor; images of different aspect ratios expand to different numbers of image tokens."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = build_word_tokenizer(BASIC_WORDS)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop_size},
        crop_size={"height": crop_size, "width": crop_size},
        image_grid_pinpoints=TINY_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    base = tiny_llava_config(
        len(tokenizer),
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tokenizer.pad_token_id,
        image_size=crop_size,
        patch_size=patch_size,
    )
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=base.image_token_id,
        image_grid_pinpoints=TINY_NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    compat.set_attention_implementation(config, attn_implementation)
    model = _spread_random_model(LlavaNextForConditionalGeneration, config, seed)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 0.5)
    return model, processor


def save_tiny_llava(directory: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny random LLaVA checkpoint (model + processor) that `from_pretrained` can load."""
    directory = Path(directory)
    model, processor = make_tiny_llava(seed=seed, **config_kwargs)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_tiny_llava_next(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA-NeXT checkpoint (model + processor) that `from_pretrained` can load."""
    directory = Path(directory)
    model, processor = make_tiny_llava_next(seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def random_image(seed: int, size: int = 112):
    """A deterministic RGB PIL image with some structure (blocks + noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = np.kron(coarse, np.ones((size // 8 + 1, size // 8 + 1, 1), dtype=np.uint8))[:size, :size]
    noise = rng.integers(0, 40, size=img.shape, dtype=np.uint8)
    return Image.fromarray((img.astype(int) + noise).clip(0, 255).astype(np.uint8))


# --- Qwen2-VL / Qwen2.5-VL in miniature ----------------------------------------------------------------------
# 8 px patches merged 2 x 2: a 48 x 32 image is a 6 x 4 patch grid, 3 x 2 = 6 LLM tokens; dynamic resolution
# gives every image size its own token count.
QWEN_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>\n' }}"
    "{% else %}{{ content['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TINY_QWEN_PATCH = 8


def build_qwen_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen-VL's vision special tokens (`<|image_pad|>`, `<|video_pad|>`, ...)."""
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    return build_word_tokenizer(words, tuple(QWEN_SPECIAL_TOKENS), named)


def make_tiny_qwen_vl(
    kind: str = "qwen2_5_vl", seed: int = 0, attn_implementation: str = "sdpa"
):
    """A random tiny Qwen2.5-VL (`kind="qwen2_5_vl"`) or Qwen2-VL (`"qwen2_vl"`) and its processor (images; the
    video processor needs torchvision: `tiny_qwen_video` patchifies frames the same way). The Qwen2.5 tower has 4 blocks, windowed attention in blocks 0 and 2 (16 px windows: 2 x 2 merged
    tokens), full attention in 1 and 3; the Qwen2 tower has 3 full-attention blocks."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vtprune.models.qwen2_vl import image_only_processor_class

    tokenizer = build_qwen_word_tokenizer(BASIC_WORDS)
    patch = TINY_QWEN_PATCH
    factor = patch * 2
    size = {"shortest_edge": 2 * factor * factor, "longest_edge": 64 * factor * factor}
    image_processor = Qwen2VLImageProcessorPil(
        size=size, patch_size=patch, temporal_patch_size=2, merge_size=2
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=2,
        eos_token_id=3,
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        vision = dict(
            depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=patch,
            temporal_patch_size=2, spatial_merge_size=2, window_size=2 * factor, fullatt_block_indexes=[1, 3],
            tokens_per_second=2,
        )
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **common)
        model_cls, processor_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    elif kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        vision = dict(
            depth=3, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=patch,
            temporal_patch_size=2, spatial_merge_size=2,
        )
        config = Qwen2VLConfig(vision_config=vision, text_config=text, **common)
        model_cls, processor_cls = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        raise ValueError(f"unknown tiny Qwen kind {kind!r}: qwen2_5_vl or qwen2_vl")
    processor = image_only_processor_class(processor_cls)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=QWEN_CHAT_TEMPLATE,
    )
    compat.set_attention_implementation(config, attn_implementation)
    return _spread_random_model(model_cls, config, seed), processor


def save_tiny_qwen_vl(directory: str | Path, kind: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL / Qwen2-VL checkpoint (model + processor) for `from_pretrained`."""
    import json

    directory = Path(directory)
    model, processor = make_tiny_qwen_vl(kind, seed=seed)
    model.save_pretrained(directory)
    # The processor's parts, as a Qwen checkpoint has them (its save_pretrained needs a video processor).
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(processor.chat_template)
    name = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}[kind]
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": name}))
    return directory


def tiny_qwen_video_inputs(processor, videos: list, questions: list[str]) -> dict:
    """Model inputs for video prompts on a tiny Qwen-VL, built without transformers' video processor (it needs
    torchvision): each video is a (T, H, W, 3) uint8 array (T even, H and W multiples of 16 px), normalised
    with the image processor's mean / std and cut into (2 frames x 8 px x 8 px) patches in the order the
    Qwen-VL video processor uses (2 x 2 merge units consecutive); the prompt's `<|video_pad|>` is expanded to
    t * h * w / 4 tokens, as the processor does."""
    import numpy as np

    ip = processor.image_processor
    patch, temporal, merge = ip.patch_size, ip.temporal_patch_size, ip.merge_size
    mean, std = np.asarray(ip.image_mean)[:, None, None], np.asarray(ip.image_std)[:, None, None]
    flat, grids, prompts = [], [], []
    for video, question in zip(videos, questions, strict=True):
        frames = (np.asarray(video, dtype=np.float32).transpose(0, 3, 1, 2) / 255.0 - mean) / std  # (T, C, H, W)
        t, c, h, w = frames.shape
        gt, gh, gw = t // temporal, h // patch, w // patch
        patches = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat.append(torch.from_numpy(np.ascontiguousarray(patches).reshape(gt * gh * gw, c * temporal * patch * patch)))
        grids.append([gt, gh, gw])
        content = [{"type": "video"}, {"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        prompts.append(text.replace("<|video_pad|>", "<|video_pad|>" * (gt * gh * gw // (merge * merge)), 1))
    tokenizer = processor.tokenizer
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": (encoded["input_ids"] == video_id).long() * 2,
        "pixel_values_videos": torch.cat(flat).float(),
        "video_grid_thw": torch.tensor(grids),
    }


def random_video(seed: int, frames: int = 4, height: int = 48, width: int = 64):
    """A deterministic (T, H, W, 3) uint8 clip: a coloured block moving over noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    clip = rng.integers(0, 60, size=(frames, height, width, 3), dtype=np.uint8)
    colour = rng.integers(100, 256, size=3, dtype=np.uint8)
    for f in range(frames):
        top, left = (4 * f) % (height - 16), (6 * f) % (width - 16)
        clip[f, top : top + 16, left : left + 16] = colour
    return clip
