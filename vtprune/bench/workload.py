"""The model and the inputs `vtprune bench` times.

Models: a checkpoint (`--model`, a Hugging Face id or a local folder), or the real architecture with random
weights (`--arch llava-1.5-7b --random-weights`, or `--model ID --random-weights` to take a checkpoint's
config without its weights), or `--arch tiny` (the tiny test model, for CPU runs and CI). Random-weight
models are built directly on the target device in the target dtype and initialised there with
`normal_(0, 0.02)` (norm weights 1, biases 0): a 7B model costs a second on a GPU instead of minutes of CPU
initialisation, and its kernels, shapes and memory are those of the real model. Timings do not depend on the
weight values; which tokens a method keeps does (it is noise here), so random-weight runs measure speed only.

Inputs: a synthetic prompt of `text_tokens` text tokens (random ids from the vocabulary, BOS first) with one
image block of the model's visual tokens (576 for LLaVA-1.5) placed at 60% of the text, as in a LLaVA-1.5
conversation (system prompt and "USER:" before the image, the question and "ASSISTANT:" after), and random
`pixel_values`. Every sample has the same length, so there is no padding: batch rows are rectangular, the
way fixed-budget pruning keeps them. No processor is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.bench.flops import ARCH_PRESETS, ArchSpec, llava_config
from vtprune.methods.base import PruneConfigError

__all__ = ["ATTN_IMPLEMENTATIONS", "BenchModel", "build_model", "init_random_weights", "synthetic_inputs"]

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
TINY = "tiny"


@dataclass
class BenchModel:
    model: torch.nn.Module
    spec: ArchSpec
    name: str  # what was asked for: an id, a path, a preset
    random_weights: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def visual_tokens(self) -> int:
        return self.spec.visual_tokens


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
    from transformers import LlavaForConditionalGeneration

    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    init_random_weights(model, seed=seed)
    return model.eval()


def build_model(
    *,
    model: str | None,
    arch: str | None,
    random_weights: bool,
    device: torch.device | str,
    dtype: torch.dtype,
    attn: str = "sdpa",
    seed: int = 0,
) -> BenchModel:
    """Load or build the model to time (see the module docstring); every bad combination is a clear error."""
    device = torch.device(device)
    if attn not in ATTN_IMPLEMENTATIONS:
        raise PruneConfigError(
            f"unknown attention implementation {attn!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if (model is None) == (arch is None):
        raise PruneConfigError(
            "give exactly one of --model (id or path) and --arch (" + ", ".join([*ARCH_PRESETS, TINY]) + ")"
        )
    if arch is not None:
        if arch == TINY:
            from vtprune.testing import make_tiny_llava

            llava, _ = make_tiny_llava(seed=seed, attn_implementation=attn)
            llava = llava.to(device=device, dtype=dtype).eval()
            return BenchModel(llava, ArchSpec.from_config(llava.config, name=TINY), TINY, True, device, dtype)
        if arch not in ARCH_PRESETS:
            raise PruneConfigError(f"unknown --arch {arch!r}; valid: {', '.join([*ARCH_PRESETS, TINY])}")
        if not random_weights:
            raise PruneConfigError(
                f"--arch {arch} has no weights: add --random-weights to time the architecture, or pass --model"
            )
        config = llava_config(arch, attn_implementation=attn)
        llava = _random_model(config, device, dtype, attn, seed)
        return BenchModel(llava, ARCH_PRESETS[arch], arch, True, device, dtype)
    if random_weights:
        from transformers import AutoConfig

        from vtprune.loading import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(model))
        llava = _random_model(config, device, dtype, attn, seed)
        return BenchModel(llava, ArchSpec.from_config(llava.config, name=model), model, True, device, dtype)
    from vtprune.loading import load_model

    llava, _ = load_model(model, device=str(device), dtype=dtype, attn_implementation=attn)
    return BenchModel(llava, ArchSpec.from_config(llava.config, name=model), model, False, device, dtype)


@dataclass
class Inputs:
    """One batch of synthetic inputs, plus where its image block sits."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor  # (B, 3, H, W)
    image_start: int  # first image-token position (the same in every row)
    text_tokens: int
    visual_tokens: int

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    def model_kwargs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
        }


def synthetic_inputs(
    config, batch: int, text_tokens: int, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> Inputs:
    """`batch` prompts of `text_tokens` random text ids around one image block, and random pixels."""
    if batch < 1:
        raise PruneConfigError(f"batch must be >= 1, got {batch}")
    if text_tokens < 2:
        raise PruneConfigError(f"text tokens must be >= 2 (BOS and the last prompt token), got {text_tokens}")
    text_cfg = config.text_config
    vision_cfg = config.vision_config
    image_id = config.image_token_id
    per_image = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        per_image += 1
    special = {image_id, getattr(config, "pad_token_id", None), getattr(text_cfg, "pad_token_id", None)}
    special |= {getattr(text_cfg, "bos_token_id", None), getattr(text_cfg, "eos_token_id", None)}
    vocab = (
        min(text_cfg.vocab_size, image_id) if image_id >= 1000 else text_cfg.vocab_size
    )  # llava-hf: ids < 32000
    candidates = torch.tensor([i for i in range(3, vocab) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    text = candidates[torch.randint(len(candidates), (text_tokens,), generator=gen)]
    bos = getattr(text_cfg, "bos_token_id", None)
    if bos is not None and bos != image_id:
        text[0] = bos
    before = max(1, (text_tokens * 6) // 10)
    ids = torch.cat([text[:before], torch.full((per_image,), image_id, dtype=torch.long), text[before:]])
    input_ids = ids[None].expand(batch, -1).contiguous()
    size = vision_cfg.image_size
    pixels = torch.randn(batch, vision_cfg.num_channels, size, size, generator=gen)
    return Inputs(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids).to(device),
        pixel_values=pixels.to(device=device, dtype=dtype),
        image_start=before,
        text_tokens=text_tokens,
        visual_tokens=per_image,
    )
