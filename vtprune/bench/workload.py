"""The model and the inputs `vtprune bench` times.

Models: a checkpoint (`--model`, a Hugging Face id or a local folder: LLaVA-1.5, -NeXT, Qwen-VL), or the real
architecture with random weights (`--arch llava-1.5-7b --random-weights`, `--arch llava-1.6-vicuna-7b
--random-weights`, or `--model ID --random-weights` to take a checkpoint's config without its weights), or
`--arch tiny` / `--arch tiny-next` (the tiny test models, for CPU runs and CI). Random-weight
models are built directly on the target device in the target dtype and initialised there with
`normal_(0, 0.02)` (norm weights 1, biases 0): a 7B model costs a second on a GPU instead of minutes of CPU
initialisation, and its kernels, shapes and memory are those of the real model. Timings do not depend on the
weight values; which tokens a method keeps does (it is noise here), so random-weight runs measure speed only.

Inputs: a synthetic prompt of `text_tokens` text tokens (random ids from the vocabulary, BOS first) with one
image block of the model's visual tokens (576 for LLaVA-1.5) placed at 60% of the text, as in a LLaVA-1.5
conversation (system prompt and "USER:" before the image, the question and "ASSISTANT:" after), and random
`pixel_values`. Every sample has the same length, so there is no padding: batch rows are rectangular, the
way fixed-budget pruning keeps them. No processor is needed.

LLaVA-NeXT (AnyRes): every sample holds one image of `image_size` (height, width; default twice the tower's
resolution, square: 672 x 672 on LLaVA-1.6, i.e. the base view + 2 x 2 tiles, 576 + 48 x 48 + 48 newlines =
2,928 tokens). `pixel_values` are (B, crops, 3, 336, 336) with `image_sizes` (B, 2), as the processor returns
them, and the image block holds exactly the tokens the model's adapter says the image expands to
(`token_sources`), so the model's own placeholder check passes.

Qwen2-VL / Qwen2.5-VL (`--arch qwen2.5-vl-7b` / `qwen2-vl-7b --random-weights`, a checkpoint, or `--arch
tiny-qwen2.5-vl` / `tiny-qwen2-vl`): every sample holds one image of `image_size` (sides multiples of 28 px,
what the processor resizes to; default 896 x 896 = 64 x 64 patches = 1,024 tokens, 128 x 128 = 64 tokens on
the tiny models), laid out as the processor returns it: `<|vision_start|>`, the image's `<|image_pad|>`
tokens, `<|vision_end|>` (the two markers count among the text tokens), `pixel_values` as flattened patches
(B * t * h * w, 3 * 2 * 14 * 14), `image_grid_thw` (B, 3) and `mm_token_type_ids` (which the unpruned model
needs for its 3-D positions); tests/test_bench.py compares the layout with the tiny model's processor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vtprune.bench.flops import PRESETS, ArchSpec, ImageWork, arch_config, image_work
from vtprune.methods.base import PruneConfigError

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "BenchModel",
    "build_model",
    "image_of",
    "init_random_weights",
    "synthetic_inputs",
]

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
TINY = "tiny"
TINY_NEXT = "tiny-next"
# the tiny Qwen-VL models of vtprune.testing, by their `make_tiny_qwen_vl` kind
TINY_QWEN = {"tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen2-vl": "qwen2_vl"}
TINY_ARCHS = (TINY, TINY_NEXT, *TINY_QWEN)
# The tiny Qwen-VLs' synthetic image: 16 x 16 patches of 8 px, 8 x 8 = 64 tokens (4 x 4 windows on Qwen2.5)
TINY_QWEN_IMAGE = 128
# Qwen-VL prompts wrap the image's pad tokens in <|vision_start|> ... <|vision_end|>: two of the text tokens
QWEN_MARKERS = 2


@dataclass
class BenchModel:
    model: torch.nn.Module
    spec: ArchSpec
    name: str  # what was asked for: an id, a path, a preset
    random_weights: bool
    device: torch.device
    dtype: torch.dtype
    image: ImageWork  # what one image of the synthetic inputs costs (tower inputs, LLM tokens)

    @property
    def visual_tokens(self) -> int:
        """Visual tokens of one image in the prompt, before pruning (2,928 for a 672 x 672 LLaVA-1.6 image)."""
        return self.image.tokens


def init_random_weights(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Cheap, deterministic random weights on the parameters' own device: N(0, std) for matrices, embeddings
    and the [CLS] vector, 1 for norm scales, 0 for biases."""
    generator_device = next(model.parameters()).device
    gen = torch.Generator(device=generator_device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 and "norm" in (name.split(".")[-2].lower() if "." in name else ""):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=gen)


def _random_model(config, device: torch.device, dtype: torch.dtype, attn: str, seed: int) -> torch.nn.Module:
    """The model class of the config's `model_type` (LLaVA-1.5 or LLaVA-NeXT), built on `device` and
    initialised there."""
    from transformers import AutoModelForImageTextToText

    from vtprune.models import supported_models

    if config.model_type not in supported_models():
        raise PruneConfigError(
            f"a {config.model_type!r} config; vtprune supports {', '.join(supported_models())}"
        )
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    init_random_weights(model, seed=seed)
    return model.eval()


def _tiny_model(arch: str, seed: int, attn: str) -> torch.nn.Module:
    from vtprune.testing import make_tiny_llava, make_tiny_llava_next, make_tiny_qwen_vl

    if arch in TINY_QWEN:
        return make_tiny_qwen_vl(TINY_QWEN[arch], seed=seed, attn_implementation=attn)[0]
    make = make_tiny_llava if arch == TINY else make_tiny_llava_next
    return make(seed=seed, attn_implementation=attn)[0]


def _tiny_spec(config, arch: str) -> ArchSpec:
    """The tiny model's ArchSpec; the tiny Qwen-VLs assume a `TINY_QWEN_IMAGE` image (896 px would be 1,024
    tokens of an 8 px patch model: slow on a CPU and far from what the tests need)."""
    spec = ArchSpec.from_config(config, name=arch)
    return dataclasses.replace(spec, image_size=TINY_QWEN_IMAGE) if spec.qwen else spec


def _image_work(spec: ArchSpec, image_size: tuple[int, int] | None) -> ImageWork:
    try:
        return image_work(spec, image_size)
    except ValueError as err:
        raise PruneConfigError(f"--image-size: {err}") from None


def image_of(model: torch.nn.Module, spec: ArchSpec, image_size: tuple[int, int] | None) -> ImageWork:
    """What one synthetic image costs on `model`, counted by the model's adapter (the model file's own tiling
    and unpadding) and checked against `bench/flops.py`'s arithmetic, so the FLOPs reported are those of the
    tokens timed. `image_size` (height, width) is for AnyRes models only."""
    from vtprune.models import adapter_for

    expected = _image_work(spec, image_size)
    adapter = adapter_for(model)
    if expected.size is None:
        return expected
    if spec.qwen:  # the adapter's count of the image's merged tokens (image_grid_thw t * h * w / 4)
        counted = int(adapter.tokens_of(torch.tensor([expected.grid]))[0])
        if counted != expected.tokens:
            raise PruneConfigError(
                f"the model expands a {expected.size} image to {counted} tokens, bench/flops.py to "
                f"{expected.tokens}; its FLOPs would be wrong"
            )
        return expected
    sizes = torch.tensor([expected.size])
    counted = (adapter.crops_of(expected.size), len(adapter.token_sources(sizes)[0]))
    if counted != (expected.crops, expected.tokens):
        raise PruneConfigError(
            f"the model tiles a {expected.size} image into {counted[0]} tower inputs and {counted[1]} tokens, "
            f"bench/flops.py into {expected.crops} and {expected.tokens}; its FLOPs would be wrong"
        )
    return expected


def build_model(
    *,
    model: str | None,
    arch: str | None,
    random_weights: bool,
    device: torch.device | str,
    dtype: torch.dtype,
    attn: str = "sdpa",
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> BenchModel:
    """Load or build the model to time (see the module docstring); every bad combination is a clear error.
    `image_size` (height, width) sets the synthetic image of AnyRes and Qwen-VL models (default:
    `default_image_size`)."""
    device = torch.device(device)
    valid_archs = ", ".join([*PRESETS, *TINY_ARCHS])
    if attn not in ATTN_IMPLEMENTATIONS:
        raise PruneConfigError(
            f"unknown attention implementation {attn!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if (model is None) == (arch is None):
        raise PruneConfigError(f"give exactly one of --model (id or path) and --arch ({valid_archs})")
    if arch is not None and arch not in PRESETS and arch not in TINY_ARCHS:
        raise PruneConfigError(f"unknown --arch {arch!r}; valid: {valid_archs}")
    if arch in PRESETS and not random_weights:
        raise PruneConfigError(
            f"--arch {arch} has no weights: add --random-weights to time the architecture, or pass --model"
        )
    if arch in PRESETS:
        _image_work(PRESETS[arch], image_size)  # a wrong image size is refused before 7 B parameters exist
    if arch in TINY_ARCHS:
        llava = _tiny_model(arch, seed, attn).to(device=device, dtype=dtype).eval()
        spec, name, is_random = _tiny_spec(llava.config, arch), arch, True
    elif arch is not None:
        llava = _random_model(arch_config(arch, attn_implementation=attn), device, dtype, attn, seed)
        spec, name, is_random = PRESETS[arch], arch, True
    elif random_weights:
        from transformers import AutoConfig

        from vtprune.loading import resolve_model_path

        llava = _random_model(AutoConfig.from_pretrained(resolve_model_path(model)), device, dtype, attn, seed)
        spec, name, is_random = ArchSpec.from_config(llava.config, name=model), model, True
    else:
        from vtprune.loading import load_model

        llava, _ = load_model(model, device=str(device), dtype=dtype, attn_implementation=attn)
        spec, name, is_random = ArchSpec.from_config(llava.config, name=model), model, False
    return BenchModel(llava, spec, name, is_random, device, dtype, image_of(llava, spec, image_size))


@dataclass
class Inputs:
    """One batch of synthetic inputs, plus where its image block sits."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor  # (B, 3, H, W); AnyRes: (B, crops, 3, H, W)
    image_start: int  # first image-token position (the same in every row)
    text_tokens: int
    visual_tokens: int
    image_sizes: torch.Tensor | None = None  # (B, 2) height, width: AnyRes only
    image_grid_thw: torch.Tensor | None = None  # (B, 3) patches (temporal, rows, cols): Qwen-VL only
    mm_token_type_ids: torch.Tensor | None = None  # (B, L) 1 at image tokens: Qwen-VL only (its M-RoPE)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    def image_kwargs(self) -> dict:
        """What `get_image_features` (and the model's forward) take for the images."""
        extra = {} if self.image_sizes is None else {"image_sizes": self.image_sizes}
        if self.image_grid_thw is not None:
            extra["image_grid_thw"] = self.image_grid_thw
        return {"pixel_values": self.pixel_values, **extra}

    def model_kwargs(self) -> dict:
        # Qwen-VL's forward and generate() compute the 3-D positions only when given the token types, as the
        # processor returns them (without them the unpruned model would run on text positions)
        extra = {} if self.mm_token_type_ids is None else {"mm_token_type_ids": self.mm_token_type_ids}
        text = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {**text, **self.image_kwargs(), **extra}


def _text_ids(config, text_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """`text_tokens` random ids of ordinary words (no image, pad, BOS or EOS id; BOS first)."""
    text_cfg = config.text_config
    image_id = config.image_token_id
    special = {image_id, getattr(config, "pad_token_id", None), getattr(text_cfg, "pad_token_id", None)}
    special |= {getattr(text_cfg, "bos_token_id", None), getattr(text_cfg, "eos_token_id", None)}
    # Qwen-VL's video and vision start / end ids would make the prompt hold another visual block
    markers = ("video_token_id", "vision_start_token_id", "vision_end_token_id")
    special |= {getattr(config, key, None) for key in markers}
    vocab = (
        min(text_cfg.vocab_size, image_id) if image_id >= 1000 else text_cfg.vocab_size
    )  # llava-hf: ids < 32000
    candidates = torch.tensor([i for i in range(3, vocab) if i not in special], dtype=torch.long)
    text = candidates[torch.randint(len(candidates), (text_tokens,), generator=gen)]
    bos = getattr(text_cfg, "bos_token_id", None)
    if bos is not None and bos != image_id:
        text[0] = bos
    return text


def synthetic_inputs(
    model_or_config,
    batch: int,
    text_tokens: int,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> Inputs:
    """`batch` prompts of `text_tokens` random text ids around one image block, and random pixels.

    Pass the model (any supported family) or, for LLaVA-1.5, its config. AnyRes and Qwen-VL models need the
    model: its adapter says how many tokens an image of `image_size` expands to (`image_of`). On Qwen-VL the
    default size is the config's (896 x 896, whatever the patch size: pass `image_size` for the tiny models;
    `build_model` and the runner do)."""
    if batch < 1:
        raise PruneConfigError(f"batch must be >= 1, got {batch}")
    if text_tokens < 2:
        raise PruneConfigError(f"text tokens must be >= 2 (BOS and the last prompt token), got {text_tokens}")
    is_model = isinstance(model_or_config, torch.nn.Module)
    config = model_or_config.config if is_model else model_or_config
    spec = ArchSpec.from_config(config)
    if (spec.anyres or spec.qwen) and not is_model:
        raise PruneConfigError(
            "synthetic inputs for LLaVA-NeXT and Qwen-VL need the model (its adapter counts the tokens)"
        )
    image = image_of(model_or_config, spec, image_size) if is_model else image_work(spec, image_size)
    gen = torch.Generator().manual_seed(seed)
    if spec.qwen:
        return _qwen_inputs(config, spec, image, batch, text_tokens, gen, device=device, dtype=dtype)
    text = _text_ids(config, text_tokens, gen)
    before = max(1, (text_tokens * 6) // 10)
    block = torch.full((image.tokens,), config.image_token_id, dtype=torch.long)
    input_ids = torch.cat([text[:before], block, text[before:]])[None].expand(batch, -1).contiguous()
    side, channels = config.vision_config.image_size, config.vision_config.num_channels
    crops = (image.crops,) if spec.anyres else ()  # the processor's (B, crops, C, H, W) for AnyRes
    pixels = torch.randn(batch, *crops, channels, side, side, generator=gen)
    sizes = None if image.size is None else torch.tensor([image.size] * batch, device=device)
    return Inputs(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids).to(device),
        pixel_values=pixels.to(device=device, dtype=dtype),
        image_start=before,
        text_tokens=text_tokens,
        visual_tokens=image.tokens,
        image_sizes=sizes,
    )


def _qwen_inputs(
    config, spec: ArchSpec, image, batch: int, text_tokens: int, gen, *, device, dtype
) -> Inputs:
    """Qwen-VL inputs as its processor returns them for one image of `image.size` per prompt (already resized
    to multiples of 28 px): `<|vision_start|>`, t * h * w / 4 `<|image_pad|>` tokens, `<|vision_end|>` inside
    the text (the two markers count among the `text_tokens`), `pixel_values` as the flattened patches
    (B * t * h * w, channels * temporal patch * patch * patch), `image_grid_thw` (B, 3), the token types."""
    if text_tokens < QWEN_MARKERS + 2:
        raise PruneConfigError(
            f"text tokens must be >= {QWEN_MARKERS + 2} on Qwen-VL (BOS, <|vision_start|>, <|vision_end|> "
            f"and the last prompt token), got {text_tokens}"
        )
    words = text_tokens - QWEN_MARKERS
    text = _text_ids(config, words, gen)
    before = max(1, (words * 6) // 10)
    block = torch.full((image.tokens,), config.image_token_id, dtype=torch.long)
    start, end = torch.tensor([config.vision_start_token_id]), torch.tensor([config.vision_end_token_id])
    row = torch.cat([text[:before], start, block, end, text[before:]])
    input_ids = row[None].expand(batch, -1).contiguous()
    t, rows, cols = image.grid
    width = spec.num_channels * spec.temporal_patch_size * spec.patch_size**2
    pixels = torch.randn(batch * t * rows * cols, width, generator=gen)
    types = (input_ids == config.image_token_id).long()
    return Inputs(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids).to(device),
        pixel_values=pixels.to(device=device, dtype=dtype),
        image_start=before + 1,  # after <|vision_start|>
        text_tokens=text_tokens,
        visual_tokens=image.tokens,
        image_grid_thw=torch.tensor([list(image.grid)] * batch, device=device),
        mm_token_type_ids=types.to(device),
    )
